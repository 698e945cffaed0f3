"""Gates, paired statistics, the table and the plot of a miniature run.

The statistics are fixed before the run (docs/experiments.md states them):

- the primary measure is held-out accuracy on the depth-order questions (`spatial_accuracy`);
- a pair is (base, post-training seed): both arms post-train the same base checkpoint with the
  same data order; the paired difference is UniMRG minus understanding-only;
- its 95% interval is the t interval over the pairs (mean +- t(0.975, n-1) x sd / sqrt(n));
- **evidence for**: the interval's lower end above 0, with every gate passed; **evidence
  against**: its upper end below +`against_margin` (0.02), with every gate passed; otherwise
  **inconclusive**. Every gate means: the tokenizer's, every base's, and every run of the arm
  (a run whose trained generation task's loss with the right condition is within `gate_gap`
  (0.3 nats) of the one with a shuffled condition has not learned it: inconclusive, not
  evidence either way). Fewer than 9 pairs is not the protocol: inconclusive.

The other arms (text-to-image replay, depth only) are compared with understanding-only the same
way, as secondary results, and so are the other measures (generic accuracy, the answers'
log-likelihood), reported without a verdict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from experiments.miniature.scenes import DEPTH_KINDS

__all__ = ["base_entry", "floors", "paired", "plot", "run_entry", "summarise", "table"]

#: two-sided 95% t quantiles by degrees of freedom (normal beyond)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069,
         24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}  # fmt: skip
MIN_PAIRS = 9
PRIMARY = "spatial_accuracy"


def t975(df: int) -> float:
    return _T975.get(df, 1.96)


def paired(a: dict[str, float], b: dict[str, float]) -> dict[str, Any]:
    """a minus b over the keys both have: the differences, mean, sd and 95% t interval."""
    keys = [k for k in a if k in b]
    d = [a[k] - b[k] for k in keys]
    n = len(d)
    out: dict[str, Any] = {"n": n, "diffs": dict(zip(keys, d))}
    if n:
        out["mean"] = float(np.mean(d))
    if n > 1:
        sd = float(np.std(d, ddof=1))
        half = t975(n - 1) * sd / math.sqrt(n)
        out.update(sd=sd, ci=[out["mean"] - half, out["mean"] + half])
    return out


def floors(tsv: Path, test_scenes: list) -> dict[str, float]:
    """What guessers score on the held-out depth questions: uniform over the five colours, a
    colour present in the image at random, and the 2D guessers (the lowest / highest object,
    the biggest / smallest) that answer nearest / farthest from the layout or size alone."""
    from trainer.evaluation.benchmarks import options_of, read_benchmark

    rows = [r for r in read_benchmark(tsv, "mcq") if r["category"] in DEPTH_KINDS]
    present = low = big = 0.0
    for r in rows:
        sc = test_scenes[int(r["image_path"].split("_")[1].split(".")[0])]
        objs = sc.objects
        right = options_of(r)[r["answer"]]
        present += 1 / len(objs)
        nearest = r["category"] == "nearest"
        by_low = (max if nearest else min)(objs, key=lambda o: o["y"] + o["r"])
        by_big = (max if nearest else min)(objs, key=lambda o: o["r"])
        low += by_low["colour"] == right
        big += by_big["colour"] == right
    n = max(1, len(rows))
    return {
        "chance": float(np.mean([1 / len(options_of(r)) for r in rows])) if rows else 0.0,
        "present_colour": present / n,
        "lowest_is_nearest": low / n,
        "biggest_is_nearest": big / n,
    }


def base_entry(done: dict[str, Any], tok: dict[str, Any], cfg) -> dict[str, Any]:
    """A base's scores and its gate: text-to-image loss well below the image codes' entropy
    given their position (the tokenizer gate's, held-out scenes) and caption-dependent."""
    t2i = done["metrics"]["generation"]["text_to_image"]
    pos = tok["gate"]["image"]["entropy_given_position"]
    gate = {
        "right": t2i["right"],
        "shuffled": t2i["shuffled"],
        "gap": t2i["gap"],
        "positional_entropy": pos,
        "below_positional": t2i["right"] <= pos - cfg.base_t2i_margin,
        "caption_dependent": t2i["gap"] >= cfg.gate_gap,
    }
    gate["passed"] = gate["below_positional"] and gate["caption_dependent"]
    return {**done, "gate": gate}


def run_entry(done: dict[str, Any], arm: str, cfg) -> dict[str, Any]:
    """A post-training run's scores and its gate: every generation task it trains has a
    right-vs-shuffled gap of at least `gate_gap`."""
    from experiments.miniature.protocol import ARMS

    tasks = [t for t, w in ARMS[arm].items() if w > 0 and t != "understanding"]
    gen = done["metrics"]["generation"]
    gaps = {t: gen[t]["gap"] for t in tasks}
    gate = {"tasks": gaps, "passed": all(g >= cfg.gate_gap for g in gaps.values())}
    return {**done, "gate": gate}


def _by_pair(runs: dict[str, Any], fn) -> dict[str, float]:
    return {k: float(fn(r["metrics"])) for k, r in runs.items()}


MEASURES = {
    "spatial_accuracy": lambda m: m["spatial_accuracy"],
    "generic_accuracy": lambda m: m["generic_accuracy"],
    "image_use": lambda m: m["image_use"],
    "answer_nll_depth": lambda m: m["answer_nll"]["depth"],
    "answer_nll_generic": lambda m: m["answer_nll"]["generic"],
}


def summarise(results: dict[str, Any], cfg) -> None:
    """Per arm: mean and sd of each measure; per arm but understanding: paired differences
    against understanding-only and the verdict (module docstring). In place."""
    runs = results["runs"]
    summary: dict[str, Any] = {}
    for arm, rs in runs.items():
        if not rs:
            continue
        s: dict[str, Any] = {
            "n": len(rs),
            "gate_passed": sum(r["gate"]["passed"] for r in rs.values()),
        }
        for name, fn in MEASURES.items():
            vals = list(_by_pair(rs, fn).values())
            s[name] = {
                "mean": float(np.mean(vals)),
                "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            }
        summary[arm] = s
    results["summary"] = summary
    base = runs.get("understanding", {})
    tok_ok = all(results["tokenizer"]["passed"].values())
    bases_ok = bool(results["bases"]) and all(
        b["gate"]["passed"] for b in results["bases"].values()
    )
    comparisons: dict[str, Any] = {}
    for arm, rs in runs.items():
        if arm == "understanding" or not rs or not base:
            continue
        comp = {name: paired(_by_pair(rs, fn), _by_pair(base, fn)) for name, fn in MEASURES.items()}
        primary = comp[PRIMARY]
        failed = [k for k, r in rs.items() if not r["gate"]["passed"]]
        reasons = []
        if not tok_ok:
            reasons.append("the tokenizer gate failed")
        if not bases_ok:
            reasons.append("a base gate failed")
        if failed:
            reasons.append(f"runs {failed} did not learn their generation tasks")
        if primary["n"] < MIN_PAIRS:
            reasons.append(f"{primary['n']} pairs, fewer than {MIN_PAIRS}")
        if "ci" not in primary:
            verdict = "inconclusive"
        elif reasons:
            verdict = "inconclusive"
        elif primary["ci"][0] > 0:
            verdict = "evidence for"
        elif primary["ci"][1] < cfg.against_margin:
            verdict = "evidence against"
        else:
            verdict = "inconclusive"
            reasons.append(
                f"the interval [{primary['ci'][0]:+.3f}, {primary['ci'][1]:+.3f}] includes 0 "
                f"and reaches +{cfg.against_margin}"
            )
        comp["verdict"] = {"verdict": verdict, "why_inconclusive": reasons}
        # by base: the mean difference of each base's seeds
        per_base: dict[str, list[float]] = {}
        for k, d in primary["diffs"].items():
            per_base.setdefault(k.split("/")[0], []).append(d)
        comp["primary_by_base"] = {b: float(np.mean(v)) for b, v in per_base.items()}
        comparisons[arm] = comp
    results["comparisons"] = comparisons


def _fmt(s: dict[str, float], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    """The markdown docs/experiments.md shows: gates, then arms with their paired differences."""
    tok = results["tokenizer"]["gate"]
    passed = results["tokenizer"]["passed"]
    lines = [
        "**Tokenizer gate** (held-out scenes): entropy given position "
        f"{tok['all']['entropy_given_position']:.2f} vs marginal {tok['all']['entropy']:.2f} "
        f"nats (image {tok['image']['entropy_given_position']:.2f} vs "
        f"{tok['image']['entropy']:.2f}, depth {tok['depth']['entropy_given_position']:.2f} vs "
        f"{tok['depth']['entropy']:.2f}, edges {tok['edges']['entropy_given_position']:.2f} vs "
        f"{tok['edges']['entropy']:.2f}); decoded depth keeps the depth order in "
        f"{tok['depth_order']:.2f} of scenes; decoded edges F1 {tok['edge_f1']:.2f}; image "
        f"PSNR {tok['image_psnr']:.1f} dB; {tok['codes_used']} codes used: "
        + ("passed" if all(passed.values()) else f"FAILED {passed}"),
        "",
        "| base | spatial | generic | image use | text-to-image loss: right / shuffled caption "
        "(positional entropy) | reconstruction gap (not gated) | gate |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, e in results["bases"].items():
        m, g = e["metrics"], e["gate"]
        lines.append(
            f"| {b} | {m['spatial_accuracy']:.3f} | {m['generic_accuracy']:.3f} | "
            f"{m['image_use']:.2f} | {g['right']:.2f} / {g['shuffled']:.2f} "
            f"({g['positional_entropy']:.2f}) | {m['generation']['reconstruction']['gap']:.2f} | "
            f"{'passed' if g['passed'] else 'FAILED'} |"
        )
    lines += [
        "",
        "| arm | runs | spatial (depth order) | minus understanding-only, paired [95% CI] | "
        "generic | image use | answer NLL, depth | generation gap right vs shuffled (min over "
        "its tasks) | gate passed | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    comps = results.get("comparisons", {})
    for arm, s in results.get("summary", {}).items():
        runs = results["runs"][arm]
        gaps = [min(r["gate"]["tasks"].values()) for r in runs.values() if r["gate"]["tasks"]]
        gap = f"{np.mean(gaps):.2f} (min {min(gaps):.2f})" if gaps else ""
        c = comps.get(arm, {})
        p = c.get(PRIMARY, {})
        diff = ""
        if "ci" in p:
            diff = f"{p['mean']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}]"
        verdict = c.get("verdict", {}).get("verdict", "")
        lines.append(
            f"| {arm} | {s['n']} | {_fmt(s['spatial_accuracy'])} | {diff} | "
            f"{_fmt(s['generic_accuracy'])} | {_fmt(s['image_use'], 2)} | "
            f"{_fmt(s['answer_nll_depth'])} | {gap} | {s['gate_passed']}/{s['n']} | {verdict} |"
        )
    f = results["data"]["floors"]
    lines += [
        "",
        f"Floors on the depth questions: chance {f['chance']:.3f}; a colour in the image at "
        f"random {f['present_colour']:.3f}; the lowest (highest) object is the nearest "
        f"(farthest) {f['lowest_is_nearest']:.3f}; the biggest (smallest) {f['biggest_is_nearest']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results.get("summary", {}))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    base_runs = results["runs"].get("understanding", {})
    for i, arm in enumerate(arms):
        vals = _by_pair(results["runs"][arm], MEASURES[PRIMARY])
        ax1.scatter([i] * len(vals), list(vals.values()), s=14, color="k", zorder=3)
        ax1.bar(i, np.mean(list(vals.values())), 0.6, alpha=0.6)
    f = results["data"]["floors"]
    for name, style in (("chance", "--"), ("lowest_is_nearest", ":"), ("biggest_is_nearest", "-.")):
        ax1.axhline(f[name], color="gray", ls=style, lw=1, label=name.replace("_", " "))
    if results["bases"]:
        bm = np.mean([b["metrics"][PRIMARY] for b in results["bases"].values()])
        ax1.axhline(bm, color="tab:red", lw=1, label="bases (mean)")
    ax1.set_xticks(range(len(arms)), arms, fontsize=8)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("held-out accuracy, depth-order questions")
    ax1.set_title("each run (dots) and the arm's mean", fontsize=9)
    ax1.legend(fontsize=7)
    comps = results.get("comparisons", {})
    for i, arm in enumerate(a for a in arms if a in comps):
        p = comps[arm][PRIMARY]
        ax2.scatter([i] * p["n"], list(p["diffs"].values()), s=14, color="k", zorder=3)
        if "ci" in p:
            ax2.errorbar(
                i, p["mean"], yerr=[[p["mean"] - p["ci"][0]], [p["ci"][1] - p["mean"]]],
                fmt="o", color="tab:blue", capsize=5,
            )  # fmt: skip
    names = [a for a in arms if a in comps]
    ax2.axhline(0, color="gray", lw=1)
    ax2.axhline(0.02, color="gray", lw=1, ls=":")
    ax2.set_xticks(range(len(names)), [f"{a}\n- understanding" for a in names], fontsize=8)
    ax2.set_title("paired difference, depth-order accuracy (95% t interval)", fontsize=9)
    for arm in arms:
        curves = [r["loss"] for r in results["runs"][arm].values()]
        if not curves or not curves[0]:
            continue
        steps = [r["step"] for r in curves[0]]
        und = np.mean([[r["understanding"] for r in c] for c in curves], axis=0)
        ax3.plot(steps, und, label=arm)
    ax3.set_xlabel("post-training step")
    ax3.set_ylabel("understanding loss (mean over runs)")
    ax3.set_title("post-training", fontsize=9)
    ax3.legend(fontsize=7)
    del base_runs
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
