"""Label stages, found by file: `pipeline/stages/<name>.py` is the stage `<name>`.

A stage file defines a `LabelStage` subclass (see pipeline/stage.py for the contract) and names
it in a module attribute `STAGE = MyStage`, and its manifest section's pydantic model (built on
`pipeline.config.StrictConfig`) in `CONFIG = MyConfig`; nothing else registers it. The manifest's
`stages.<name>` section, typed by that `CONFIG`, selects and configures it (docs/stages.md).

Names are listed without importing any stage module; `stage_class` and `stage_config_class`
import the one asked for (a stage module imports numpy and pyarrow; torch only in `setup()`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import StrictConfig
    from pipeline.stage import LabelStage

__all__ = ["available_stages", "stage_class", "stage_config_class"]


def available_stages() -> list[str]:
    """Names of the stage files in this package, sorted (no import of any of them)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def _attribute(name: str, attr: str, what: str):
    if name not in available_stages():
        raise ValueError(f"stages.{name}: unknown stage, known: {available_stages()}")
    module = importlib.import_module(f"{__name__}.{name}")
    if not hasattr(module, attr):
        raise ValueError(f"pipeline/stages/{name}.py: defines no {attr} = <{what}>")
    return getattr(module, attr)


def stage_class(name: str) -> type[LabelStage]:
    """The stage class `pipeline/stages/<name>.py` names in its `STAGE` attribute."""
    return _attribute(name, "STAGE", "stage class")


def stage_config_class(name: str) -> type[StrictConfig]:
    """The manifest section model (`stages.<name>`) the stage file names in `CONFIG`."""
    return _attribute(name, "CONFIG", "config class")
