"""Expected failures are one line naming the path, a non-zero exit, no traceback; only what
another try can fix is retried."""

from __future__ import annotations

import errno
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from flows.caching import is_transient, retry_when_transient
from flows.cli import main
from pipeline.locks import exclusive
from pipeline.manifest import ManifestError
from tests.conftest import encode, synthetic_image


class _State:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self):
        raise self.exc


@pytest.mark.parametrize(
    "exc, retried",
    [
        (ValueError("bad value"), False),
        (ManifestError("stages.depth.batch_size: expected a positive integer"), False),
        (pa.ArrowInvalid("Parquet magic bytes not found"), False),
        (PermissionError(errno.EACCES, "Permission denied", "/out"), False),
        (FileNotFoundError(errno.ENOENT, "No such file", "/x.parquet"), False),
        (OSError(errno.ENOSPC, "No space left on device", "/out/x"), False),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), False),
        (AttributeError("a bug"), False),
        (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), True),
        (TimeoutError("read timed out"), True),
        (type("KilledWorker", (Exception,), {})("worker lost"), True),
        (OSError(errno.ESTALE, "Stale file handle"), True),
    ],
)
def test_only_transient_failures_are_retried(exc, retried):
    assert is_transient(exc) is retried
    assert retry_when_transient(None, None, _State(exc)) is retried


def _ws(tmp_path: Path, **extra) -> Path:
    (tmp_path / "imgs").mkdir()
    for s in range(2):
        (tmp_path / "imgs" / f"{s}.jpg").write_bytes(encode(synthetic_image(s, (40, 32))))
    data = {"output_dir": "out", "shard_size": 2, "sources": [{"name": "s", "path": "imgs"}]}
    data.update(extra)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_file_typed_output_dir_is_one_line_before_any_work(tmp_path, capsys):
    m = _ws(tmp_path, output_dir="taken/out")
    (tmp_path / "taken").write_text("a file where a folder should be")
    assert main(["ingest", "-q", "-m", str(m)]) == 2
    err = _one_line(capsys)
    assert "output_dir:" in err and str(tmp_path / "taken") in err and "is a file" in err


def test_an_unwritable_output_dir_is_one_line(tmp_path, capsys, monkeypatch):
    import tempfile

    m = _ws(tmp_path)

    def denied(*a, **k):  # the tests run as root, for whom chmod denies nothing
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    assert main(["ingest", "-q", "-m", str(m)]) == 2
    err = _one_line(capsys)
    assert f"output_dir: {tmp_path / 'out'}: cannot write there (Permission denied)" in err


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import pyarrow.parquet as pq

    m = _ws(tmp_path)

    def full(table, where, **kw):
        raise OSError("IOError: [Errno 28] Error writing bytes to file. No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    assert main(["ingest", "-q", "-m", str(m)]) == 1
    err = _one_line(capsys)
    assert "the disk is full" in err and "images/shard-00000.parquet" in err
    with pytest.raises(OSError, match="No space left"):
        main(["--debug", "ingest", "-q", "-m", str(m)])


def test_a_concurrent_run_on_the_same_output_folder_is_refused(tmp_path, capsys):
    m = _ws(tmp_path)
    with exclusive(tmp_path / "out" / ".run.lock", "the first run"):
        assert main(["run", "-m", str(m), "--only", "ingest"]) == 1
    err = _one_line(capsys)
    assert "another `unimrg run` is using this output folder" in err and "refused" in err
    assert not (tmp_path / "out" / "images").exists(), "nothing ran"
    with exclusive(tmp_path / "out" / ".ingest.lock", "the first ingest"):
        assert main(["ingest", "-q", "-m", str(m)]) == 1
    assert "another ingest is running" in _one_line(capsys)


def test_a_corrupt_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    """What torch.load raises on a damaged checkpoint (a pickle or zip error, a file cut short)
    is one line, not a traceback."""
    import pickle

    import trainer.loop

    m = _ws(tmp_path)
    ckpt = tmp_path / "out" / "train" / "fp" / "step_000002" / "trainer_state.pt"

    def corrupt(*a, **k):
        raise pickle.UnpicklingError(f"{ckpt}: invalid load key, '\\x00'")

    monkeypatch.setattr(trainer.loop, "train", corrupt)
    assert main(["train", "-m", str(m)]) == 1
    assert f"{ckpt}: invalid load key" in _one_line(capsys)


def test_a_truncated_torch_checkpoint_is_one_line_and_a_bug_keeps_its_traceback(
    tmp_path, capsys, monkeypatch
):
    import torch

    import trainer.loop

    m = _ws(tmp_path)
    ckpt = tmp_path / "trainer_state.pt"
    torch.save({"step": torch.zeros(3)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    monkeypatch.setattr(trainer.loop, "train", lambda *a, **k: torch.load(ckpt, weights_only=True))
    assert main(["train", "-m", str(m)]) == 1
    assert "a checkpoint is damaged (PytorchStreamReader failed" in _one_line(capsys)

    def bug(*a, **k):
        raise AttributeError("'NoneType' object has no attribute 'step'")

    monkeypatch.setattr(trainer.loop, "train", bug)
    with pytest.raises(AttributeError):
        main(["train", "-m", str(m)])
