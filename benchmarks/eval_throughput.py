"""Eval throughput: multiple-choice questions answered per second by the eval stage's own code.

Runs `trainer.evaluation.evaluate.answer_benchmark` (what `unimrg eval` runs: TSV rows ->
base64-decoded images -> the processor's preprocessing -> batched greedy `answer()` with left
padding and a KV cache) on a synthetic VLMEvalKit TSV of N four-option questions with 640x480
JPEG images, then scores the replies. The model has the Janus-Pro-1B architecture (24-layer
2048-wide Llama, SigLIP-L/16 at 384 px, 576 image tokens) with random weights and the byte-level
tiny tokenizer: random weights never emit EOS, so every reply runs to --max-new-tokens (the worst
case), and byte-level prompts are ~4x longer than Janus's BPE prompts (pessimistic too).

Goal (issue 13): 1000 questions in under 2 minutes on one H100-class GPU.

    PYTHONPATH=. python benchmarks/eval_throughput.py                  # GPU, 1000 questions
    PYTHONPATH=. python benchmarks/eval_throughput.py --batch-size 64 --max-new-tokens 4
    python benchmarks/eval_throughput.py --tiny --device cpu -n 8      # seconds; the test

Needs torch, transformers, pillow, rich; not prefect.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere
sys.path.insert(0, str(ROOT / "benchmarks"))

GOAL_QUESTIONS, GOAL_SECONDS = 1000, 120.0


def write_tsv(path: Path, n: int, size: tuple[int, int], seed: int = 0) -> None:
    """N multiple-choice rows; every 8th image is stored, the rest name it (VLMEvalKit reuse)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    header = ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
    lines = ["\t".join(header)]
    for i in range(n):
        if i % 8 == 0:
            buf = io.BytesIO()
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(buf, format="JPEG", quality=90)
            image = base64.b64encode(buf.getvalue()).decode()
        else:
            image = str(i - i % 8)
        q = f"Which colour is the largest region in picture {i}?"
        row = [str(i), image, q, "red", "green", "blue", "grey", "ABCD"[i % 4], "colour"]
        lines.append("\t".join(row))
    path.write_text("\n".join(lines) + "\n")


def build_adapter(tiny: bool, device: str, layers: int | None = None):
    import torch
    from train_throughput import build_adapter as train_adapter

    adapter = train_adapter(tiny, device, layers)
    if device.startswith("cuda"):
        adapter.model.to(torch.bfloat16)
    adapter.model.eval()
    return adapter


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--questions", type=int, default=GOAL_QUESTIONS)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny-random Janus (for the CPU test)")
    ap.add_argument("--layers", type=int, default=None, help="override the LLM/ViT depth")
    ap.add_argument("--warmup", type=int, default=1, help="batches answered before timing")
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    import torch

    from trainer.evaluation.benchmarks import read_benchmark
    from trainer.evaluation.evaluate import answer_benchmark
    from trainer.evaluation.scoring import score

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        tsv = Path(tmp) / "synthetic_mcq.tsv"
        write_tsv(tsv, args.questions, (640, 480))
        rows = read_benchmark(tsv, "mcq")
        adapter = build_adapter(args.tiny, device, args.layers)
        warm = rows[: args.batch_size * args.warmup]
        if warm:
            answer_benchmark(
                adapter,
                warm,
                "mcq",
                tsv.parent,
                args.batch_size,
                args.max_new_tokens,
                progress=False,
            )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        replies = answer_benchmark(
            adapter,
            rows,
            "mcq",
            tsv.parent,
            args.batch_size,
            args.max_new_tokens,
            progress=not args.quiet,
            label="eval benchmark",
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        scores = score("mcq", [{**r, "prediction": p} for r, p in zip(rows, replies, strict=True)])
    qps = len(rows) / seconds
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "model": "tiny-random" if args.tiny else "Janus-Pro-1B architecture, random weights",
        "dtype": str(next(adapter.model.parameters()).dtype).removeprefix("torch."),
        "questions": len(rows),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "seconds": round(seconds, 3),
        "questions_per_s": round(qps, 3),
        "seconds_for_1000": round(GOAL_QUESTIONS / qps, 1),
        "goal_met": GOAL_QUESTIONS / qps < GOAL_SECONDS,
        "accuracy_random_weights": scores["accuracy"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
