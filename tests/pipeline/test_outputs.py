"""What the pipeline writes is readable by others: file modes, provenance, lineage, datasets."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.manifest import parse_manifest
from pipeline.shards import AtomicFile, Layout, atomic_write_bytes, write_parquet_atomic
from tests.conftest import encode, synthetic_image


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


def _manifest(root: Path, **stages):
    return parse_manifest(
        {
            "output_dir": "out",
            "sources": [{"name": "imgs", "path": "imgs"}],
            "stages": stages
            or {
                "depth": {"model": "tiny-random", "input_size": 28, "batch_size": 2},
                "segment": {"model_type": "tiny-random", "points_per_side": 2, "device": "cpu"},
            },
        },
        base_dir=root,
    )


def _images(root: Path, n: int = 3) -> None:
    d = root / "imgs"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"{i}.jpg").write_bytes(encode(synthetic_image(i, (48, 40))))
    (d / "broken.jpg").write_bytes(b"not an image")  # goes to quarantine


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]
    }


def test_every_pipeline_output_is_readable_by_group_and_others(tmp_path, umask):
    from pipeline.ingest import ingest
    from pipeline.preview import make_preview
    from pipeline.stage import build_stage, run_stage

    umask(0o022)
    _images(tmp_path)
    m = _manifest(tmp_path)
    ingest(m, progress=False)
    for name in ("depth", "segment"):
        run_stage(build_stage(name, m), Layout(m.out))
    make_preview(m, m.out / "preview.png", n=2)
    modes = _modes(m.out)
    kinds = {Path(p).suffix for p in modes}
    assert {".parquet", ".png", ".json"} <= kinds, modes  # shards, quarantine, preview, lineage
    assert any(p.startswith("quarantine/") for p in modes)
    for p, mode in modes.items():
        want = 0o755 if (m.out / p).is_dir() else 0o644
        assert mode == want, f"{p}: {oct(mode)}"


def test_the_umask_is_applied_as_for_a_normal_open(tmp_path, umask):
    import pyarrow as pa

    umask(0o027)
    atomic_write_bytes(tmp_path / "a.bin", b"x")
    write_parquet_atomic(pa.table({"x": [1]}), tmp_path / "b.parquet")
    af = AtomicFile(tmp_path / "c.bin")
    af.file.write(b"y")
    af.commit()
    with open(tmp_path / "plain", "wb"):
        pass
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert plain == 0o640
    for name in ("a.bin", "b.parquet", "c.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.parquet", "c.bin", "plain"]


def test_an_aborted_atomic_file_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), AtomicFile(tmp_path / "x.bin") as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
