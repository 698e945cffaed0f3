"""`unimrg eval` and `unimrg score`: the evaluation commands (plain Python, no Prefect run).

    unimrg eval  [-m MANIFEST] [--model base|latest|PATH] [--only NAME ...]
    unimrg score --benchmark FILE.tsv --predictions FILE.jsonl --kind KIND

Kept apart from flows/cli.py so the commands' code sits beside nothing else; cli.py only calls
`add_commands`. Imports stay lazy (`unimrg --help` must stay fast).
"""

from __future__ import annotations

import argparse
import json

KINDS = ("mcq", "yesno", "mmvp", "pope", "hallusionbench")

__all__ = ["add_commands"]


def _cmd_eval(args: argparse.Namespace, manifest) -> int:
    from trainer.evaluation.evaluate import evaluate, format_table

    report = evaluate(manifest, model=args.model, only=args.only, progress=not args.quiet)
    done = sum(r["how"] == "computed" for r in report.results.values())
    print(f"eval: {done} evaluated, {len(report.results) - done} cached")
    print(format_table(report))
    return 0


def _cmd_score(args: argparse.Namespace, manifest) -> int:
    from trainer.evaluation.scoring import score_files

    print(json.dumps(score_files(args.benchmark, args.predictions, args.kind), sort_keys=True))
    return 0


def add_commands(sub, add_manifest) -> None:
    """Register `eval` and `score` on the `unimrg` subparsers."""
    p = sub.add_parser(
        "eval",
        help="score the base model and post-trained checkpoints on the benchmarks and probes",
        description="Answer every benchmark of the manifest's eval section (VLMEvalKit TSV "
        "files) and the built-in probes with the base model and the post-trained checkpoint(s), "
        "write out/eval/<fingerprint>/<benchmark>/ (predictions.jsonl, scores.json) and print "
        "the table benchmark, metric, base, post-trained, delta. Cached: an unchanged rerun "
        "evaluates nothing. See docs/eval.md.",
    )
    add_manifest(p)
    p.add_argument(
        "--model",
        metavar="base|latest|PATH",
        help="score only this model: base, latest (the newest checkpoint) or a checkpoint "
        "folder / model spec (default: the manifest's eval.models)",
    )
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these benchmarks / probes")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "score",
        help="score a predictions file made anywhere against a benchmark TSV",
        description='Read a VLMEvalKit-layout TSV and a JSONL of {"index": ..., '
        '"prediction": "raw model text"} lines, extract each choice with VLMEvalKit\'s '
        "exact-matching rules and print the metrics of --kind as one JSON object. Needs no "
        "manifest.",
    )
    p.add_argument("--benchmark", required=True, metavar="FILE.tsv", help="the benchmark TSV")
    p.add_argument("--predictions", required=True, metavar="FILE.jsonl", help="the predictions")
    p.add_argument("--kind", required=True, choices=KINDS, help="how to read and score")
    p.set_defaults(func=_cmd_score, needs_manifest=False)
