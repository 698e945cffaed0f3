"""Label stages, found by folder: the package `pipeline/stages/<name>/` is the stage `<name>`.

A stage package holds everything only that stage uses (its stage class, its model loading, its
helpers, each in a module named for what it holds) and its `__init__.py` names two things: the
`LabelStage` subclass (see pipeline/stage.py for the contract) in `STAGE = MyStage`, and its
manifest section's pydantic model (built on `pipeline.config.StrictConfig`) in
`CONFIG = MyConfig`; nothing else registers it. The manifest's `stages.<name>` section, typed by
that `CONFIG`, selects and configures it (docs/stages.md). What more than one stage or the
trainer reads (the label PNG codecs, shards IO) lives in pipeline/ itself.

Names are listed without importing any stage package; `stage_class` and `stage_config_class`
import the one asked for (a stage imports numpy and pyarrow; torch only in `setup()`).
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
    """Names of the stage packages in this folder, sorted (no import of any of them)."""
    return sorted(
        m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and not m.name.startswith("_")
    )


def _attribute(name: str, attr: str, what: str):
    if name not in available_stages():
        raise ValueError(f"stages.{name}: unknown stage, known: {available_stages()}")
    package = importlib.import_module(f"{__name__}.{name}")
    if not hasattr(package, attr):
        raise ValueError(f"pipeline/stages/{name}/__init__.py: defines no {attr} = <{what}>")
    return getattr(package, attr)


def stage_class(name: str) -> type[LabelStage]:
    """The stage class the package `pipeline/stages/<name>/` names in its `STAGE` attribute."""
    return _attribute(name, "STAGE", "stage class")


def stage_config_class(name: str) -> type[StrictConfig]:
    """The manifest section model (`stages.<name>`) the stage package names in `CONFIG`."""
    return _attribute(name, "CONFIG", "config class")
