"""One training of the miniature at a setting, with its generation gaps at every checkpoint.

    python -m experiments.miniature.prototype --out DIR --name NAME
        [--from-seed S | --model CHECKPOINT] [--weights JSON] [--steps N] [--lr LR]
        [--batch B] [--seed S] [--every K] [--scenes N] [--set KEY=VALUE ...] [--quick]

The protocol's pieces, one at a time: the data and tokenizer of the setting (`--set`, as for
`python -m experiments.miniature`; cached under DIR/work, so a protocol run's DIR is reused), a
model (the initial model of base `--from-seed`, or `--model`: another training's checkpoint,
such as a prototype base's), one training through the protocol's manifest and
`trainer.loop.train` with the given loss weights, steps, peak learning rate, batch per task and
seed, a checkpoint every `--every` steps, and for each checkpoint the held-out generation loss
with the right and a shuffled condition (image, or caption for text_to_image) on the first
`--scenes` held-out scenes, per trained generation task. One JSON line per training is
appended to DIR/prototypes.jsonl. This is how the settings in docs/experiments.md were tried
before a full run; its numbers come from one base and one seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from experiments.miniature.protocol import QUICK, Config, check


def main(argv: list[str] | None = None) -> int:
    from experiments.miniature.__main__ import apply_sets

    p = argparse.ArgumentParser(prog="python -m experiments.miniature.prototype")
    p.add_argument("--out", required=True, help="output folder (a protocol run's is reused)")
    p.add_argument("--name", required=True, help="the training's name in prototypes.jsonl")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--from-seed", type=int, default=0, help="initial model of this base")
    start.add_argument("--model", help="start from this checkpoint instead")
    p.add_argument("--weights", default='{"reconstruction": 1}', help="loss weights (JSON)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--batch", type=int, default=8, help="batch per task")
    p.add_argument("--seed", type=int, default=0, help="data order")
    p.add_argument("--every", type=int, default=250, help="checkpoint and measure every N steps")
    p.add_argument("--scenes", type=int, default=48, help="held-out scenes for the gaps")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="Config fields")
    p.add_argument("--quick", action="store_true", help="--quick's data and sizes (tests)")
    args = p.parse_args(argv)
    cfg = Config(**QUICK) if args.quick else Config()
    apply_sets(cfg, args.set, p.error)
    try:
        given = json.loads(args.weights)
        check(cfg)
    except ValueError as e:  # json.JSONDecodeError is one
        p.error(str(e))
    tasks = ("understanding", *GENERATION)
    if not isinstance(given, dict) or set(given) - set(tasks):
        p.error(f"--weights {args.weights}: a JSON object of loss weights for {list(tasks)}")
    weights = {t: 0.0 for t in tasks} | given
    if args.steps < 1 or args.every < 1 or args.steps % args.every:
        p.error(f"--every {args.every} must divide --steps {args.steps}")
    if args.model and not (Path(args.model) / "unimrg_adapter.json").is_file():
        p.error(f"--model {args.model}: not a checkpoint (no unimrg_adapter.json)")
    record = prototype(cfg, Path(args.out), args.name, weights, args)
    print(json.dumps(record))
    return 0


GENERATION = ("reconstruction", "depth", "segmentation", "text_to_image")


def prototype(cfg: Config, out: Path, name: str, weights: dict, args) -> dict:
    import torch
    import transformers

    from experiments.miniature.evaluation import _generation_gaps
    from experiments.miniature.labels import LABEL_FP
    from experiments.miniature.protocol import _manifest, prepare
    from trainer.adapters.janus.adapter import JanusAdapter
    from trainer.loop import train

    transformers.logging.set_verbosity_error()
    prep = prepare(cfg, out)
    model = Path(args.model).resolve() if args.model else prep.init_model(cfg, args.from_seed)
    m = _manifest(
        prep.root, cfg, weights, args.seed, model, args.steps, args.lr, args.batch, args.every
    )
    t0 = time.perf_counter()
    res = train(m, progress=False, num_workers=0, probe_count=0, label_fingerprints=LABEL_FP)
    seconds = time.perf_counter() - t0
    tasks = [t for t in GENERATION if weights.get(t, 0) > 0]
    gaps = {}
    for step in range(args.every, args.steps + 1, args.every):
        adapter = JanusAdapter.load(str(res.output_dir / f"step_{step:06d}"))
        adapter.model.eval()
        g = _generation_gaps(adapter, prep.root, args.scenes, 48)
        gaps[step] = {t: {"right": g[t]["right"], "gap": g[t]["gap"]} for t in tasks}
        print(name, step, {t: round(v["gap"], 3) for t, v in gaps[step].items()}, flush=True)
    record = {
        "name": name,
        "argv": sys.argv[1:],
        "model": str(model),
        "weights": weights,
        "train_s": round(seconds, 1),
        "trained": res.computed,
        "gaps": gaps,
        "checkpoint": str(res.output_dir / f"step_{args.steps:06d}"),
        "threads": torch.get_num_threads(),
    }
    with open(out / "prototypes.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    sys.exit(main())
