"""`unimrg status` names what made each fingerprint; `unimrg clean` removes the unused ones.
tiny-random labels: noise."""

from __future__ import annotations

import os
import time

import pyarrow as pa

from flows.clean import clean, plan_clean
from flows.status import collect_status, print_status
from pipeline.lineage import ensure_lineage
from pipeline.manifest import parse_manifest
from pipeline.shards import Layout, write_parquet_atomic
from pipeline.stage import build_stage, run_stage


def _manifest(root, input_size: int):
    return parse_manifest(
        {
            "output_dir": "out",
            "sources": [{"name": "s", "path": "imgs"}],
            "stages": {
                "depth": {"model": "tiny-random", "input_size": input_size, "batch_size": 4},
                "segment": {"model_type": "tiny-random"},
            },
        },
        base_dir=root,
    )


def _fake_segment(layout: Layout, fp: str) -> None:
    write_parquet_atomic(
        pa.table({"image_id": ["x"], "error": [None]}), layout.label_shard("segment", fp, 0)
    )


def test_status_names_fingerprints_and_clean_removes_exactly_the_unused(image_shards, capsys):
    root = image_shards.root.parent
    old, cur = _manifest(root, 42), _manifest(root, 28)
    old_depth, cur_depth = build_stage("depth", old), build_stage("depth", cur)
    run_stage(old_depth, image_shards)
    run_stage(cur_depth, image_shards)
    seg = build_stage("segment", cur)
    _fake_segment(image_shards, seg.fingerprint())
    ensure_lineage(image_shards.label_dir("segment", seg.fingerprint()), seg.lineage())
    _fake_segment(image_shards, "feedfacefeedface")  # an old folder without a lineage record
    run = image_shards.root / "train" / "0123456789abcdef"  # no trainer configured: unused
    (run / "step_000001").mkdir(parents=True)
    (run / "step_000001" / "x.bin").write_bytes(b"0" * 2048)
    stale_tmp = image_shards.images_dir / ".shard-00009.parquet.abc.tmp"
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (time.time() - 7200, time.time() - 7200))
    fresh_tmp = image_shards.images_dir / ".shard-00010.parquet.abc.tmp"
    fresh_tmp.write_bytes(b"writing")  # may belong to a run in progress: kept

    st = collect_status(cur)
    d = st["stages"]["depth"]
    assert d["made_by"] == "tiny-random input_size=28 dtype=float32 (random weights)"
    (other,) = d["others"]
    assert other["fingerprint"] == old_depth.fingerprint() and other["shards"] == 2
    assert "input_size=42" in other["made_by"] and other["bytes"] > 0
    assert st["stages"]["segment"]["made_by"].startswith("tiny-random points_per_side=32")
    assert [o["made_by"] for o in st["stages"]["segment"]["others"]] == ["no lineage record"]
    assert print_status(cur) == 0
    printed = capsys.readouterr().out
    assert "not used by this manifest" in printed and "input_size=42" in printed

    unused = {
        str(image_shards.label_dir("depth", old_depth.fingerprint())),
        str(image_shards.label_dir("segment", "feedfacefeedface")),
        str(run),
        str(stale_tmp),
    }
    capsys.readouterr()
    plan = clean(cur, dry_run=True)
    assert {r.path for r in plan.remove} == unused
    printed = capsys.readouterr().out
    assert "would free" in printed and all(p in printed for p in unused)
    assert all(os.path.exists(p) for p in unused)  # a dry run removes nothing

    freed = clean(cur)
    assert freed.bytes == plan.bytes > 2048
    assert not any(os.path.exists(p) for p in unused)
    assert image_shards.label_shards("depth", cur_depth.fingerprint())
    assert image_shards.label_shards("segment", seg.fingerprint())
    assert fresh_tmp.exists() and len(image_shards.image_shards()) == 2
    assert plan_clean(cur).remove == []


def test_clean_leaves_a_stage_alone_when_its_current_fingerprint_is_unknown(image_shards):
    m = parse_manifest(
        {
            "output_dir": "out",
            "sources": [{"name": "s", "path": "imgs"}],
            "stages": {"depth": {"model": "models/missing"}},
        },
        base_dir=image_shards.root.parent,
    )
    write_parquet_atomic(
        pa.table({"image_id": ["x"], "error": [None]}),
        image_shards.label_shard("depth", "aaaaaaaaaaaaaaaa", 0),
    )
    plan = plan_clean(m)
    assert plan.remove == [] and "labels/depth" in plan.skipped
