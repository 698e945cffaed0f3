"""Ingest: quarantine reasons, unusual-but-usable files, dedup, append-only shards, kill safety."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.ingest import ingest, read_sources
from pipeline.manifest import load_manifest
from pipeline.shards import Layout, read_quarantine
from tests.conftest import encode, synthetic_image


def _manifest(tmp_path: Path, sources: list[dict], **extra) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump({"output_dir": "out", "shard_size": 3, "sources": sources, **extra})
    )
    return path


def _stored(out: Path) -> list[dict]:
    rows = []
    for s in Layout(out).image_shards():
        rows += pq.read_table(s).to_pylist()
    return rows


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return folder / name


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".ingest.lock"
    }


def test_bad_inputs_are_quarantined_with_reasons(tmp_path):
    imgs = tmp_path / "imgs"
    good = encode(synthetic_image(0))
    _write(imgs, "good.jpg", good)
    _write(imgs, "empty.jpg", b"")
    _write(imgs, "truncated.jpg", good[: len(good) // 2])
    _write(imgs, "text.png", b"this is not an image at all")
    _write(imgs, "bomb.png", encode(Image.new("L", (200, 200)), "PNG"))
    (tmp_path / "list.txt").write_text("imgs/good.jpg\nmissing.jpg\nimgs\n")
    m = load_manifest(
        _manifest(
            tmp_path,
            [{"name": "dir", "path": "imgs"}, {"name": "list", "path": "list.txt"}],
            max_image_pixels=30_000,
        )
    )
    result = ingest(m, progress=False)

    reasons = {
        (r["source"], r["path"]): r["reason"] for r in read_quarantine(Layout(m.out)).to_pylist()
    }
    assert "0 bytes" in reasons[("dir", "empty.jpg")]
    assert "cannot decode" in reasons[("dir", "truncated.jpg")]
    assert "not an image" in reasons[("dir", "text.png")]
    assert (
        "decompression bomb" in reasons[("dir", "bomb.png")]
        and "40000" in reasons[("dir", "bomb.png")]
    )
    assert reasons[("list", "missing.jpg")] == "file not found"
    assert "unreadable" in reasons[("list", "imgs")]
    assert result.quarantined == 6
    assert [r["image"]["path"] for r in _stored(m.out)] == ["good.jpg"]
    assert result.new == 1 and result.duplicates == 1  # list's good.jpg is the same bytes


def _exif_rotated_jpeg() -> bytes:
    img = synthetic_image(3, (60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: displayed as 40 x 60
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [synthetic_image(i, (30, 20)).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def test_unusual_but_usable_files_are_kept(tmp_path):
    imgs = tmp_path / "imgs"
    base = synthetic_image(1, (50, 30))
    sixteen = Image.fromarray((np.arange(50 * 30).reshape(30, 50) * 40).astype(np.uint16))
    files = {
        "gray.png": encode(base.convert("L"), "PNG"),
        "palette.png": encode(base.convert("P"), "PNG"),
        "rgba.png": encode(base.convert("RGBA"), "PNG"),
        "cmyk.jpg": encode(base.convert("CMYK"), "JPEG"),
        "sixteen.png": encode(sixteen, "PNG"),
        "photo.webp": encode(base, "WEBP"),
        "photo.tiff": encode(base, "TIFF"),
        "anim.gif": _animated_gif(),
        "rotated.jpg": _exif_rotated_jpeg(),
    }
    for name, data in files.items():
        _write(imgs, name, data)
    m = load_manifest(_manifest(tmp_path, [{"name": "d", "path": "imgs"}]))
    result = ingest(m, progress=False)
    assert result.quarantined == 0, read_quarantine(Layout(m.out)).to_pylist()
    rows = {r["image"]["path"]: r for r in _stored(m.out)}
    assert set(rows) == set(files)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (40, 60)
    assert (rows["anim.gif"]["width"], rows["anim.gif"]["height"]) == (30, 20)
    for name, data in files.items():
        assert rows[name]["image"]["bytes"] == data, f"{name}: stored bytes must be the original"
        assert rows[name]["image_id"] == hashlib.sha256(data).hexdigest()


def test_duplicates_are_stored_once_and_every_occurrence_recorded(tmp_path):
    data = encode(synthetic_image(5))
    _write(tmp_path / "a", "x.jpg", data)
    _write(tmp_path / "a", "copy.jpg", data)
    _write(tmp_path / "b", "y.jpg", data)
    m = load_manifest(
        _manifest(tmp_path, [{"name": "a", "path": "a"}, {"name": "b", "path": "b/*.jpg"}])
    )
    result = ingest(m, progress=False)
    assert (result.new, result.duplicates) == (1, 2)
    assert len(_stored(m.out)) == 1
    occurrences = {(r["source"], r["path"]) for r in read_sources(Layout(m.out)).to_pylist()}
    assert occurrences == {("a", "copy.jpg"), ("a", "x.jpg"), ("b", "y.jpg")}


def test_append_only_and_idempotent(tmp_path):
    imgs = tmp_path / "imgs"
    for i in range(5):
        _write(imgs, f"{i:02d}.jpg", encode(synthetic_image(i)))
    m = load_manifest(_manifest(tmp_path, [{"name": "d", "path": "imgs"}]))
    ingest(m, progress=False)
    before = _snapshot(m.out)

    again = ingest(m, progress=False)
    assert (again.new, again.duplicates, again.quarantined, again.shards_written) == (0, 0, 0, [])
    assert _snapshot(m.out) == before, "a rerun with nothing new must write nothing"

    for i in range(5, 9):  # add K=4 images
        _write(imgs, f"{i:02d}.jpg", encode(synthetic_image(i)))
    result = ingest(m, progress=False)
    after = _snapshot(m.out)
    assert result.new == 4
    assert all(after[k] == v for k, v in before.items()), "existing files must stay byte-identical"
    new_shards = sorted(k for k in after if k.startswith("images/shard-") and k not in before)
    assert new_shards == ["images/shard-00002.parquet", "images/shard-00003.parquet"]
    assert len(_stored(m.out)) == 9


def test_parquet_and_jsonl_sources(tmp_path):
    import pyarrow as pa

    a, b = encode(synthetic_image(1)), encode(synthetic_image(2))
    _write(tmp_path / "imgs", "b.jpg", b)
    pq.write_table(
        pa.table({"image": [{"bytes": a, "path": "a.jpg"}, {"bytes": b"", "path": "bad.jpg"}]}),
        tmp_path / "ds.parquet",
    )
    (tmp_path / "list.jsonl").write_text(json.dumps({"path": "imgs/b.jpg"}) + "\n")
    m = load_manifest(
        _manifest(
            tmp_path, [{"name": "pq", "path": "ds.parquet"}, {"name": "jl", "path": "list.jsonl"}]
        )
    )
    result = ingest(m, progress=False)
    assert (result.new, result.quarantined) == (2, 1)
    assert {r["source"] for r in _stored(m.out)} == {"pq", "jl"}


def test_missing_source_and_bad_image_column_name_the_field(tmp_path):
    from pipeline.manifest import ManifestError

    m = load_manifest(_manifest(tmp_path, [{"name": "x", "path": "nope"}]))
    with pytest.raises(ManifestError, match=r"sources\[x\]\.path: .*nope does not exist"):
        ingest(m, progress=False)
    import pyarrow as pa

    pq.write_table(pa.table({"img": [b"x"]}), tmp_path / "d.parquet")
    m = load_manifest(_manifest(tmp_path, [{"name": "p", "path": "d.parquet"}]))
    with pytest.raises(ManifestError, match=r"sources\[p\]\.image_column: .*no column 'image'"):
        ingest(m, progress=False)


def test_datasets_reads_image_shards_as_images(tmp_path):
    datasets = pytest.importorskip("datasets")
    for i in range(4):
        _write(tmp_path / "imgs", f"{i}.png", encode(synthetic_image(i, (40 + i, 30)), "PNG"))
    m = load_manifest(_manifest(tmp_path, [{"name": "d", "path": "imgs"}]))
    ingest(m, progress=False)
    files = [str(p) for p in Layout(m.out).image_shards()]
    ds = datasets.load_dataset(
        "parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf")
    )
    assert isinstance(ds.features["image"], datasets.Image)
    assert len(ds) == 4
    for row in ds:
        assert isinstance(row["image"], Image.Image)
        assert row["image"].size == (row["width"], row["height"])


def _cli(manifest: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "ingest", "-q", "-m", str(manifest)]


def test_killed_ingest_finishes_on_rerun_without_duplicates_or_gaps(tmp_path):
    """Kill ingest while it is blocked mid-source, then rerun: every valid image exactly once."""
    imgs = tmp_path / "imgs"
    expected = set()
    names = []
    for i in range(10):
        data = encode(synthetic_image(100 + i))
        expected.add(hashlib.sha256(data).hexdigest())
        names.append(_write(imgs, f"{i:02d}.jpg", data).name)
    # A FIFO in the middle of a path list: reading it blocks until we kill the process, so the
    # kill always lands partway through (after some shards were written, before the end).
    fifo = tmp_path / "slow.jpg"
    os.mkfifo(fifo)
    lines = [f"imgs/{n}" for n in names[:7]] + ["slow.jpg"] + [f"imgs/{n}" for n in names[7:]]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    manifest = _manifest(tmp_path, [{"name": "l", "path": "list.txt"}])
    out = tmp_path / "out"

    proc = subprocess.Popen(_cli(manifest), cwd=Path(__file__).parents[2])
    deadline = time.time() + 60
    while len(Layout(out).image_shards()) < 2 and time.time() < deadline:
        assert proc.poll() is None, "ingest ended before it reached the blocking file"
        time.sleep(0.05)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = {r["image_id"] for r in _stored(out)}
    assert 0 < len(partial) < len(expected)

    fifo.unlink()
    last = encode(synthetic_image(999))
    fifo.write_bytes(last)
    expected.add(hashlib.sha256(last).hexdigest())
    subprocess.run(_cli(manifest), cwd=Path(__file__).parents[2], check=True)
    ids = [r["image_id"] for r in _stored(out)]
    assert len(ids) == len(set(ids)), "no image may be stored twice"
    assert set(ids) == expected, "every valid image must be stored"
    assert not list(out.rglob("*.tmp")), "the rerun clears temp files left by the killed run"
    assert all(p.name.startswith("shard-") for p in Layout(out).images_dir.glob("*.parquet"))


def test_killed_at_random_moments(tmp_path):
    """Kill at several arbitrary moments (mid-write included), rerun after each: invariants hold."""
    imgs = tmp_path / "imgs"
    expected = set()
    for i in range(24):
        data = encode(synthetic_image(200 + i, (64, 48)), "PNG")
        expected.add(hashlib.sha256(data).hexdigest())
        _write(imgs, f"{i:02d}.png", data)
    manifest = _manifest(tmp_path, [{"name": "d", "path": "imgs"}])
    out = tmp_path / "out"
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen(_cli(manifest), cwd=Path(__file__).parents[2])
        time.sleep(float(rng.uniform(0.3, 1.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ids = [r["image_id"] for r in _stored(out)]  # every visible shard must be readable
        assert len(ids) == len(set(ids))
    subprocess.run(_cli(manifest), cwd=Path(__file__).parents[2], check=True)
    ids = [r["image_id"] for r in _stored(out)]
    assert len(ids) == len(set(ids)) and set(ids) == expected


def test_reads_ahead_a_bounded_number_of_files():
    """Large sources must not be read into memory all at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.ingest import _bounded_map

    started, gate = [], threading.Event()

    def work(i):
        started.append(i)
        gate.wait(5)
        return i

    with ThreadPoolExecutor(2) as pool:
        gen = _bounded_map(pool, work, list(range(100)), ahead=4)
        gate.set()
        first = next(gen)
        assert first == 0 and len(started) <= 5
        assert list(gen) == list(range(1, 100))
