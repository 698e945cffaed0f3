"""`python -m experiments.miniature`: run the miniature experiment (see the package docstring).

python -m experiments.miniature [--out DIR] [--quick] [--bases 0 1 2] [--post-seeds 0 1 2]
                                [--arms A B ...] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from experiments.miniature.protocol import ARMS, QUICK, Config, check, run


def _value(current, text: str):
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(current, list):
        return [type(current[0])(x) if current else int(x) for x in text.split(",")]
    return type(current)(text)


def apply_sets(cfg: Config, items: list[str], error) -> None:
    """Set each `KEY=VALUE` of `--set` on `cfg` (the field's own type); `error` (a parser's)
    names an unknown field or a value that does not parse."""
    names = {f.name for f in fields(Config)}
    for item in items:
        key, _, value = item.partition("=")
        if key not in names:
            error(f"--set {item}: no Config field {key!r}")
        try:
            setattr(cfg, key, _value(getattr(cfg, key), value))
        except ValueError as e:
            error(f"--set {item}: {e}")


def main(argv: list[str] | None = None) -> int:
    from experiments import miniature

    p = argparse.ArgumentParser(
        prog="python -m experiments.miniature", description=miniature.__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", default="out/experiments/miniature", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny run (< 2 min): only checks it runs")
    p.add_argument("--bases", type=int, nargs="+", help="base seeds (default 0 1 2)")
    p.add_argument("--post-seeds", type=int, nargs="+", help="post-training seeds (default 0 1 2)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), help=f"arms (default {list(ARMS)})")
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override any Config field (lists comma-separated: vq_channel_multiplier=1,2,2)",
    )
    args = p.parse_args(argv)
    cfg = Config(**QUICK) if args.quick else Config()
    if args.bases:
        cfg.bases = args.bases
    if args.post_seeds:
        cfg.post_seeds = args.post_seeds
    if args.arms:
        cfg.arms = args.arms
    apply_sets(cfg, args.set, p.error)
    try:
        check(cfg)
    except ValueError as e:
        p.error(str(e))
    res = run(cfg, Path(args.out))
    print(f"wrote {Path(args.out) / 'results.json'} in {res['config']['wall_s']:.0f} s")
    for arm, c in res.get("comparisons", {}).items():
        p_ = c["spatial_accuracy"]
        ci = f" [{p_['ci'][0]:+.3f}, {p_['ci'][1]:+.3f}]" if "ci" in p_ else ""
        print(
            f"{arm} - understanding (depth-order accuracy, {p_['n']} pairs): "
            f"{p_.get('mean', float('nan')):+.3f}{ci}: {c['verdict']['verdict']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
