"""One training per run folder: a second `unimrg train` on the same folder is refused at once."""

from __future__ import annotations

import pytest

from pipeline.locks import Busy, exclusive


def test_a_second_trainer_on_the_same_run_folder_is_refused(train_manifest, capsys, monkeypatch):
    from flows import cli
    from trainer.loop import train
    from trainer.run_folder import train_output_dir

    m = train_manifest(max_steps=1, save_every=1, eval_every=1)
    out = train_output_dir(m)
    monkeypatch.setattr(cli, "load_manifest", lambda path: m)
    with exclusive(out / ".train.lock", "the first trainer"):  # another process's lock
        with pytest.raises(Busy, match="another `unimrg train` is using it"):
            train(m, progress=False)
        assert cli.main(["train", "-m", "unused.yaml"]) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # before it: only the tiny-random model's build progress
    assert last.startswith("unimrg: error: ") and str(out) in last and "refused" in last
    assert "Traceback" not in err
    assert not list(out.glob("step_*")), "the refused trainer wrote nothing"
