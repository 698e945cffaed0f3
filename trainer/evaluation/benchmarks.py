"""Benchmark files in VLMEvalKit's TSV layout: reading, checking, images and prompts.

One row per question, tab-separated, with a header. Columns:
    index                       unique id of the question (kept as text)
    image | image_path          base64 image bytes, or a path relative to the TSV's folder (a
                                regular file inside that folder, symlinks resolved first); a
                                short `image` value naming another row's index reuses its image.
                                One image per question: a JSON list of images (VLMEvalKit's
                                multi-image rows) is refused, naming the row
    question                    the question text
    A .. H                      the options (multiple-choice kinds `mcq`, `mmvp`)
    answer                      an option letter (mcq, mmvp) or Yes / No (yesno, pope,
                                hallusionbench)
    hint, category, l2-category optional
    set_id, figure_id, question_id   HallusionBench grouping (else read from the index, as
                                VLMEvalKit does: fields 3, 4, 5 of the index split on '_')

A bad file is one `BenchmarkError` line naming the file and the row or column. The file is
UTF-8 (a byte-order mark before the header is allowed) and read a line at a time, so reading it
needs little more memory than its rows. Nothing here is fetched: docs/eval.md says where each
benchmark's TSV comes from.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import csv
import json
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "OPTION_LETTERS",
    "BenchmarkError",
    "build_prompt",
    "image_file",
    "image_files",
    "load_image",
    "options_of",
    "read_benchmark",
]

KINDS = ("mcq", "yesno", "mmvp", "pope", "hallusionbench")
MULTIPLE_CHOICE = ("mcq", "mmvp")
OPTION_LETTERS = tuple("ABCDEFGH")
_HALLUSION_IDS = ("set_id", "figure_id", "question_id")


class BenchmarkError(ValueError):
    """A benchmark file that cannot be used (the message names the file and row or column)."""


def _missing(value: Any) -> bool:
    # VLMEvalKit writes pandas NaN for empty cells: both read back as an empty field or 'nan'.
    return value is None or str(value).strip() == "" or str(value).strip().lower() == "nan"


def options_of(row: dict[str, Any]) -> dict[str, str]:
    """The options A..H present (non-empty) in a row, in letter order."""
    return {k: str(row[k]) for k in OPTION_LETTERS if k in row and not _missing(row[k])}


def _yes_no(value: str) -> str | None:
    v = value.strip().lower()
    return {"yes": "Yes", "no": "No", "1": "Yes", "0": "No", "true": "Yes", "false": "No"}.get(v)


def read_benchmark(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """Rows of a benchmark TSV as dicts keyed by column name, checked for `kind`.

    Empty cells are left out of a row. `answer` is normalised (option letter upper-case, or
    'Yes'/'No'); HallusionBench rows always carry set_id, figure_id and question_id.
    """
    path = Path(path)
    if kind not in KINDS:
        raise BenchmarkError(f"{path}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: benchmark file not found") from None
    with f:
        return _read_rows(csv.reader(_text_lines(f, path), delimiter="\t"), path, kind)


def _text_lines(f, path: Path) -> Iterator[str]:
    """The lines of binary file `f` decoded one at a time (a BOM before the first dropped): a
    byte that is not UTF-8 is an error naming its line, and no copy of the whole text is made."""
    for n, raw in enumerate(f, start=1):
        if n == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BenchmarkError(
                f"{path}: line {n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
            ) from None


def _read_rows(reader, path: Path, kind: str) -> list[dict[str, Any]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    try:
        header = next(reader)
    except StopIteration:
        raise BenchmarkError(f"{path}: empty file (expected a header row)") from None
    header = [h.strip() for h in header]
    need = ["index", "question", "answer"]
    for col in need:
        if col not in header:
            raise BenchmarkError(f"{path}: missing column {col!r} (header: {', '.join(header)})")
    if "image" not in header and "image_path" not in header:
        raise BenchmarkError(f"{path}: missing column 'image' or 'image_path'")
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise BenchmarkError(f"{path}: duplicate column {dup[0]!r}")
    if kind in MULTIPLE_CHOICE and not {"A", "B"} <= set(header):
        raise BenchmarkError(f"{path}: missing option columns 'A' and 'B' for kind {kind!r}")

    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line_no, cells in enumerate(reader, start=2):
        if not cells or all(not c.strip() for c in cells):
            continue
        where = f"{path}: row {line_no - 1} (line {line_no})"
        if len(cells) != len(header):
            raise BenchmarkError(f"{where}: {len(cells)} fields, header has {len(header)}")
        row = {h: c for h, c in zip(header, cells, strict=True) if not _missing(c)}
        for col in need:
            if col not in row:
                raise BenchmarkError(f"{where}: empty {col!r}")
        if "image" not in row and "image_path" not in row:
            raise BenchmarkError(f"{where}: empty 'image' and 'image_path'")
        for col in ("image", "image_path"):
            n = _image_list(row.get(col))
            if n is not None:
                raise BenchmarkError(
                    f"{where}: {col!r} holds a list of {n} images (a VLMEvalKit multi-image "
                    "question); unimrg asks each question about one image, so multi-image "
                    "benchmarks are not supported"
                )
        index = row["index"] = row["index"].strip()
        if index in seen:
            raise BenchmarkError(f"{where}: index {index!r} repeats row {seen[index]}")
        seen[index] = line_no - 1
        row["answer"] = _check_answer(row, kind, where)
        if kind == "hallusionbench":
            _hallusion_ids(row, where)
        rows.append(row)
    if not rows:
        raise BenchmarkError(f"{path}: no questions")
    _check_image_refs(rows, path)
    if kind == "mmvp":
        _check_pairs(rows, path)
    return rows


def _image_list(value: str | None) -> int | None:
    """How many images a cell lists when it is a JSON list (base64 never starts with '[')."""
    if value is None or not value.lstrip().startswith("["):
        return None
    try:
        images = json.loads(value)
    except ValueError:
        return None
    return len(images) if isinstance(images, list) else None


def _check_answer(row: dict[str, Any], kind: str, where: str) -> str:
    answer = row["answer"].strip()
    if kind in MULTIPLE_CHOICE:
        options = options_of(row)
        if len(options) < 2:
            raise BenchmarkError(f"{where}: fewer than two options in columns A..H")
        if answer.upper() not in options:
            raise BenchmarkError(
                f"{where}: 'answer' {answer!r} is not one of the options {', '.join(options)}"
            )
        return answer.upper()
    yn = _yes_no(answer)
    if yn is None:
        raise BenchmarkError(f"{where}: 'answer' {answer!r} is not Yes or No")
    return yn


def _hallusion_ids(row: dict[str, Any], where: str) -> None:
    if all(k in row for k in _HALLUSION_IDS):
        return
    parts = row["index"].split("_")
    if len(parts) < 6:
        missing = [k for k in _HALLUSION_IDS if k not in row]
        raise BenchmarkError(
            f"{where}: no {missing[0]!r} column and the index {row['index']!r} does not hold it "
            "(VLMEvalKit's form: fields 3, 4, 5 of the index split on '_')"
        )
    for k, part in zip(_HALLUSION_IDS, parts[3:6], strict=True):
        row.setdefault(k, part)


def _check_image_refs(rows: list[dict[str, Any]], path: Path) -> None:
    # VLMEvalKit stores an image once and lets later rows name the row holding it by index.
    by_index = {r["index"]: r for r in rows}
    for n, row in enumerate(rows, start=1):
        ref = row.get("image")
        if ref is not None and len(ref) <= 64 and ref in by_index:
            target = by_index[ref].get("image")
            if target is None or (len(target) <= 64 and target in by_index):
                raise BenchmarkError(f"{path}: row {n}: 'image' names row {ref!r} with no image")
            row["image"] = target


def _check_pairs(rows: list[dict[str, Any]], path: Path) -> None:
    # MMVP: questions come in consecutive pairs (two images, one question), as VLMEvalKit pairs them.
    if len(rows) % 2:
        raise BenchmarkError(f"{path}: MMVP needs pairs of rows, found {len(rows)} rows")
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        if a["question"].strip() != b["question"].strip():
            raise BenchmarkError(
                f"{path}: rows {i + 1} and {i + 2} (index {a['index']!r}, {b['index']!r}) "
                "are an MMVP pair but ask different questions"
            )


def image_file(
    row: dict[str, Any], base_dir: str | Path, benchmark: str | Path | None = None
) -> Path:
    """The file a row's `image_path` names, resolved (symlinks and '..' included) and checked
    to be a regular file inside `base_dir` (the benchmark's folder): nothing else on the
    machine is read, and no device or FIFO (which would fill memory or wait forever).
    BenchmarkError names the benchmark file (when given), the row's index and the path."""
    base = Path(base_dir).resolve()
    value = row["image_path"]
    where = f"{benchmark}: " if benchmark is not None else ""
    where += f"index {row['index']!r}: image_path {value!r}"
    target = (base / value).resolve()
    if not target.is_relative_to(base):
        raise BenchmarkError(f"{where}: outside the benchmark's folder {base} (it is {target})")
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise BenchmarkError(f"{where}: not found ({target})") from None
    except OSError as e:
        raise BenchmarkError(f"{where}: {target}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise BenchmarkError(f"{where}: not a regular file ({target})")
    return target


def image_files(path: str | Path, kind: str) -> dict[str, Path] | None:
    """index -> image file of every row of benchmark `path` that reads its image from a file
    (`image_file`: confined, regular); None when the file has no `image_path` column (only its
    header is read then). What an evaluation's cache key covers besides the TSV itself."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            header = next(_text_lines(f, path), "")
    except FileNotFoundError:
        raise BenchmarkError(f"{path}: benchmark file not found") from None
    if "image_path" not in (h.strip() for h in header.rstrip("\r\n").split("\t")):
        return None
    return {
        r["index"]: image_file(r, path.parent, path)
        for r in read_benchmark(path, kind)
        if "image" not in r  # load_image prefers the base64 image
    }


def load_image(
    row: dict[str, Any], base_dir: str | Path, benchmark: str | Path | None = None
) -> Any:
    """The row's image as an RGB PIL image (base64 `image`, else `image_path`, a regular file
    under base_dir: `image_file`). Errors name `benchmark` (the TSV) when given."""
    from pipeline.images import decode_rgb

    if "image" in row:
        try:
            data = base64.b64decode(row["image"], validate=False)
        except (binascii.Error, ValueError) as e:
            raise BenchmarkError(f"index {row['index']!r}: 'image' is not base64 ({e})") from None
        source = f"index {row['index']!r} base64 image"
        if benchmark is not None:
            source = f"{benchmark}: {source}"
    else:
        p = image_file(row, base_dir, benchmark)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise BenchmarkError(f"index {row['index']!r}: image_path {p}: {e.strerror}") from None
        source = str(p)
    try:
        return decode_rgb(data)
    except Exception as e:  # PIL raises several types for bad bytes
        raise BenchmarkError(f"{source}: not a readable image ({e})") from None


def build_prompt(kind: str, row: dict[str, Any]) -> str:
    """The question text given to the model (the adapter adds the image and its chat format).

    VLMEvalKit's prompts for Janus, which are also LLaVA-v1.5's short-answer phrasings (the
    understanding data UniMRG trains on): options listed one per line and "Answer with the
    option's letter from the given choices directly."; yes/no questions with "Answer the
    question using a single word or phrase." (POPE's own " Please answer yes or no." removed).
    """
    question = str(row["question"])
    if kind in MULTIPLE_CHOICE:
        prompt = f"Hint: {row['hint']}\n" if "hint" in row else ""
        prompt += f"{question}\n"
        prompt += "".join(f"{k}. {v}\n" for k, v in options_of(row).items())
        return prompt + "Answer with the option's letter from the given choices directly."
    if kind == "pope":
        question = question.replace(" Please answer yes or no.", "")
    return f"{question}\nAnswer the question using a single word or phrase."
