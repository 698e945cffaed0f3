"""Where the data stands, read from the files alone (no Prefect, no model loaded).

    unimrg status [-m MANIFEST] [--json]

Composes the label stages' part (pipeline/stage_status.py: done / stale / missing / corrupt image shards
per stage; corrupt image shards are named too) and the trainer's part (trainer/train_status.py: whether the final checkpoint of the current
train fingerprint exists, and the newest checkpoint so far). It lives here, above both layers,
because it reports on both; it imports no Prefect.

Usage from Python:
    from flows.status import collect_status
    collect_status(load_manifest("data_manifest.yaml"))["stages"]["depth"]["done"]
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pyarrow.parquet as pq

from pipeline.integrity import image_shard_problem
from pipeline.manifest import Manifest
from pipeline.shards import Layout
from pipeline.stage_status import stage_status
from trainer.train_status import train_status

__all__ = ["collect_status", "human_bytes", "print_status"]


def collect_status(manifest: Manifest) -> dict[str, Any]:
    """Everything `unimrg status` prints, as plain data."""
    layout = Layout(manifest.out)
    shards = layout.image_shards()
    corrupt = {str(p): why for p in shards if (why := image_shard_problem(p))}
    images = sum(pq.ParquetFile(p).metadata.num_rows for p in shards if str(p) not in corrupt)
    out: dict[str, Any] = {
        "output_dir": str(layout.root),
        "images": {
            "shards": len(shards),
            "rows": images,
            "dir": str(layout.images_dir),
            # image shard path -> why it cannot be trusted (`unimrg ingest` sets it aside)
            "corrupt": corrupt,
        },
        "stages": {},
    }
    from pipeline.stage import STAGE_NAMES

    for name in STAGE_NAMES:
        if getattr(manifest.stages, name, None) is not None:
            out["stages"][name] = asdict(stage_status(name, manifest, layout))
    if manifest.trainer is not None:
        out["train"] = asdict(train_status(manifest))
    if manifest.eval is not None:
        from trainer.evaluation.eval_status import eval_status

        out["eval"] = asdict(eval_status(manifest))
    return out


def _ranges(ns: list[int], limit: int = 6) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8' (shortened past `limit` ranges)."""
    runs: list[tuple[int, int]] = []
    for n in ns:
        if runs and n == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:limit]]
    return ", ".join(text) + (f", ... ({len(runs) - limit} more)" if len(runs) > limit else "")


def print_status(manifest: Manifest, as_json: bool = False) -> int:
    """Print the status; exit code 1 when a stage's fingerprint could not be computed."""
    st = collect_status(manifest)
    errors = [s["error"] for s in st["stages"].values() if s["error"]]
    for part in ("train", "eval"):
        if st.get(part, {}).get("error"):
            errors.append(st[part]["error"])
    if as_json:
        print(json.dumps(st, indent=2))
        return 1 if errors else 0

    from rich.console import Console
    from rich.table import Table

    con = Console()
    img = st["images"]
    con.print(f"[bold]{st['output_dir']}[/]: {img['rows']} images in {img['shards']} shard(s)")
    for path, why in img["corrupt"].items():
        con.print(f"  corrupt image shard {path}: {why} (`unimrg ingest` sets it aside)")
    # The `corrupt` column only when there is something to show (the table stays narrow).
    counts = ["done", "stale", "missing"]
    if any(s["corrupt"] for s in st["stages"].values()):
        counts.append("corrupt")
    table = Table("stage", "fingerprint", *counts)
    table.add_column("where / why", overflow="fold")  # paths are never cut short
    for name, s in st["stages"].items():
        where = s["error"] or s["labels_dir"]
        if s.get("made_by"):
            where += f"\n  made by {s['made_by']}"
        if s["stale_shards"]:
            where += (
                f"\n  stale shards {_ranges(s['stale_shards'])} (labels under "
                f"{', '.join(s['other_fingerprints'])})"
            )
        if s["missing_shards"] and not s["error"]:
            where += f"\n  missing shards {_ranges(s['missing_shards'])}"
        for path, why in s["corrupt_shards"].items():
            where += f"\n  corrupt {path}: {why}"
        if s["random_weights"]:
            where += "\n  random weights (tiny-random): labels are noise"
        table.add_row(
            name,
            s["fingerprint"] or "-",
            *(str(s[k]) for k in counts),
            where,
        )
    if "train" in st:
        t = st["train"]
        if t["error"]:
            table.add_row("train", "-", *[""] * len(counts), t["error"])
        else:
            latest = f"latest step {t['latest_step']}" if t["latest_step"] else "no checkpoint"
            if t.get("diverged_step") is not None:
                latest += f"\n  DIVERGED at step {t['diverged_step']} (diverged.json)"
            table.add_row(
                "train",
                t["fingerprint"],
                "yes" if t["done"] else "no",
                *[""] * (len(counts) - 1),
                f"{t['output_dir']}\n  made by {t['made_by']}\n  {latest} of {t['max_steps']}",
            )
    if "eval" in st:
        e = st["eval"]
        where = e["error"] or e["output_dir"]
        if e["missing"]:
            where += f"\n  to evaluate: {', '.join(e['missing'][:6])}"
            where += f" ... ({len(e['missing']) - 6} more)" if len(e["missing"]) > 6 else ""
        where += "".join(f"\n  {n}" for n in e["notes"])
        table.add_row("eval", "-", f"{e['done']}/{e['total']}", "", "", where)
    con.print(table)
    others = [(name, o) for name, s in st["stages"].items() for o in s.get("others", [])] + [
        ("train", o) for o in st.get("train", {}).get("others", [])
    ]
    if others:
        old = Table(
            "stage", "other fingerprint", "shards", "size", title="not used by this manifest"
        )
        old.add_column("made by", overflow="fold")
        for name, o in others:
            old.add_row(
                name, o["fingerprint"], str(o["shards"]), human_bytes(o["bytes"]), o["made_by"]
            )
        con.print(old)
        total = sum(o["bytes"] for _, o in others)
        con.print(
            f"{human_bytes(total)} in other fingerprints: `unimrg clean --dry-run` lists them"
        )
    return 1 if errors else 0


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
