"""The building blocks of manifest sections: a strict, frozen pydantic base and checked numbers.

pipeline/manifest.py builds the manifest from them, and each label stage's file
(pipeline/stages/<name>.py) builds its own section, `stages.<name>`, from them too.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

__all__ = ["PosFloat", "PosInt", "StrictConfig"]


class StrictConfig(BaseModel):
    """A manifest section: unknown fields are errors, values are frozen once parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


def _positive_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError("expected a positive integer")
    return v


def _positive_number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError("expected a positive number")
    return float(v)


PosInt = Annotated[int, BeforeValidator(_positive_int)]
PosFloat = Annotated[float, BeforeValidator(_positive_number)]
