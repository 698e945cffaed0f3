"""Loss curves from a training run's log.jsonl, one panel per task, as a PNG.

    python -c "from trainer.loss_plot import write_loss_plot; write_loss_plot('out/train/<fp>')"

Reads only the log (written by trainer/loop.py every `log_every` steps), so it works on a run
in progress, a finished run, or a copy of its folder. matplotlib draws (Agg backend, no display).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.shards import atomic_write_bytes

__all__ = ["read_log", "write_loss_plot"]

#: Panels in this order; tasks the log does not mention get none.
TASK_ORDER = ("understanding", "reconstruction", "depth", "segmentation", "text_to_image")


def read_log(log: Path) -> list[dict]:
    """The records of a log.jsonl; a line cut short by a crash mid-write is skipped."""
    if not log.exists():
        return []
    records = []
    for line in log.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def write_loss_plot(out: Path | str, path: Path | str | None = None, note: str = "") -> Path | None:
    """Draw `<out>/log.jsonl` to `path` (default `<out>/loss.png`); None when nothing is logged.

    One panel per task (loss against optimizer step) and one for the weighted total. `note`
    goes under the title (e.g. that the model has random weights).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = Path(out)
    path = Path(path) if path is not None else out / "loss.png"
    records = read_log(out / "log.jsonl")
    if not records:
        return None
    seen = {t for r in records for t in r.get("loss", {})}
    tasks = [t for t in TASK_ORDER if t in seen] + sorted(seen - set(TASK_ORDER))
    panels = [*tasks, "total"]
    fig = Figure(figsize=(3.2 * len(panels), 2.8), dpi=80, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, name in zip(axes, panels, strict=True):
        if name == "total":
            pts = [(r["step"], r["total"]) for r in records if "total" in r]
        else:
            pts = [(r["step"], r["loss"][name]) for r in records if name in r.get("loss", {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    title = f"loss, steps {records[0]['step']}-{records[-1]['step']}"
    fig.suptitle(f"{title}\n{note}" if note else title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path
