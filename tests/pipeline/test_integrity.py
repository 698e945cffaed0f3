"""Nothing mispaired, nothing lost: label shards are bound to their input, bad files are set
aside (kept) and made again, shard numbers are never reused (pipeline/integrity.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.fingerprint import fingerprint
from pipeline.ingest import ingest
from pipeline.integrity import BINDING_SHA256, label_shard_problem
from pipeline.manifest import load_manifest
from pipeline.shards import Layout, read_unimrg_metadata, shard_number
from pipeline.stage import LabelStage, run_shard, run_stage
from tests.conftest import encode, synthetic_image, write_image_shard


@dataclass
class WidthStage(LabelStage):
    """A cheap real stage: each label row is the image's width. Counts what it computes."""

    name: ClassVar[str] = "width"
    version: ClassVar[str] = "1"
    batch_size: int = 2
    computed: list[int] = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg, manifest):
        return cls()

    def setup(self):
        pass

    def fingerprint(self):
        return fingerprint({"stage": self.name, "version": self.version})

    def schema(self):
        return pa.schema([("image_id", pa.string()), ("error", pa.string()), ("w", pa.int32())])

    def process(self, batch):
        ids, ws = batch.column("image_id").to_pylist(), batch.column("width").to_pylist()
        self.computed.extend(ws)
        return [{"image_id": i, "error": None, "w": w} for i, w in zip(ids, ws)]


def _ids(path: Path) -> list[str]:
    return pq.read_table(path, columns=["image_id"]).column(0).to_pylist()


def _assert_aligned(layout: Layout, stage: LabelStage) -> None:
    fp = stage.fingerprint()
    for shard in layout.image_shards():
        label = layout.label_shard(stage.name, fp, shard_number(shard))
        assert _ids(label) == _ids(shard), f"{label} is not the labels of {shard}"


def _manifest(ws: Path) -> Path:
    path = ws / "m.yaml"
    path.write_text(
        yaml.safe_dump(
            {"output_dir": "out", "shard_size": 2, "sources": [{"name": "s", "path": "imgs"}]}
        )
    )
    return path


def _add(ws: Path, seeds) -> None:
    (ws / "imgs").mkdir(exist_ok=True)
    for s in seeds:
        (ws / "imgs" / f"{s:03d}.jpg").write_bytes(encode(synthetic_image(s, (40 + s, 32))))


def test_a_lost_image_shard_never_pairs_its_labels_with_other_images(tmp_path):
    """The misalignment repro: ingest and label, lose the last image shard, re-ingest and add
    one new image. The old label shard must not be taken for the new images, and the lost
    images come back."""
    _add(tmp_path, range(4))
    m = load_manifest(_manifest(tmp_path))
    layout = Layout(m.out)
    ingest(m, progress=False)
    stage = WidthStage()
    run_stage(stage, layout)
    lost = _ids(layout.image_shard(1))
    layout.image_shard(1).unlink()

    _add(tmp_path, [9])
    res = ingest(m, progress=False)
    assert res.new == 3, res.summary()  # the two lost images and the new one
    numbers = [shard_number(p) for p in layout.image_shards()]
    assert numbers == [0, 2, 3], "shard number 1 was written once and must not be reused"
    stored = {i for p in layout.image_shards() for i in _ids(p)}
    assert set(lost) <= stored

    results = run_stage(stage, layout)
    assert [r.computed for r in results] == [False, True, True]
    _assert_aligned(layout, stage)


