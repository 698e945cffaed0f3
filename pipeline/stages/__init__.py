"""Label stages, found by file: `pipeline/stages/<name>.py` is the stage `<name>`.

A stage file defines a `LabelStage` subclass (see pipeline/stage.py for the contract) and names
it in a module attribute `STAGE = MyStage`; nothing else registers it. The manifest's
`stages.<name>` section selects and configures it (see docs/stages.md, "Adding a label stage").

Names are listed without importing any stage module (a stage pulls in numpy and friends at
import, and torch in `setup()`); `stage_class` imports the one asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.stage import LabelStage

__all__ = ["available_stages", "stage_class"]


def available_stages() -> list[str]:
    """Names of the stage files in this package, sorted (no import of any of them)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def stage_class(name: str) -> type[LabelStage]:
    """The stage class `pipeline/stages/<name>.py` names in its `STAGE` attribute."""
    if name not in available_stages():
        raise ValueError(f"stages.{name}: unknown stage, known: {available_stages()}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not hasattr(module, "STAGE"):
        raise ValueError(f"pipeline/stages/{name}.py: defines no STAGE = <stage class>")
    return module.STAGE
