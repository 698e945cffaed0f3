"""Reading the text files a manifest names: source path lists (`.txt`, `.jsonl`) and the
understanding conversations (JSON or JSON Lines). UTF-8 only; every problem is one InputError
line naming the file and the line, and the command line exits 2 as for the manifest itself.

JSON Lines are split on "\\n" alone (a "\\r" before it is dropped): `str.splitlines` also splits
at U+2028, U+2029, U+0085 and U+001C-U+001E, which JSON allows unescaped inside strings, so valid
JSONL was refused. JSON nested deeper than Python's recursion limit is refused by name instead
of a RecursionError traceback.

Usage:
    from pipeline.input_files import json_lines, parse_json, read_text
    for where, row in json_lines(path): ...
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.manifest import ManifestError

__all__ = ["InputError", "json_lines", "lines", "parse_json", "read_text"]


class InputError(ManifestError):
    """An input file the manifest names cannot be read (not UTF-8, not JSON, nested too
    deeply). The message names the file and the line or row."""


def read_text(path: str | Path) -> str:
    """The file as UTF-8 text (a byte-order mark is dropped); InputError naming the file and
    the line of the first byte that is not UTF-8."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text ({exc.reason}, byte {exc.start}); save it as UTF-8"
        ) from None


def lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, line) split on "\\n" only, a trailing "\\r" dropped."""
    for i, line in enumerate(text.split("\n"), 1):
        yield i, line.removesuffix("\r")


def parse_json(text: str, where: str, expected: str | None = None) -> Any:
    """`json.loads(text)`, with InputError naming `where` (`file` or `file:line`) and, when
    given, what was `expected` there."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        said = f"expected {expected}" if expected else "not valid JSON"
        raise InputError(f"{where}: {said} ({exc})") from None
    except RecursionError:
        raise InputError(
            f"{where}: JSON nested too deeply to read (deeper than Python's recursion limit)"
        ) from None


def json_lines(
    path: str | Path, text: str | None = None, expected: str | None = None
) -> Iterator[tuple[str, Any]]:
    """(`file:line`, value) for every non-blank line of a JSON Lines file (`text`: its text,
    when read already)."""
    text = read_text(path) if text is None else text
    for i, line in lines(text):
        if line.strip():
            yield f"{path}:{i}", parse_json(line, f"{path}:{i}", expected)
