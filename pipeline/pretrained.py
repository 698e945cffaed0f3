"""Loading a transformers folder without ever running code from it.

A model folder's configs can name Python files of their own (`auto_map` in config.json,
tokenizer_config.json, processor or preprocessor config). transformers imports and runs them
when `trust_remote_code` is true, and when it is unset it asks on the terminal (answering y ran
the folder's code). Every transformers load in unimrg goes through `from_pretrained` here, which
passes `trust_remote_code=False`: a folder whose classes transformers has built in loads with
those, one that needs its own code is refused with one line naming the folder and the code it
asked for. tests/test_remote_code.py checks no `.from_pretrained(` call elsewhere leaves it out.

Usage:
    from pipeline.pretrained import from_pretrained
    tokenizer = from_pretrained(AutoTokenizer, path)
    model = from_pretrained(JanusForConditionalGeneration, path, dtype=torch.float32)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CustomCodeRefused", "custom_code", "from_pretrained"]

#: The config files transformers reads `auto_map` from.
_CONFIGS = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "image_processor_config.json",
)


class CustomCodeRefused(ValueError):
    """The folder needs code of its own to load, and unimrg never runs a model folder's code."""


def from_pretrained(cls: Any, path: str | Path, /, **kwargs: Any) -> Any:
    """`cls.from_pretrained(path, trust_remote_code=False, **kwargs)`, with transformers'
    custom-code refusal (a multi-line text that says to pass `trust_remote_code=True`) as one
    CustomCodeRefused line naming the folder."""
    try:
        return cls.from_pretrained(path, trust_remote_code=False, **kwargs)
    except ValueError as exc:
        if "custom code" not in str(exc) and "trust_remote_code" not in str(exc):
            raise
        names = ", ".join(custom_code(path)) or "code of its own"
        raise CustomCodeRefused(
            f"{path}: {getattr(cls, '__name__', cls)} would have to run code from the model "
            f"folder ({names}); unimrg never runs a model folder's code "
            "(trust_remote_code=False): use a model whose classes transformers has built in"
        ) from None


def custom_code(path: str | Path) -> list[str]:
    """The classes a local folder's configs ask to load from its own files (`auto_map`)."""
    found: set[str] = set()

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                if key == "auto_map" and isinstance(value, dict):
                    for ref in value.values():
                        refs = ref if isinstance(ref, list) else [ref]
                        found.update(str(r) for r in refs if r)
                elif isinstance(value, dict):
                    walk(value)

    for name in _CONFIGS:
        try:
            walk(json.loads((Path(path) / name).read_text()))
        except (OSError, ValueError, RecursionError):
            continue
    return sorted(found)
