"""A diverged training is never trusted: it stops at the first non-finite loss or gradient norm,
names the step and the task, keeps the last finite checkpoint, is never done or cached, and
`unimrg eval` refuses it. tiny-random Janus on CPU; the NaN is planted (or comes from lr 1e30)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import manifest_file
from trainer.divergence import TrainingDiverged
from trainer.loop import train
from trainer.objective import Objective
from trainer.run_folder import train_output_dir

REAL_TASK_LOSS = Objective.task_loss


def _nan_loss(monkeypatch, task: str, at_step: int, rank: int | None = None) -> None:
    """Make `task`'s loss NaN at optimizer step `at_step` (one batch of each task per step),
    on every rank or only on `rank`."""
    real = REAL_TASK_LOSS
    calls: Counter = Counter()

    def task_loss(adapter, t, batch):
        loss = real(adapter, t, batch)
        calls[t] += 1
        mine = rank is None or int(os.environ.get("RANK", "0")) == rank
        return loss * float("nan") if t == task and calls[t] == at_step and mine else loss

    monkeypatch.setattr(Objective, "task_loss", staticmethod(task_loss))


def _steps(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("step_*"))


def _logged(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]


def test_a_nan_loss_stops_at_its_step_naming_the_task_and_keeps_the_last_finite_checkpoint(
    train_manifest, monkeypatch
):
    m = train_manifest(max_steps=4, save_every=1, eval_every=100)
    _nan_loss(monkeypatch, "depth", at_step=3)
    with pytest.raises(TrainingDiverged) as exc:
        train(m, progress=False, num_workers=0)
    msg = str(exc.value)
    assert "\n" not in msg and "diverged at step 3" in msg and "depth loss" in msg, msg
    assert "step_000002" in msg, msg  # the checkpoint kept
    out = train_output_dir(m)
    # Stopped before the optimizer step: no checkpoint of the NaN state, no final one.
    assert _steps(out) == ["step_000001", "step_000002"]
    assert not list(out.glob(".step_*"))
    assert _logged(out) == [1, 2]
    weights = torch.load(out / "step_000002" / "trainer_state.pt", weights_only=True)
    assert weights["step"] == 2
    record = json.loads((out / "diverged.json").read_text())
    assert record["step"] == 3 and record["tasks"] == ["depth"]
    assert record["last_checkpoint"] == "step_000002"
    from trainer.train_status import train_status

    status = train_status(m)
    assert status.diverged_step == 3 and not status.done and status.latest_step == 2
    # Never done nor cached: running it again trains again (and diverges again here).
    _nan_loss(monkeypatch, "depth", at_step=3)
    with pytest.raises(TrainingDiverged):
        train(m, progress=False, num_workers=0)
    # Resumed without the fault it finishes, and the record of the divergence goes.
    monkeypatch.setattr(Objective, "task_loss", staticmethod(REAL_TASK_LOSS))
    res = train(m, resume=True, progress=False, num_workers=0)
    assert res.computed and res.steps == 4 and not (out / "diverged.json").exists()
    assert _logged(out) == [1, 2, 3, 4]


def test_a_nan_gradient_with_finite_losses_stops_too(train_manifest, monkeypatch):
    m = train_manifest(max_steps=3, save_every=1, eval_every=100)
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def norm(params, max_norm, *a, **k):
        calls.append(1)
        total = real(params, max_norm, *a, **k)
        return total * float("inf") if len(calls) == 2 else total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", norm)
    with pytest.raises(TrainingDiverged) as exc:
        train(m, progress=False, num_workers=0)
    msg = str(exc.value)
    assert "diverged at step 2" in msg and "gradient norm" in msg and "inf" in msg, msg
    assert _steps(train_output_dir(m)) == ["step_000001"]


def _error(capsys) -> str:
    """The one error line of a failed command (stderr also holds transformers' progress bars)."""
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("unimrg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unimrg_train_with_lr_1e30_fails_in_one_line_and_eval_refuses_the_run(
    train_manifest, tmp_path, capsys
):
    from flows.cli import main

    m = train_manifest(max_steps=4, save_every=1, eval_every=100)
    path = manifest_file(m, tmp_path / "manifest.yaml", lr=1e30)
    assert main(["train", "-m", str(path)]) == 1
    err = _error(capsys)
    assert "diverged at step 2" in err and "loss" in err and "lr 1e+30" in err, err
    (out,) = (tmp_path / "out" / "train").iterdir()
    assert "step_000004" not in _steps(out) and (out / "diverged.json").exists()
    # The checkpoint it kept holds finite weights only.
    for name in _steps(out):
        from safetensors.torch import load_file

        tensors = load_file(out / name / "model" / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in tensors.values()), name
    # Not "already trained (cached)": a rerun trains and fails the same way.
    assert main(["train", "-m", str(path)]) == 1
    assert "diverged at step 2" in _error(capsys)
    # eval scores no checkpoint of a diverged run (base alone is fine).
    for model in ([], ["--model", "latest"], ["--model", str(out / "step_000001")]):
        assert main(["eval", "-q", "-m", str(path), *model]) == 1
        err = _error(capsys)
        assert "diverged at step 2" in err and str(out) in err, err


def _rank(rank: int, port: int, manifest, queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        torch.set_num_threads(1)
        train(manifest, progress=False, num_workers=0)
        queue.put((rank, None))
    except BaseException as exc:  # report, don't hang the parent
        queue.put((rank, f"{type(exc).__name__}: {exc}"))


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_every_rank_stops_at_the_same_step_when_one_rank_diverges(
    train_manifest, monkeypatch, parallel
):
    """NaN on rank 1 only: both ranks stop at that step (none waits forever in a collective)."""
    import multiprocessing as mp
    import socket

    m = train_manifest(max_steps=3, batch_size=2, save_every=1, eval_every=100, parallel=parallel)
    _nan_loss(monkeypatch, "segmentation", at_step=2, rank=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, m, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, err in results:
        assert err and err.startswith("TrainingDiverged") and "step 2" in err, (rank, err)
        assert "segmentation loss" in err, err
    out = train_output_dir(m)
    assert _steps(out) == ["step_000001"] and (out / "step_000001" / "rng_rank1.pt").exists()
    assert json.loads((out / "diverged.json").read_text())["step"] == 2


def test_the_diverged_record_is_plain_json(train_manifest, monkeypatch):
    m = train_manifest(max_steps=2, save_every=1, eval_every=100)
    _nan_loss(monkeypatch, "understanding", at_step=1)
    with pytest.raises(TrainingDiverged) as exc:
        train(m, progress=False, num_workers=0)
    assert "no checkpoint" in str(exc.value)
    out = train_output_dir(m)
    text = (out / "diverged.json").read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["losses"]["understanding"] == "nan" and record["last_checkpoint"] is None
    assert math.isfinite(record["lr"])
