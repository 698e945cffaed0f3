"""CUDA checks (run on a GPU machine: `pytest -m gpu tests/trainer`)."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(
    "adapter,parallel", [("janus", "ddp"), ("emu3", "ddp"), ("janus", "fsdp"), ("emu3", "fsdp")]
)
def test_bf16_training_and_probe_on_cuda(train_manifest, adapter, parallel):
    """bf16 autocast (DDP path) and FSDP's bf16 gathers with fp32 reduction (1-rank group)."""
    from trainer.loop import train

    m = train_manifest(
        max_steps=3,
        save_every=3,
        eval_every=3,
        adapter=adapter,
        parallel=parallel,
        gradient_checkpointing=parallel == "fsdp",
    )
    result = train(m, progress=False, num_workers=2)
    log = [json.loads(x) for x in (result.output_dir / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3
    assert all(torch.isfinite(torch.tensor(list(r["loss"].values()))).all() for r in log)
    assert (result.output_dir / "probe" / "step_000003.png").exists()


def test_padded_batch_losses_are_finite_under_bf16_autocast():
    from trainer.adapters.janus.adapter import JanusAdapter
    from trainer.data import collate

    a = JanusAdapter.load("tiny-random", device="cuda")
    enc = a.text_encoder()
    g = torch.Generator().manual_seed(0)
    samples = [
        {
            "task": "depth",
            "batch": 0,
            "input_ids": torch.tensor(enc.generation(p)),
            "image": torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8),
            "target": torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8),
        }
        for p in ("A long prompt with many more words in it than the other.", "")
    ]
    batch = collate(samples, enc.pad_id)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = a.generation_loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in a.model.parameters() if p.grad is not None)
