"""Sources as users really name them: odd folder names, symlink loops, non-UTF-8 names, files
that are not images, and malformed lists or Parquet files (one line naming file and row)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.ingest import ingest, read_sources
from pipeline.manifest import ManifestError, load_manifest
from pipeline.shards import Layout
from tests.conftest import encode, synthetic_image


def _ingest(tmp_path: Path, path: str, **src):
    m = tmp_path / "m.yaml"
    m.write_text(
        yaml.safe_dump(
            {"output_dir": "out", "shard_size": 8, "sources": [{"name": "s", "path": path, **src}]}
        )
    )
    return ingest(load_manifest(m), progress=False)


def _jpg(folder: Path, name: str | bytes, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else folder / name
    with open(target, "wb") as f:
        f.write(encode(synthetic_image(seed, (24, 20))))


def test_an_existing_folder_is_taken_literally_even_with_glob_characters(tmp_path):
    folder = tmp_path / "Summer [2023]"
    _jpg(folder, "a.jpg", 1)
    _jpg(folder, "b?.jpg", 2)
    res = _ingest(tmp_path, "Summer [2023]")
    assert res.new == 2, res.summary()


def test_a_glob_does_not_follow_a_symlink_loop(tmp_path):
    _jpg(tmp_path / "loop" / "sub", "x.jpg", 3)
    (tmp_path / "loop" / "sub" / "again").symlink_to(tmp_path / "loop")
    res = _ingest(tmp_path, "loop/**/*.jpg")
    assert (res.new, res.duplicates) == (1, 0), res.summary()
    assert read_sources(Layout(tmp_path / "out")).column("path").to_pylist() == ["sub/x.jpg"]
    # a folder source does not enter it either
    res = _ingest(tmp_path, "loop")
    assert res.sources["s"].files == 1


def test_empty_sources_and_files_not_read_are_reported(tmp_path):
    (tmp_path / "empty").mkdir()
    assert (
        _ingest(tmp_path, "empty").summary().endswith("source s: no files at all (check its path)")
    )
    d = tmp_path / "mixed"
    _jpg(d, "ok.jpg", 1)
    _jpg(d, ".hidden.jpg", 2)
    _jpg(d, "README", 3)
    _jpg(d, "notes.txt", 4)
    res = _ingest(tmp_path, "mixed")
    c = res.sources["s"]
    assert (c.files, c.hidden, c.no_extension, c.other_extension) == (1, 1, 1, 1)
    assert "not read: 1 hidden, 1 without an extension, 1 with a non-image extension" in (
        res.summary()
    )


def test_a_name_that_is_not_utf8_is_stored_with_its_bytes_escaped(tmp_path):
    _jpg(tmp_path / "imgs", b"caf\xe9.jpg", 1)
    _jpg(tmp_path / "imgs", "ok.jpg", 2)
    res = _ingest(tmp_path, "imgs")
    assert res.new == 2, res.summary()
    paths = read_sources(Layout(tmp_path / "out")).column("path").to_pylist()
    assert sorted(paths) == ["caf\\xe9.jpg", "ok.jpg"]
    assert _ingest(tmp_path, "imgs").skipped == 2  # the same name every run: not read again


@pytest.mark.parametrize(
    "line, says",
    [
        ('{"path": 5}', "list.jsonl:2: 'path'/'image' must be a non-empty string, got int 5"),
        ('["a.jpg"]', "list.jsonl:2: expected a JSON object"),
        ("{not json", "list.jsonl:2: expected a JSON object"),
    ],
)
def test_a_wrong_jsonl_entry_names_file_and_line(tmp_path, line, says):
    _jpg(tmp_path, "a.jpg", 1)
    (tmp_path / "list.jsonl").write_text('{"path": "a.jpg"}\n' + line + "\n")
    with pytest.raises(ManifestError, match=None) as info:
        _ingest(tmp_path, "list.jsonl")
    assert says in str(info.value)


def test_a_parquet_source_with_a_wrong_typed_image_column_names_file_and_column(tmp_path):
    pq.write_table(pa.table({"image": pa.array([1, 2], pa.int64())}), tmp_path / "src.parquet")
    with pytest.raises(ManifestError, match=r"src.parquet: column 'image' is int64; expected"):
        _ingest(tmp_path, "src.parquet")


def test_a_corrupt_source_parquet_is_one_line_naming_it(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"image": [encode(synthetic_image(1, (24, 20)))]}), good)
    (tmp_path / "src.parquet").write_bytes(good.read_bytes()[:-20])
    with pytest.raises(ManifestError, match=r"src.parquet: not a readable Parquet file"):
        _ingest(tmp_path, "src.parquet")


def test_a_list_that_is_not_utf8_names_file_and_line(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"a.jpg\nb\xff.jpg\n")
    with pytest.raises(ManifestError, match=r"list.txt:2: not UTF-8 text"):
        _ingest(tmp_path, "list.txt")


def test_path_lists_split_on_newlines_only(tmp_path):
    """A file name may hold U+2028 or U+0085; JSON allows them unescaped in strings. Split with
    str.splitlines, the valid JSONL was refused and the text list read half names."""
    names = ["a\u2028b.jpg", "c\x85d.jpg", "e\u2029f.jpg"]
    for i, name in enumerate(names):
        _jpg(tmp_path / "imgs", name, i)
    rows = [json.dumps({"path": f"imgs/{n}"}, ensure_ascii=False) for n in names]
    (tmp_path / "list.jsonl").write_text("\r\n".join(rows) + "\n", encoding="utf-8")
    assert _ingest(tmp_path, "list.jsonl").new == 3
    (tmp_path / "list.txt").write_text("".join(f"imgs/{n}\n" for n in names), encoding="utf-8")
    result = _ingest(tmp_path, "list.txt")  # the same occurrences: found whole, not read again
    assert result.skipped == 3 and result.quarantined == 0


def test_a_deeply_nested_jsonl_row_is_one_line(tmp_path):
    """A RecursionError traceback before."""
    _jpg(tmp_path, "a.jpg", 1)
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "list.jsonl").write_text('{"path": "a.jpg"}\n' + deep + "\n")
    with pytest.raises(ManifestError) as info:
        _ingest(tmp_path, "list.jsonl")
    assert str(info.value).startswith(f"{tmp_path / 'list.jsonl'}:2: JSON nested too deeply")
