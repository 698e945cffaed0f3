"""Lineage records and shard metadata: a label folder says what made it (tiny-random: noise)."""

from __future__ import annotations

import re
import shutil
from dataclasses import fields
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.lineage import LINEAGE_FILE, read_lineage
from pipeline.manifest import parse_manifest
from pipeline.shards import Layout, read_unimrg_metadata
from pipeline.stage import build_stage, run_stage
from tests.conftest import fake_hub_cache

REQUIRED = {
    "kind",
    "stage",
    "stage_version",
    "fingerprint",
    "model",
    "parameters",
    "covers",
    "random_weights",
    "libraries",
    "created",
}


def _manifest(root: Path, out: Path, **stages):
    return parse_manifest(
        {"output_dir": str(out), "sources": [{"name": "s", "path": "x"}], "stages": stages},
        base_dir=root,
    )


def _check(stage, layout: Layout, spec: str, revision, random_weights: bool) -> dict:
    fp = stage.fingerprint()
    folder = layout.label_dir(stage.name, fp)
    rec = read_lineage(folder)
    assert rec is not None and REQUIRED <= set(rec), rec
    assert rec["kind"] == "labels" and rec["stage"] == stage.name
    assert rec["stage_version"] == stage.version and rec["fingerprint"] == fp == folder.name
    assert rec["model"]["spec"] == spec and rec["model"]["revision"] == revision
    assert re.fullmatch(r"[0-9a-f]{16}", rec["model"]["weights"])
    assert rec["random_weights"] is random_weights
    names = {f.name for f in fields(stage) if f.init and not f.name.startswith("_")}
    assert set(rec["parameters"]) == names
    assert rec["covers"]["weights"] == rec["model"]["weights"]
    assert rec["libraries"]["torch"] == metadata.version("torch")
    assert rec["libraries"]["pyarrow"] == metadata.version("pyarrow")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rec["created"])
    # Every shard names its fingerprint and model in its Parquet key-value metadata.
    for shard in layout.label_shards(stage.name, fp):
        meta = read_unimrg_metadata(shard)
        assert meta["fingerprint"] == fp and meta["stage"] == stage.name
        assert meta["model"]["spec"] == spec and meta["model"]["weights"] == rec["model"]["weights"]
        assert b"unimrg" in pq.read_schema(shard).metadata
    return rec


DEPTH = {"input_size": 28, "batch_size": 2}


def test_depth_lineage_for_tiny_random_a_local_directory_and_a_hub_cache_model(
    image_shards, tmp_path, monkeypatch
):
    from pipeline.stages.depth.model import tiny_random_model_dir

    m = _manifest(tmp_path, image_shards.root, depth={"model": "tiny-random", **DEPTH})
    stage = build_stage("depth", m)
    run_stage(stage, image_shards)
    _check(stage, image_shards, "tiny-random", None, True)

    shutil.copytree(tiny_random_model_dir(), tmp_path / "models" / "da")
    m = _manifest(tmp_path, image_shards.root, depth={"model": "models/da", **DEPTH})
    local = build_stage("depth", m)
    run_stage(local, image_shards)
    rec = _check(local, image_shards, "models/da", None, False)
    assert rec["model"]["path"] == str(tmp_path / "models" / "da")

    snap = fake_hub_cache(monkeypatch, tmp_path / "hf", "org/depth", tiny_random_model_dir())
    m = _manifest(tmp_path, image_shards.root, depth={"model": "org/depth", **DEPTH})
    hub = build_stage("depth", m)
    run_stage(hub, image_shards)
    rec = _check(hub, image_shards, "org/depth", snap.name, False)  # pinned to the commit
    assert rec["model"]["source"] == "hub"
    # Same weights under three specs: three folders, each saying what it was.
    assert len(image_shards.label_fingerprints("depth")) == 3


def test_segment_lineage_for_tiny_random_and_a_local_checkpoint(image_shards, tmp_path):
    from pipeline.stages.segment.model import tiny_sam_checkpoint

    seg = {"points_per_side": 2, "device": "cpu"}
    m = _manifest(tmp_path, image_shards.root, segment={"model_type": "tiny-random", **seg})
    stage = build_stage("segment", m)
    run_stage(stage, image_shards)
    rec = _check(stage, image_shards, "tiny-random", None, True)
    assert rec["parameters"]["points_per_side"] == 2 and rec["covers"]["amg"]

    shutil.copy(tiny_sam_checkpoint(), tmp_path / "sam.pth")
    m = _manifest(
        tmp_path,
        image_shards.root,
        segment={"model_type": "tiny-random", "checkpoint": "sam.pth", **seg},
    )
    local = build_stage("segment", m)
    assert local.fingerprint() == stage.fingerprint()  # same bytes: same output folder
    assert read_lineage(image_shards.label_dir("segment", local.fingerprint()))["model"]["path"]


def test_the_record_is_written_before_the_first_shard(image_shards, tmp_path, monkeypatch):
    m = _manifest(tmp_path, image_shards.root, depth={"model": "tiny-random", **DEPTH})
    stage = build_stage("depth", m)
    seen = []
    original = type(stage).run_shard

    def spy(self, image_shard, out_path, progress=None, metadata=None):
        seen.append((out_path.parent / LINEAGE_FILE).is_file())
        return original(self, image_shard, out_path, progress, metadata)

    monkeypatch.setattr(type(stage), "run_shard", spy)
    run_stage(stage, image_shards)
    assert seen == [True, True]


def test_a_broken_model_leaves_no_record_pointing_nowhere(image_shards, tmp_path):
    m = _manifest(tmp_path, image_shards.root, depth={"model": "models/none", **DEPTH})
    with pytest.raises(FileNotFoundError):
        run_stage(build_stage("depth", m), image_shards)
    assert not (image_shards.root / "labels").exists()
