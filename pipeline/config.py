"""The building blocks of manifest sections: a strict, frozen pydantic base and checked numbers.

pipeline/manifest.py builds the manifest from them, and each label stage's package
(pipeline/stages/<name>/) builds its own section, `stages.<name>`, from them too. `resolve_path`
is how every path in the manifest is read: relative to the manifest's folder.
Every float field of every section refuses `nan` and `inf` (`allow_inf_nan=False`): a loss
weight of `.inf` or an lr of `.nan` would train a diverged model without a word.
"""

from __future__ import annotations

import math
import reprlib
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["PosFloat", "PosInt", "StrictConfig", "resolve_path", "short_repr"]


class StrictConfig(BaseModel):
    """A manifest section: unknown fields are errors, values are frozen once parsed, and
    floats are finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)


def resolve_path(p: str | Path, base_dir: Path | None) -> Path:
    """A path from the manifest (`~` expanded), made absolute against `base_dir`, the
    manifest's folder (left relative when there is none)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() or base_dir is None else Path(base_dir) / p


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 2, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40
#: Longest value an error message shows.
SHORT_REPR_CHARS = 80


def short_repr(value: Any) -> str:
    """`repr(value)` cut to a few levels and SHORT_REPR_CHARS characters: what an error message
    shows of a bad value. A YAML alias bomb (a list of ten references to a list of ten ...)
    is small in memory but its full repr is not; reprlib never walks past the cut."""
    text = _SHORT.repr(value)
    return text if len(text) <= SHORT_REPR_CHARS else text[: SHORT_REPR_CHARS - 3] + "..."


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError("expected a positive integer")
    return v


def _positive_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError("expected a positive number")
    if not math.isfinite(v):
        raise ValueError("expected a finite number (not nan or inf)")
    return float(v)


PosInt = Annotated[int, BeforeValidator(_positive_int)]
PosFloat = Annotated[float, BeforeValidator(_positive_number)]
