"""The `unimrg` command line as a user meets it: help texts, one-line errors, exit codes."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_help_explains_itself():
    top = _run("--help")
    assert top.returncode == 0
    for cmd in ("ingest", "run", "status", "preview", "train"):
        assert cmd in top.stdout
    sub = _run("ingest", "--help")
    assert sub.returncode == 0
    assert "--manifest" in sub.stdout and "quarantine" in sub.stdout


def test_bad_manifest_is_one_line_and_exit_2(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(
        yaml.safe_dump(
            {"output_dir": "o", "sources": [], "stages": {"depth": {"batch_size": "big"}}}
        )
    )
    for cmd in ("ingest", "status", "train"):
        proc = _run(cmd, "-m", str(m))
        assert proc.returncode == 2, (cmd, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "stages.depth.batch_size: expected a positive integer, got 'big'" in lines[0]
        assert "Traceback" not in proc.stderr


def test_missing_manifest_is_exit_2(tmp_path):
    proc = _run("ingest", "-m", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "manifest not found" in proc.stderr


def test_ingest_command_prints_a_summary(tmp_path):
    from tests.conftest import encode, synthetic_image

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(encode(synthetic_image(1)))
    (tmp_path / "imgs" / "b.jpg").write_bytes(b"")
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"output_dir": "o", "sources": [{"name": "s", "path": "imgs"}]}))
    proc = _run("ingest", "-m", str(m))
    assert proc.returncode == 0, proc.stderr
    assert "1 new, 0 duplicate, 1 quarantined" in proc.stdout
    assert "images/s" in proc.stdout


def test_bad_input_after_the_manifest_is_one_line_exit_1(tmp_path):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"output_dir": "o", "sources": [{"name": "s", "path": "imgs"}]}))
    proc = _run("preview", "-m", str(m), "--out", str(tmp_path / "p.png"))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "no image shards yet" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_run_with_a_stage_the_manifest_lacks_is_one_line_exit_2(tmp_path):
    """`unimrg run --only train` without a `trainer` section: refused before any flow run."""
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"output_dir": "o", "sources": []}))
    proc = _run("run", "-m", str(m), "--only", "train", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "unimrg: error: --only train: not configured in the manifest (train)"
    ]
    assert "temporary local Prefect server" not in proc.stdout  # no server, no flow run


def test_trainer_config_errors_exit_2_before_ingest_writes_anything(tmp_path):
    from tests.conftest import encode, synthetic_image

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(encode(synthetic_image(1)))
    base = {"output_dir": "o", "sources": [{"name": "s", "path": "imgs"}]}
    cases = {
        # a misspelt task name
        "trainer.loss_weights: unknown tasks ['dpeth']": {
            "stages": {"depth": {"model": "tiny-random"}},
            "trainer": {"model": "tiny-random", "loss_weights": {"dpeth": 1.0}},
        },
        # depth left at its default weight 1.0, no depth stage configured
        "trainer.loss_weights.depth: is 1.0 but stages.depth is not configured": {
            "stages": {"segment": {"model_type": "tiny-random"}},
            "trainer": {
                "model": "tiny-random",
                "loss_weights": {"understanding": 0, "segmentation": 0.5},
            },
        },
    }
    for expected, extra in cases.items():
        m = tmp_path / "m.yaml"
        m.write_text(yaml.safe_dump({**base, **extra}))
        for cmd in ("ingest", "run", "train"):
            proc = _run(cmd, "-m", str(m))
            assert proc.returncode == 2, (cmd, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
            assert expected in proc.stderr, proc.stderr
            assert not (tmp_path / "o").exists(), cmd  # nothing written


def test_config_errors_and_oom_are_not_retried():
    from flows.caching import retry_when_transient
    from pipeline.manifest import ManifestError

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert retry_when_transient(None, None, State(OSError(errno.ESTALE, "stale NFS handle")))
    assert not retry_when_transient(None, None, State(ManifestError("trainer.trainable: ...")))
    wrapped = RuntimeError("train failed")
    wrapped.__cause__ = ManifestError("--resume with max_steps 4: ...")
    assert not retry_when_transient(None, None, State(wrapped))
    assert not retry_when_transient(None, None, State(RuntimeError("CUDA out of memory")))


def test_export_checkpoint_needs_no_manifest(tmp_path, capsys):
    from flows.cli import main
    from trainer.adapters.janus.adapter import JanusAdapter

    ckpt = tmp_path / "step_000007"
    JanusAdapter.load("tiny-random").save(ckpt / "model")
    assert main(["export", "--checkpoint", str(ckpt), "--to", str(tmp_path / "hub")]) == 0
    assert (tmp_path / "hub" / "model.safetensors").is_file()
    assert (tmp_path / "hub" / "README.md").is_file()
    assert "hub-ready" in capsys.readouterr().out
    # An unusable checkpoint is a one-line error, exit 1.
    assert main(["export", "--checkpoint", str(tmp_path), "--to", str(tmp_path / "x")]) == 1
    assert "holds no model" in capsys.readouterr().err


def test_manifests_that_reach_outside_output_dir_or_break_the_reader_exit_2(tmp_path):
    """Issue 20's manifest attacks through the command line: one line naming the file and the
    field, exit 2, for every command (clean included), before anything is read or removed."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "victim" / "keep").mkdir(parents=True)
    src = [{"name": "s", "path": "imgs"}]
    recon = {"loss_weights": {"understanding": 0, "depth": 0, "segmentation": 0}}
    cases = {
        "trainer.output_subdir": {
            "output_dir": "o",
            "sources": src,
            "trainer": {**recon, "output_subdir": "../victim"},
        },
        "eval.output_subdir": {
            "output_dir": "o",
            "sources": src,
            "trainer": recon,
            "eval": {"output_subdir": "."},
        },
        "output_dir": {"output_dir": "imgs/o", "sources": src},
        "trainer.lr": {"output_dir": "o", "sources": src, "trainer": {**recon, "lr": float("nan")}},
    }
    m = tmp_path / "m.yaml"
    for field, data in cases.items():
        m.write_text(yaml.safe_dump(data))
        for cmd in ("clean", "ingest", "status"):
            proc = _run(cmd, "-m", str(m))
            assert proc.returncode == 2, (field, cmd, proc.stderr)
            assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
            assert f"{m}: {field}: " in proc.stderr, proc.stderr
    assert (tmp_path / "victim" / "keep").is_dir() and not (tmp_path / "imgs" / "o").exists()
    m.write_bytes(b"output_dir: o\nsources: []\n# \xff\n")
    proc = _run("status", "-m", str(m))
    assert proc.returncode == 2 and f"{m}:3: not UTF-8 text" in proc.stderr
