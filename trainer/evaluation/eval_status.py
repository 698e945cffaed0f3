"""Where evaluation stands, read from the files alone (no model loaded, nothing written).

For every (model, benchmark) the manifest's eval section asks for: whether its
out/eval/<fingerprint>/<benchmark>/scores.json exists. `unimrg status` shows it.

Usage from Python:
    from trainer.evaluation.eval_status import eval_status
    eval_status(load_manifest("data_manifest.yaml")).done
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EvalStatus", "eval_status"]


@dataclass
class EvalStatus:
    done: int = 0
    total: int = 0
    missing: list[str] = field(default_factory=list)  # task titles without scores
    notes: list[str] = field(default_factory=list)
    output_dir: str | None = None
    error: str | None = None


def eval_status(manifest) -> EvalStatus:
    """Done / total eval tasks of the current models and benchmarks (or why it is unknown)."""
    try:
        from trainer.evaluation.evaluate import eval_models, plan_eval

        tasks, notes = plan_eval(manifest, eval_models(manifest), build=False)
    except Exception as exc:
        return EvalStatus(error=f"{type(exc).__name__}: {exc}")
    done = [t for t in tasks if t.done]
    return EvalStatus(
        done=len(done),
        total=len(tasks),
        missing=[t.title for t in tasks if not t.done],
        notes=notes,
        output_dir=str(manifest.out / manifest.eval.output_subdir),
    )
