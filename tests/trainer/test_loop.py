"""The training loop on tiny-random Janus (CPU): overfitting, checkpoints, resume, DDP, probe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.adapters import available_adapters
from trainer.loop import train
from trainer.optimizer import lr_factor
from trainer.run_folder import train_fingerprint, train_output_dir

TASKS = ("understanding", "reconstruction", "depth", "segmentation")


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


ADAPTERS = available_adapters()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_each_loss_falls_when_overfitting_four_examples(train_manifest, adapter):
    # Below the targets' code entropy (~3 nats here) the model must be using image and position:
    # random VQ codes of four images are memorised, not just their marginal distribution.
    m = train_manifest(max_steps=100, save_every=100, eval_every=100, lr=1e-2, adapter=adapter)
    result = train(m, progress=False, num_workers=0)
    log = _log(result.output_dir)
    assert [r["step"] for r in log] == list(range(1, 101))
    for task in TASKS:
        first = log[0]["loss"][task]
        last = sum(r["loss"][task] for r in log[-3:]) / 3
        assert last < 0.7 * first, f"{task}: {first:.3f} -> {last:.3f}"


def test_checkpoint_probe_and_cache(train_manifest):
    from trainer.loop import TrainObserver
    from trainer.loss_plot import read_log, write_loss_plot

    class Heard(TrainObserver):
        def __init__(self):
            self.logs, self.checkpoints, self.probes = [], [], []

        def on_log(self, record):
            self.logs.append(record["step"])

        def on_checkpoint(self, step, path):
            self.checkpoints.append((step, path.name, path.is_dir()))

        def on_probe(self, step, path):
            self.probes.append((step, path.is_file()))

    m = train_manifest()
    heard = Heard()
    result = train(m, progress=False, num_workers=0, observer=heard)
    out = result.output_dir
    # the observer heard every logged step, checkpoint and probe, as they were written
    records = read_log(out / "log.jsonl")
    assert heard.logs == [r["step"] for r in records] and heard.logs[-1] == 4
    assert heard.checkpoints == [(2, "step_000002", True), (4, "step_000004", True)]
    assert heard.probes and all(ok for _, ok in heard.probes) and heard.probes[-1][0] == 4
    # loss curves: one panel per task in the log, plus the total
    plot = write_loss_plot(out)
    tasks = {t for r in records for t in r["loss"]}
    assert plot == out / "loss.png" and Image.open(plot).width == round(3.2 * (len(tasks) + 1) * 80)
    assert write_loss_plot(out / "nothing-here") is None
    assert result.computed and result.steps == 4
    assert out == train_output_dir(m) and result.fingerprint == train_fingerprint(m)
    ckpt = out / "step_000004"
    for name in (
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
        "model/processor_config.json",
        "model/chat_template.jinja",
        "trainer_state.pt",
        "rng_rank0.pt",
        "config.yaml",
    ):
        assert (ckpt / name).exists(), name
    assert (out / "step_000002").is_dir()
    assert not list(out.glob(".step_*"))  # no half-written checkpoints left
    probe = Image.open(out / "probe" / "step_000004.png")
    assert probe.width > 6 * 32  # input + recon + 2 x (target, generated)
    # The caption names the sampling: Janus's defaults, guidance only where uncond was trained.
    title = probe.text["Title"]
    assert "temperature 1" in title and "reconstruction: cfg 5" in title, title
    assert "depth: no cfg" in title and "segmentation: no cfg" in title, title
    # The frozen VQ model did not move.
    from trainer.adapters.janus.adapter import JanusAdapter

    base, trained = JanusAdapter.load("tiny-random").model, JanusAdapter.load(str(ckpt)).model
    sb, st = base.state_dict(), trained.state_dict()
    assert all(torch.equal(sb[k], st[k]) for k in sb if k.startswith("model.vqmodel."))
    assert not torch.equal(
        sb["model.generation_head.vision_head.weight"],
        st["model.generation_head.vision_head.weight"],
    )
    # Unchanged rerun: nothing trains.
    again = train(m, progress=False, num_workers=0)
    assert not again.computed and again.output_dir == out
    assert again.last_losses == result.last_losses
    # A changed setting is a different run.
    assert train_fingerprint(train_manifest(lr=1e-4)) != result.fingerprint
    assert train_fingerprint(train_manifest(log_every=5, eval_every=7)) == result.fingerprint


def test_resume_with_a_longer_schedule_is_refused_not_restarted(train_manifest, tmp_path):
    from pipeline.manifest import ManifestError

    m = train_manifest(max_steps=2, save_every=2, eval_every=100)
    first = train(m, progress=False, num_workers=0)
    assert (first.output_dir / "run.json").exists()
    longer = train_output_dir(train_manifest(max_steps=4))
    with pytest.raises(ManifestError) as exc:
        train(m, max_steps=4, resume=True, progress=False, num_workers=0)
    msg = str(exc.value)
    assert str(first.output_dir) in msg and "max_steps 2" in msg and "drop --resume" in msg
    assert f"trainer.model: {first.output_dir / 'step_000002'}" in msg
    assert not longer.exists()  # nothing started from scratch
    # The DAG's policy: a manifest with another max_steps is a new run, and it says so.
    res = train(
        m, max_steps=3, resume=True, progress=False, num_workers=0, on_other_length="new_run"
    )
    assert res.computed and res.steps == 3 and res.output_dir != first.output_dir
    # Without --resume, a new length is simply a new run.
    assert train(m, max_steps=4, progress=False, num_workers=0).output_dir == longer


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_resume_gives_the_same_next_losses(train_manifest, adapter):
    m = train_manifest(max_steps=4, save_every=2, eval_every=100, adapter=adapter)
    full = train(m, progress=False, num_workers=0)
    reference = _log(full.output_dir)
    # Interrupted after step 2: only step_000002 exists.
    shutil.rmtree(full.output_dir / "step_000004")
    resumed = train(m, resume=True, progress=False, num_workers=1)
    assert resumed.computed
    # The log reads like the unbroken run's: steps 3 and 4 of the interrupted run are replaced.
    log = _log(full.output_dir)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[:2] == reference[:2]
    after = log[2:]
    for a, b in zip(after, reference[2:]):
        for task in TASKS:
            assert a["loss"][task] == pytest.approx(b["loss"][task], rel=1e-5, abs=1e-6)
        assert a["lr"] == pytest.approx(b["lr"])


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_unimrg_train_runs_checkpoints_and_resumes(train_manifest, tmp_path, adapter, capsys):
    """`unimrg train` (flows.cli) on each family's tiny-random: trains, checkpoints, probes,
    and `--resume` after an interruption continues from the checkpoint."""
    import yaml

    from flows.cli import main

    m = train_manifest(max_steps=4, save_every=2, eval_every=4, adapter=adapter)
    path = tmp_path / "manifest.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "shard_size": 3,
                "sources": [],
                "understanding": [{"path": "data/conv.jsonl", "image_root": "data/images"}],
                "stages": {
                    "depth": {"model": "tiny-random"},
                    "segment": {"model_type": "tiny-random"},
                },
                "trainer": {**m.trainer.model_dump(mode="json"), "num_workers": 0},
            }
        )
    )
    assert main(["train", "-m", str(path)]) == 0
    assert "train: trained: 4 steps" in capsys.readouterr().out
    (out,) = (tmp_path / "out" / "train").iterdir()
    reference = _log(out)
    ckpt = out / "step_000004"
    assert (ckpt / "model" / "config.json").exists() and (ckpt / "trainer_state.pt").exists()
    assert json.loads((ckpt / "model" / "unimrg_adapter.json").read_text())["adapter"] == adapter
    assert (out / "probe" / "step_000004.png").exists()
    shutil.rmtree(ckpt)  # interrupted after step 2
    assert main(["train", "-m", str(path), "--resume"]) == 0
    assert "train: trained: 4 steps" in capsys.readouterr().out
    assert ckpt.exists()
    for a, b in zip(_log(out)[2:], reference[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    assert main(["train", "-m", str(path)]) == 0
    assert "already trained" in capsys.readouterr().out


def test_trainable_patterns_and_weighted_sampler(train_manifest):
    m = train_manifest(
        trainable=["model.generation_head.*"],
        sampler="weighted",
        max_steps=2,
        eval_every=100,
        loss_weights={
            "understanding": 0.0,
            "reconstruction": 1.0,
            "depth": 1.0,
            "segmentation": 0.0,
        },
    )
    result = train(m, progress=False, num_workers=0)
    from trainer.adapters.janus.adapter import JanusAdapter

    base = JanusAdapter.load("tiny-random").model.state_dict()
    trained = JanusAdapter.load(str(result.output_dir / "step_000002")).model.state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith("model.generation_head.") for k in changed)
    assert set(result.last_losses) <= {"reconstruction", "depth"}


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 1000, 0.01) == pytest.approx(0.1)
    assert lr_factor(9, 1000, 0.01) == pytest.approx(1.0)
    assert lr_factor(10, 1000, 0.01) == pytest.approx(1.0)
    assert lr_factor(505, 1000, 0.01) == pytest.approx(0.5, abs=1e-3)
    assert lr_factor(999, 1000, 0.01) < 1e-4


def _ddp_rank(rank: int, port: int, manifest, queue) -> None:
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
        r = train(manifest, progress=False, num_workers=0)
        queue.put((rank, r.steps, r.last_losses, None))
    except BaseException as exc:  # report, don't hang the parent
        queue.put((rank, None, None, repr(exc)))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(train_manifest):
    """Two gloo ranks (forked, so no re-import): the same code path torchrun drives."""
    import multiprocessing as mp

    m = train_manifest(max_steps=2, batch_size=2, eval_every=100)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, m, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [r[3] for r in results] == [None, None], results
    assert results[0][1] == results[1][1] == 2
    assert results[0][2] == results[1][2]  # losses are all-reduced: every rank logs the same
    out = train_output_dir(m)
    ckpt = out / "step_000002"
    assert (ckpt / "rng_rank0.pt").exists() and (ckpt / "rng_rank1.pt").exists()
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["world_size"] == 2
    assert [r["step"] for r in _log(out)] == [1, 2]


@pytest.mark.slow
def test_ddp_torchrun_subprocess(train_manifest, tmp_path):
    m = train_manifest(
        max_steps=2,
        batch_size=2,
        eval_every=100,
        loss_weights={
            "understanding": 1.0,
            "reconstruction": 1.0,
            "depth": 0.0,
            "segmentation": 0.0,
        },
    )
    manifest_path = tmp_path / "manifest.yaml"
    manifest_path.write_text(
        json.dumps(
            {
                "output_dir": "out",
                "shard_size": 3,
                "sources": [],
                "understanding": [{"path": "data/conv.jsonl", "image_root": "data/images"}],
                "trainer": m.trainer.model_dump(mode="json"),
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "trainer",
            "-m",
            str(manifest_path),
            "--workers",
            "0",
            "-q",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (the subprocess has no label stages configured, so its fingerprint is its own)
    (out,) = (tmp_path / "out" / "train").iterdir()
    assert (out / "step_000002" / "rng_rank1.pt").exists()
    assert [r["step"] for r in _log(out)] == [1, 2]
    assert "trained" in proc.stdout


def test_a_local_model_directory_relative_to_the_manifest(train_manifest, tmp_path):
    from trainer.adapters.janus.adapter import JanusAdapter

    JanusAdapter.load("tiny-random").save(tmp_path / "models" / "mine")
    m = train_manifest(model="models/mine", max_steps=1, eval_every=100)
    ident = JanusAdapter.identity("models/mine", base_dir=m.base_dir)
    assert ident["weights"] and ident["random_weights"]  # saved from tiny-random: still noise
    result = train(m, progress=False, num_workers=0)
    assert (result.output_dir / "step_000001" / "model" / "model.safetensors").exists()
    assert result.fingerprint != train_fingerprint(train_manifest(max_steps=1, eval_every=100))


class _FakeCudaGenerator:
    def __init__(self):
        self.state = None

    def set_state(self, s):
        self.state = s

    def get_state(self):
        return self.state


def test_cuda_rng_state_resumes_on_a_machine_with_fewer_gpus(monkeypatch):
    """A checkpoint's CUDA RNG state restores on a machine showing fewer GPUs than the writer's.

    Simulated on CPU: one visible CUDA device. Checkpoints used to hold every visible device's
    state (`get_rng_state_all`), and restoring 8 of them on 1 device raised IndexError.
    """
    import random

    import numpy as np
    import torch.cuda.random as cuda_random

    from trainer.checkpoints import capture_rng_state, restore_rng_state

    gens = (_FakeCudaGenerator(),)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda_random, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "default_generators", gens)
    monkeypatch.setattr(cuda_random, "_lazy_call", lambda cb, **kw: cb())
    monkeypatch.setattr(cuda_random, "_lazy_init", lambda: None)
    base = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    # Written by rank 0 of an 8-GPU run in the old format: all eight devices' states.
    restore_rng_state({**base, "cuda": states})
    assert torch.equal(gens[0].state, states[0])
    # The current format: this rank's own device only, round-tripped.
    gens[0].state = states[3]
    saved = capture_rng_state()
    assert torch.equal(saved["cuda"], states[3])
    gens[0].state = None
    restore_rng_state(saved)
    assert torch.equal(gens[0].state, states[3])


def test_train_fingerprint_changes_when_missing_labels_are_completed(train_manifest):
    """Training on partly labelled data is not a cache hit once the labels are complete."""
    from pipeline.shards import Layout
    from tests.trainer.conftest import LABEL_FPS

    m = train_manifest(n_images=7)  # shard_size 3: three image shards
    # A task with weight 0 does not read depth labels: their absence changes nothing there.
    no_depth = train_manifest(
        n_images=7,
        loss_weights={
            "understanding": 1.0,
            "reconstruction": 1.0,
            "depth": 0.0,
            "segmentation": 1.0,
        },
    )
    complete, no_depth_complete = train_fingerprint(m), train_fingerprint(no_depth)
    shard = Layout(m.out).label_shard("depth", LABEL_FPS["depth"], 1)
    moved = shard.with_name("held-back")
    shard.rename(moved)
    assert train_fingerprint(m) != complete
    assert train_fingerprint(no_depth) == no_depth_complete
    moved.rename(shard)
    assert train_fingerprint(m) == complete


def test_num_workers_is_a_manifest_field_outside_the_fingerprint(tmp_path):
    from pipeline.manifest import parse_manifest
    from trainer.run_folder import train_fingerprint

    only_rec = {"understanding": 0, "depth": 0, "segmentation": 0}
    trainer = {"model": "tiny-random", "loss_weights": only_rec}
    base = {"output_dir": "o", "sources": [], "trainer": trainer}
    a = parse_manifest(base, base_dir=tmp_path)
    b = parse_manifest({**base, "trainer": {**trainer, "num_workers": 3}}, base_dir=tmp_path)
    assert b.trainer.num_workers == 3
    assert train_fingerprint(a, {}) == train_fingerprint(b, {})
