"""Generate docs/manifest.md, the manifest reference, from the typed models.

    python -m pipeline.manifest_docs > docs/manifest.md

The models in pipeline/manifest.py (and each label stage's `CONFIG` in pipeline/stages/) are the
truth; a test checks the page lists every field.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from collections.abc import Iterator

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from pipeline.manifest import Manifest

__all__ = ["iter_fields", "render"]


def _submodel(annotation) -> type[BaseModel] | None:
    for a in (annotation, *typing.get_args(annotation)):
        for inner in (a, *typing.get_args(a)):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def iter_fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted path, field) for every user-facing field, depth first. Lists use `[]`."""
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        path = f"{prefix}{name}"
        yield path, info
        sub = _submodel(info.annotation)
        if sub is not None:
            is_list = typing.get_origin(info.annotation) is list
            yield from iter_fields(sub, f"{path}[]." if is_list else f"{path}.")


def _type_name(annotation) -> str:
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    if typing.get_origin(annotation) is typing.Annotated:  # PosInt: its validator's repr
        return _type_name(typing.get_args(annotation)[0])  # holds a memory address
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    # `pipeline.stages.depth.DepthConfig` -> `DepthConfig`
    return re.sub(r"\bpipeline(\.\w+)*\.(?=\w+\b)", "", str(annotation).replace("typing.", ""))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
        return "" if isinstance(value, BaseModel) else f"`{value}`"
    if info.default is PydanticUndefined:
        return "**required**"
    return f"`{info.default}`"


def render() -> str:
    lines = [
        "# Manifest reference (`data_manifest.yaml`)",
        "",
        "Generated from `pipeline/manifest.py` and the stages' `CONFIG` classes",
        "(`pipeline/stages/<name>/`) by `python -m pipeline.manifest_docs`; do not edit by hand.",
        "Paths are relative to the manifest file. A bad value fails before any work",
        "starts, with the field path: `stages.depth.batch_size: expected a positive integer, "
        "got 'big'`. Numbers must be finite (`.nan`, `.inf` are refused).",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for path, info in iter_fields(Manifest):
        typ = _type_name(info.annotation).replace("|", "or")
        lines.append(f"| `{path}` | {typ} | {_default(info)} | {info.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
