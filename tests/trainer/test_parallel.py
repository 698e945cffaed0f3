"""FSDP2 (`trainer.parallel: fsdp`) on CPU with gloo: two ranks against one process, sharded
checkpoints through torch.distributed.checkpoint, resume (also on another number of ranks), the
consolidated export, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.adapters import adapter_class, available_adapters
from trainer.data import collate
from trainer.loop import train
from trainer.run_folder import train_output_dir

STEPS = 3


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _batches(adapter) -> list[dict]:
    """A fixed global batch of 4 per task: two understanding, one generation task."""
    enc = adapter.text_encoder()
    g = torch.Generator().manual_seed(0)
    s = adapter.image_size
    imgs = torch.randint(0, 256, (8, 3, s, s), generator=g, dtype=torch.uint8)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]
    und = []
    for i in range(4):
        ids, labels = enc.understanding(conv)
        und.append(
            {
                "task": "understanding",
                "batch": 0,
                "input_ids": torch.tensor(ids),
                "labels": torch.tensor(labels),
                "image": imgs[i],
            }
        )
    gen = [
        {
            "task": "depth",
            "batch": 0,
            "input_ids": torch.tensor(enc.generation("Generate the depth map." if i % 2 else "")),
            "image": imgs[i],
            "target": imgs[4 + i],
        }
        for i in range(4)
    ]
    return [("understanding", und), ("depth", gen)]


def _optimizer(params):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.02)


def _trainable(adapter):
    import fnmatch

    params = []
    for n, p in adapter.model.named_parameters():
        p.requires_grad_(not any(fnmatch.fnmatchcase(n, f) for f in adapter.frozen_patterns))
        if p.requires_grad:
            params.append(p)
    return params


def _train_mode(adapter) -> None:
    """As the trainer runs it: training mode (so activation checkpointing is active), VQ eval."""
    adapter.model.train()
    adapter.model.model.vqmodel.eval()


def _fsdp_rank(rank: int, port: int, name: str, queue) -> None:
    _env(rank, 2, port)
    try:
        import torch.distributed as dist

        from trainer.parallel import FSDP

        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        adapter = adapter_class(name).load("tiny-random")
        _trainable(adapter)
        _train_mode(adapter)
        adapter.enable_checkpointing()  # recomputed blocks gather their shards again
        fsdp = FSDP(adapter, "cpu")
        params = [p for p in adapter.model.parameters() if p.requires_grad]
        opt = _optimizer(params)
        losses = []
        for _ in range(STEPS):
            step = []
            for task, samples in _batches(adapter):
                batch = collate(samples[2 * rank : 2 * rank + 2], adapter.text_encoder().pad_id)
                loss = fsdp.task_loss(adapter, task, batch)
                loss.backward()
                step.append(loss.detach())
            fsdp.clip_grad_norm(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            vec = torch.stack(step)
            dist.all_reduce(vec)
            losses.append((vec / 2).tolist())
        queue.put((rank, losses, None))
        dist.destroy_process_group()
    except BaseException as exc:  # report, don't hang the parent
        queue.put((rank, None, repr(exc)))


@pytest.mark.parametrize("name", available_adapters())
def test_two_fsdp_ranks_match_one_process(name):
    """2 gloo ranks, each half of every batch, against one process averaging the two halves'
    gradients (what the ranks' reduce-scatter computes): the same losses step by step. The
    ranks also recompute activations (gradient checkpointing), the reference does not."""
    import multiprocessing as mp

    adapter_class(name).load("tiny-random")  # built once, before the ranks read it
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_fsdp_rank, args=(r, port, name, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [r[2] for r in results] == [None, None], results
    fsdp_losses = results[0][1]
    assert fsdp_losses == results[1][1]

    torch.manual_seed(0)
    adapter = adapter_class(name).load("tiny-random")
    params = _trainable(adapter)
    _train_mode(adapter)
    opt = _optimizer(params)
    pad = adapter.text_encoder().pad_id
    reference = []
    for _ in range(STEPS):
        step = []
        for task, samples in _batches(adapter):
            halves = [collate(samples[i : i + 2], pad) for i in (0, 2)]
            losses = [
                adapter.generation_loss(h)
                if task != "understanding"
                else adapter.understanding_loss(h)
                for h in halves
            ]
            (sum(losses) / 2).backward()
            step.append(float(sum(losses).detach() / 2))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        reference.append(step)
    flat = [x for step in fsdp_losses for x in step]
    assert flat == pytest.approx([x for step in reference for x in step], rel=1e-4, abs=1e-5)
    # the steps did something: the losses move
    assert fsdp_losses[-1] != pytest.approx(fsdp_losses[0], rel=1e-3)


def _train_rank(rank: int, world: int, port: int, manifest, resume: bool, queue) -> None:
    _env(rank, world, port)
    try:
        torch.set_num_threads(1)
        r = train(manifest, progress=False, num_workers=0, resume=resume)
        queue.put((rank, r.steps, r.last_losses, None))
    except BaseException as exc:
        queue.put((rank, None, None, repr(exc)))


def _run_ranks(manifest, world: int, resume: bool = False) -> list:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_train_rank, args=(r, world, port, manifest, resume, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [r[3] for r in results] == [None] * world, results
    return results


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_fsdp_checkpoints_resume_and_load_on_one_rank(train_manifest):
    from trainer.adapters.janus.adapter import JanusAdapter
    from trainer.parallel import load_model_state

    m = train_manifest(
        max_steps=4, batch_size=2, save_every=2, eval_every=4, parallel="fsdp", adapter="janus"
    )
    _run_ranks(m, 2)
    out = train_output_dir(m)
    reference = _log(out)
    assert [r["step"] for r in reference] == [1, 2, 3, 4]
    mid, final = out / "step_000002", out / "step_000004"
    # Sharded: every rank wrote its part through DCP; no full model in the middle checkpoint.
    assert (mid / "dcp" / ".metadata").exists() and len(list((mid / "dcp").glob("*.distcp"))) == 2
    assert not (mid / "model").exists()
    assert (mid / "rng_rank1.pt").exists()
    state = torch.load(mid / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["parallel"] == "fsdp"
    # The last step also has the consolidated save_pretrained export, and the probe.
    assert (final / "model" / "model.safetensors").exists() and (
        out / "probe" / "step_000004.png"
    ).exists()
    exported = JanusAdapter.load(str(final)).model.state_dict()
    # Load the 2-rank shards on 1 process (no process group): the same weights as the export.
    plain = JanusAdapter.load("tiny-random").model
    load_model_state(plain, final)
    loaded = plain.state_dict()
    assert exported.keys() == loaded.keys()
    assert all(torch.equal(exported[k], loaded[k]) for k in exported)
    base = JanusAdapter.load("tiny-random").model.state_dict()
    assert not torch.equal(base["lm_head.weight"], loaded["lm_head.weight"])
    # Exact resume on 2 ranks: interrupted after step 2, steps 3 and 4 again give the same losses.
    shutil.rmtree(final)
    _run_ranks(m, 2, resume=True)
    again = _log(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(again[2:], reference[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
    # Resume the 2-rank checkpoint on 1 rank (DCP reshards on load): it trains to the end.
    shutil.rmtree(final)
    res = train(m, resume=True, progress=False, num_workers=0)
    assert res.computed and res.steps == 4 and (final / "model" / "model.safetensors").exists()
    assert [r["step"] for r in _log(out)] == [1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("adapter", available_adapters())
def test_fsdp_torchrun_subprocess(train_manifest, tmp_path, adapter):
    m = train_manifest(
        adapter=adapter,
        max_steps=2,
        batch_size=2,
        eval_every=100,
        parallel="fsdp",
        gradient_checkpointing=True,
        loss_weights={"depth": 0.0, "segmentation": 0.0},
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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    cmd += ["-m", "trainer", "-m", str(manifest_path), "--workers", "0", "-q"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tmp_path / "out" / "train").iterdir()
    assert (out / "step_000002" / "dcp" / ".metadata").exists()
    assert (out / "step_000002" / "model" / "model.safetensors").exists()
    assert [r["step"] for r in _log(out)] == [1, 2]


def test_new_fields_at_their_defaults_keep_old_fingerprints(train_manifest):
    from trainer.run_folder import train_fingerprint

    base = train_fingerprint(train_manifest())
    assert train_fingerprint(train_manifest(parallel="ddp", image_size=None)) == base
    # FSDP checkpoints (DCP shards) are not DDP's: another run folder.
    assert train_fingerprint(train_manifest(parallel="fsdp")) != base


def test_fsdp_resume_falls_back_past_a_checkpoint_whose_shards_do_not_load(train_manifest, capsys):
    """The DDP resume skips a checkpoint that does not load; under FSDP the sharded state is
    read after the run is set up, and a damaged shard stopped the resume with a traceback."""
    m = train_manifest(
        max_steps=4,
        batch_size=2,
        save_every=1,
        eval_every=4,
        keep_last=4,
        parallel="fsdp",
        adapter="janus",
    )
    out = train_output_dir(m)
    train(m, progress=False, num_workers=0)
    reference = _log(out)
    shutil.rmtree(out / "step_000004")
    (shard,) = (out / "step_000003" / "dcp").glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:100])  # a damaged shard
    capsys.readouterr()
    res = train(m, resume=True, progress=False, num_workers=0)
    printed = capsys.readouterr().out
    assert "resume: skipping" in printed and "step_000003" in printed, printed
    assert "its sharded state does not load" in printed
    assert "resume: from" in printed and "step_000002" in printed.split("resume: from")[-1]
    assert res.computed and res.steps == 4
    again = _log(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(again[2:], reference[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