def test_a_label_shard_is_bound_to_its_input_content(image_shards: Layout):
    """Same shard number, different images (a shard written by another tool, a restored
    backup): the label shard's recorded input hash no longer matches, so it is recomputed and
    the old one kept aside."""
    stage = WidthStage()
    first = run_shard(stage, image_shards, image_shards.image_shard(1))
    kv = read_unimrg_metadata(first.path)
    assert kv[BINDING_SHA256]  # the binding is in the Parquet key-value metadata

    write_image_shard(image_shards, 1, [synthetic_image(50 + i, (30, 20)) for i in range(2)])
    again = run_shard(stage, image_shards, image_shards.image_shard(1))
    assert again.computed and "different shard-00001.parquet" in again.note
    aside = list((Path(first.path).parent / "_aside").glob("shard-00001.parquet.*[0-9]"))
    assert len(aside) == 1
    assert label_shard_problem(Path(again.path), image_shards.image_shard(1)) is None
    _assert_aligned_one(image_shards, stage, 1)
    # and reuse when nothing changed
    assert not run_shard(stage, image_shards, image_shards.image_shard(1)).computed


def test_a_truncated_label_shard_is_set_aside_and_recomputed(image_shards: Layout):
    from pipeline.stage_status import stage_status

    stage = WidthStage()
    res = run_shard(stage, image_shards, image_shards.image_shard(0))
    path = Path(res.path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    class M:  # what stage_status needs of a manifest: the stage is built from it
        out = image_shards.root

    import pipeline.stage as stage_mod

    real = stage_mod.build_stage
    stage_mod.build_stage = lambda name, m: stage
    try:
        st = stage_status("width", M, image_shards)
    finally:
        stage_mod.build_stage = real
    assert st.corrupt == 1 and str(path) in st.corrupt_shards
    assert "unreadable Parquet" in st.corrupt_shards[str(path)]
    assert path.read_bytes() == data[: len(data) // 2], "status moves nothing"

    again = run_shard(stage, image_shards, image_shards.image_shard(0))
    assert again.computed and "unreadable Parquet" in again.note
    kept = [p for p in (path.parent / "_aside").iterdir() if not p.name.endswith(".why.txt")]
    assert [p.read_bytes() for p in kept] == [data[: len(data) // 2]], "the bad file is kept"
    _assert_aligned_one(image_shards, stage, 0)


def _assert_aligned_one(layout: Layout, stage: LabelStage, n: int) -> None:
    label = layout.label_shard(stage.name, stage.fingerprint(), n)
    assert _ids(label) == _ids(layout.image_shard(n))


def test_a_label_shard_with_other_rows_is_recomputed(image_shards: Layout):
    """An unbound label shard (written before the binding existed) is trusted only when its
    image_ids match the image shard row by row."""
    stage = WidthStage()
    label = image_shards.label_shard("width", stage.fingerprint(), 0)
    ids = _ids(image_shards.image_shard(0))
    rows = {"image_id": ids[::-1], "error": [None] * 3, "w": [1, 2, 3]}
    label.parent.mkdir(parents=True)
    pq.write_table(pa.table(rows, schema=stage.schema()), label)
    assert "row 0 is image" in label_shard_problem(label, image_shards.image_shard(0))
    rows["image_id"] = ids
    pq.write_table(pa.table(rows, schema=stage.schema()), label)
    assert label_shard_problem(label, image_shards.image_shard(0)) is None
    assert not run_shard(stage, image_shards, image_shards.image_shard(0)).computed


def test_a_corrupt_image_shard_is_set_aside_and_its_images_ingested_again(tmp_path, capsys):
    from flows.status import collect_status

    _add(tmp_path, range(4))
    m = load_manifest(_manifest(tmp_path))
    layout = Layout(m.out)
    ingest(m, progress=False)
    bad = layout.image_shard(0)
    lost = _ids(bad)
    bad.write_bytes(bad.read_bytes()[:100])

    st = collect_status(m)
    assert str(bad) in st["images"]["corrupt"]

    res = ingest(m, progress=False)
    assert res.new == 2 and len(res.set_aside) == 1 and str(bad) in res.set_aside[0]
    assert list((layout.images_dir / "_aside").glob("shard-00000.parquet.*"))
    stored = [i for p in layout.image_shards() for i in _ids(p)]
    assert sorted(stored) == sorted(set(stored)) and set(lost) <= set(stored)
    assert [shard_number(p) for p in layout.image_shards()] == [1, 2]
    assert collect_status(m)["images"]["corrupt"] == {}
