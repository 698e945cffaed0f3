"""`python -m trainer`: the training entry point that torchrun launches once per rank.

    torchrun --nproc_per_node 8 -m trainer -m data_manifest.yaml [--max-steps N] [--resume]

Same as `unimrg train`, plus `--workers` (DataLoader processes per rank).
"""

from __future__ import annotations

import argparse
import os
import sys

from pipeline.manifest import ManifestError, load_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__.splitlines()[0])
    p.add_argument("-m", "--manifest", default="data_manifest.yaml", help="manifest path")
    p.add_argument("--max-steps", type=int, help="override trainer.max_steps")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--workers", type=int, help="DataLoader worker processes per rank")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return 2
    from trainer.divergence import TrainingDiverged
    from trainer.loop import train

    try:
        result = train(
            manifest,
            max_steps=args.max_steps,
            resume=args.resume,
            progress=not args.quiet,
            num_workers=args.workers,
        )
    except TrainingDiverged as exc:  # every rank stops at the same step; one says why
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"trainer: error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        state = "trained" if result.computed else "already trained (cached)"
        print(f"{state}: {result.output_dir} (step {result.steps}) losses {result.last_losses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
