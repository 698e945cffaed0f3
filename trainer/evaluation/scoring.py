"""Metrics of one benchmark kind from rows holding the question and the model's raw reply.

`score(kind, rows)` is a pure function: each row is a benchmark row (as `read_benchmark` returns
it: `index`, `answer`, options `A`..`H`, `category`, ...) plus `prediction`, the raw reply.
`grade(kind, row)` is the per-row part: the parsed choice and whether it is right. All values are
fractions in [0, 1]. Keys per kind:

    mcq             accuracy, per_category (accuracy per `category`; {} without that column)
    mmvp            accuracy, pair_accuracy (both questions of a consecutive pair right)
    yesno           accuracy
    pope            accuracy, precision, recall, f1 (yes is the positive class), yes_ratio
    hallusionbench  aAcc (per question), fAcc (per figure: every question on one figure right),
                    qAcc (per question: right on every figure it is asked about), grouped as
                    VLMEvalKit does, by (l2-category, set_id, figure_id / question_id)
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer.evaluation.benchmarks import (
    KINDS,
    MULTIPLE_CHOICE,
    BenchmarkError,
    options_of,
    read_benchmark,
)
from trainer.evaluation.matching import parse_choice, parse_yes_no

__all__ = ["grade", "read_predictions", "score", "score_files"]


def grade(kind: str, row: dict[str, Any]) -> tuple[str | None, bool]:
    """(choice parsed from row['prediction'] or None, whether it equals row['answer'])."""
    if kind not in KINDS:
        raise ValueError(f"unknown benchmark kind {kind!r} (one of {', '.join(KINDS)})")
    reply = str(row.get("prediction", ""))
    if kind in MULTIPLE_CHOICE:
        choice = parse_choice(reply, options_of(row))
    else:
        choice = parse_yes_no(reply)
    return choice, choice is not None and choice == row["answer"]


def _mean(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


def score(kind: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of `kind` over `rows` (see the module docstring for the keys)."""
    if not rows:
        raise ValueError("no rows to score")
    graded = [grade(kind, r) for r in rows]
    correct = [ok for _, ok in graded]
    accuracy = _mean(correct)
    if kind == "mcq":
        by_cat: dict[str, list[bool]] = defaultdict(list)
        for r, ok in zip(rows, correct, strict=True):
            if "category" in r:
                by_cat[str(r["category"])].append(ok)
        return {"accuracy": accuracy, "per_category": {c: _mean(v) for c, v in by_cat.items()}}
    if kind == "mmvp":
        if len(rows) % 2:
            raise ValueError(f"MMVP needs pairs of rows, got {len(rows)} rows")
        pairs = [correct[i] and correct[i + 1] for i in range(0, len(rows), 2)]
        return {"accuracy": accuracy, "pair_accuracy": _mean(pairs)}
    if kind == "yesno":
        return {"accuracy": accuracy}
    if kind == "pope":
        # A reply read as neither yes nor no counts as a "no" prediction (VLMEvalKit: y_pred is
        # 1 only for 'Yes').
        pred_yes = [c == "Yes" for c, _ in graded]
        true_yes = [r["answer"] == "Yes" for r in rows]
        tp = sum(p and t for p, t in zip(pred_yes, true_yes, strict=True))
        fp = sum(p and not t for p, t in zip(pred_yes, true_yes, strict=True))
        fn = sum(t and not p for p, t in zip(pred_yes, true_yes, strict=True))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {
            "accuracy": accuracy,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "yes_ratio": _mean(pred_yes),
        }
    # hallusionbench
    figures: dict[tuple, list[bool]] = defaultdict(list)
    questions: dict[tuple, list[bool]] = defaultdict(list)
    for r, ok in zip(rows, correct, strict=True):
        cat = str(r.get("l2-category", ""))
        figures[(cat, str(r["set_id"]), str(r["figure_id"]))].append(ok)
        questions[(cat, str(r["set_id"]), str(r["question_id"]))].append(ok)
    return {
        "aAcc": accuracy,
        "fAcc": _mean(all(v) for v in figures.values()),
        "qAcc": _mean(all(v) for v in questions.values()),
    }


def read_predictions(path: str | Path) -> dict[str, str]:
    """index -> raw prediction from a JSONL file of `{"index": ..., "prediction": "..."}` lines.

    Raises BenchmarkError naming the file and line for text that is not UTF-8, bad JSON, a
    missing field or a repeated index. Lines end at '\n' only (JSON strings may hold U+2028).
    """
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: predictions file not found") from None
    with f:
        return _read_predictions(f, path)


def _read_predictions(f, path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise BenchmarkError(
                f"{path}: line {n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
            ) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: line {n}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or "index" not in obj or "prediction" not in obj:
            raise BenchmarkError(f"{path}: line {n}: expected an object with index and prediction")
        index = str(obj["index"]).strip()
        if index in out:
            raise BenchmarkError(f"{path}: line {n}: index {index!r} repeats an earlier line")
        out[index] = "" if obj["prediction"] is None else str(obj["prediction"])
    return out


def score_files(benchmark: str | Path, predictions: str | Path, kind: str) -> dict[str, Any]:
    """Score a predictions JSONL made anywhere against a benchmark TSV (`unimrg score`).

    Every question needs a prediction and every prediction a question (one-line errors).
    """
    rows = read_benchmark(benchmark, kind)
    preds = read_predictions(predictions)
    indices = [r["index"] for r in rows]
    missing = [i for i in indices if i not in preds]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise BenchmarkError(f"{predictions}: no prediction for index {missing[0]!r}{more}")
    extra = sorted(set(preds) - set(indices))
    if extra:
        raise BenchmarkError(
            f"{predictions}: index {extra[0]!r} is not a question of {benchmark}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    return score(kind, [{**r, "prediction": preds[r["index"]]} for r in rows])
