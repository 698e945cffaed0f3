"""Scoring a trained miniature checkpoint on the held-out scenes, and its gates.

`evaluate(checkpoint, root)` returns, for one trained model:

- `accuracy`, `spatial_accuracy` (the depth-order questions: which colour the nearest / the
  farthest shape is), `generic_accuracy`, `per_category`: greedy replies from the adapter's
  `answer()`, read by the evaluation's own scorer (`trainer.evaluation.scoring.score("mcq")`,
  whose option-text matching reads a one-word reply such as "red" as the option that says it);
- `image_use`: the fraction of depth-order questions whose reply changes when the question is
  asked about another held-out scene (the next one's image): 0 for a model that answers from the
  text alone; its ceiling is below 1 because another scene often has the same answer;
- `answer_nll`: the held-out answers' negative log-likelihood per answer token (the word and its
  end-of-sequence token), through the adapter's own understanding loss: `depth` and `generic`;
- `generation`: per generation task, the held-out generation loss (nats per VQ code) with the
  right condition and with a shuffled one (each scene given the next scene's image, or for
  text_to_image its caption), and their gap `shuffled - right`. A task the model has not
  learned to condition on has a gap near 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments.miniature.scenes import DEPTH_KINDS, prompt

__all__ = ["GENERATION_TASKS", "evaluate"]

#: the generation tasks whose right-vs-shuffled gap is measured for every model
GENERATION_TASKS = ("reconstruction", "depth", "segmentation", "text_to_image")


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


def evaluate(checkpoint: Path, root: Path, gate_scenes: int = 96, batch: int = 48) -> dict:
    import torch

    from trainer.adapters.janus.adapter import JanusAdapter
    from trainer.evaluation.benchmarks import load_image, read_benchmark
    from trainer.evaluation.scoring import score

    adapter = JanusAdapter.load(str(checkpoint))
    adapter.model.eval()
    tsv = root / "test" / "test.tsv"
    rows = read_benchmark(tsv, "mcq")
    images = [load_image(r, tsv.parent) for r in rows]
    prompts = [prompt(r["question"]) for r in rows]
    replies: list[str] = []
    with torch.no_grad():
        for sl in _batches(len(rows), batch):
            replies += adapter.answer(images[sl], prompts[sl], max_new_tokens=3)
    for r, reply in zip(rows, replies):
        r["prediction"] = reply
    metrics: dict[str, Any] = score("mcq", rows)
    depth_idx = [i for i, r in enumerate(rows) if r["category"] in DEPTH_KINDS]
    generic_idx = [i for i, r in enumerate(rows) if r["category"] not in DEPTH_KINDS]
    metrics["spatial_accuracy"] = score("mcq", [rows[i] for i in depth_idx])["accuracy"]
    metrics["generic_accuracy"] = score("mcq", [rows[i] for i in generic_idx])["accuracy"]
    # Image use: each depth question asked about the next depth question's scene.
    swapped_images = [images[depth_idx[(k + 1) % len(depth_idx)]] for k in range(len(depth_idx))]
    other: list[str] = []
    with torch.no_grad():
        for sl in _batches(len(depth_idx), batch):
            other += adapter.answer(
                swapped_images[sl], [prompts[i] for i in depth_idx[sl]], max_new_tokens=3
            )
    metrics["image_use"] = float(np.mean([replies[i] != o for i, o in zip(depth_idx, other)]))
    metrics["answer_nll"] = {
        "depth": _answer_nll(adapter, rows, images, depth_idx, batch),
        "generic": _answer_nll(adapter, rows, images, generic_idx, batch),
    }
    metrics["generation"] = _generation_gaps(adapter, root, gate_scenes, batch)
    return metrics


def _pixels(img) -> Any:
    import torch

    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def _answer_nll(adapter, rows, images, idx: list[int], batch: int) -> float:
    """Mean negative log-likelihood per answer token (word and EOS) of the right answers."""
    import torch

    from trainer.data import collate
    from trainer.evaluation.benchmarks import options_of

    enc = adapter.text_encoder()
    total, count = 0.0, 0
    with torch.no_grad():
        for sl in _batches(len(idx), batch):
            samples = []
            for i in idx[sl]:
                r = rows[i]
                answer = options_of(r)[r["answer"]]
                conv = [
                    {"from": "human", "value": f"<image>\n{prompt(r['question'])}"},
                    {"from": "gpt", "value": answer},
                ]
                ids, labels = enc.understanding(conv)
                samples.append(
                    {
                        "task": "understanding",
                        "batch": 0,
                        "input_ids": torch.tensor(ids),
                        "labels": torch.tensor(labels),
                        "image": _pixels(images[i]),
                    }
                )
            b = collate(samples, enc.pad_id)
            n = int((b["labels"][:, 1:] != -100).sum())
            total += float(adapter.understanding_loss(b)) * n
            count += n
    return total / max(1, count)


def _generation_gaps(adapter, root: Path, n: int, batch: int) -> dict[str, dict[str, float]]:
    import torch

    from trainer.data import DEFAULT_PROMPTS, collate

    t = np.load(root / "test" / "targets.npz")
    n = min(n, len(t["image"]))
    image = torch.from_numpy(t["image"][:n]).permute(0, 3, 1, 2).contiguous()
    targets = {
        "reconstruction": image,
        "depth": torch.from_numpy(t["depth"][:n])[:, None].expand(-1, 3, -1, -1).contiguous(),
        "segmentation": torch.from_numpy(t["edges"][:n])[:, None]
        .expand(-1, 3, -1, -1)
        .contiguous(),
        "text_to_image": image,
    }
    captions = [str(c) for c in t["caption"][:n]]
    enc = adapter.text_encoder()
    shuffled = torch.roll(torch.arange(n), 1)
    out = {}
    with torch.no_grad():
        for task in GENERATION_TASKS:
            losses = {}
            for name, order in (("right", torch.arange(n)), ("shuffled", shuffled)):
                total = 0.0
                for sl in _batches(n, batch):
                    samples = []
                    for j in range(sl.start, sl.stop):
                        c = int(order[j])
                        s = {"task": task, "batch": 0, "target": targets[task][j]}
                        if task == "text_to_image":
                            s["input_ids"] = torch.tensor(enc.text_to_image(captions[c]))
                        else:
                            s["input_ids"] = torch.tensor(enc.generation(DEFAULT_PROMPTS[task][0]))
                            s["image"] = image[c]
                        samples.append(s)
                    b = collate(samples, enc.pad_id)
                    total += float(adapter.generation_loss(b)) * (sl.stop - sl.start)
                losses[name] = total / n
            losses["gap"] = losses["shuffled"] - losses["right"]
            out[task] = losses
    return out
