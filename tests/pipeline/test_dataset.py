"""Label shards read by Hugging Face `datasets` as images; the one-call reader; export.
tiny-random labels: noise (the tests check shapes and decoding, never content)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.manifest import parse_manifest
from pipeline.shards import Layout
from pipeline.stage import build_stage, run_stage


def _manifest(root: Path, out: Path):
    return parse_manifest(
        {
            "output_dir": str(out),
            "sources": [{"name": "s", "path": "x"}],
            "stages": {
                "depth": {"model": "tiny-random", "input_size": 28, "batch_size": 2},
                "segment": {"model_type": "tiny-random", "points_per_side": 2, "device": "cpu"},
            },
        },
        base_dir=root,
    )


@pytest.fixture
def labelled(image_shards: Layout, tmp_path):
    m = _manifest(tmp_path, image_shards.root)
    for name in ("depth", "segment"):
        run_stage(build_stage(name, m), image_shards)
    return m


def test_datasets_decodes_label_targets_as_images_without_a_cast(labelled):
    import datasets

    layout = Layout(labelled.out)
    fp = build_stage("depth", labelled).fingerprint()
    files = [str(p) for p in layout.label_shards("depth", fp)]
    cache = str(layout.root.parent / "hf-datasets")
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    assert isinstance(ds.features["target"], datasets.Image)
    assert isinstance(ds.features["depth_png16"], datasets.Image)
    row = ds[0]
    assert isinstance(row["target"], Image.Image) and row["target"].mode == "L"
    assert row["depth_png16"].mode.startswith("I")  # 16-bit grayscale
    assert np.asarray(row["depth_png16"]).max() > 255
    assert row["target"].size == (row["width"], row["height"])
    seg_fp = build_stage("segment", labelled).fingerprint()
    seg = datasets.load_dataset(
        "parquet",
        data_files=[str(p) for p in layout.label_shards("segment", seg_fp)],
        cache_dir=cache,
    )["train"]
    assert isinstance(seg.features["target"], datasets.Image)
    assert isinstance(seg[0]["target"], Image.Image)


def test_one_call_reader_joins_images_with_depth_and_segmentation(labelled, tmp_path):
    from pipeline.dataset import load_labelled

    # A stale fingerprint's labels next to the current ones are not mixed in.
    stale = Layout(labelled.out).label_dir("depth", "0" * 16)
    stale.mkdir(parents=True)
    ds = load_labelled(labelled)
    assert len(ds) == 5  # 3 + 2 images over two shards
    row = ds[0]
    for col in ("image", "depth", "depth_png16", "segmentation"):
        assert isinstance(row[col], Image.Image), col
    assert row["image"].size == row["depth"].size == row["segmentation"].size
    assert row["depth_min"] <= row["depth_max"] and row["segmentation_masks"] is not None
    images = [r for r in ds.select_columns(["image_id"])]
    assert len({r["image_id"] for r in images}) == 5


def test_export_writes_the_push_to_hub_layout(labelled, tmp_path):
    import datasets

    from flows.cli import main

    to = tmp_path / "export"
    manifest_path = tmp_path / "m.yaml"
    import yaml

    manifest_path.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(labelled.out),
                "sources": [{"name": "s", "path": "x"}],
                "stages": {
                    "depth": {"model": "tiny-random", "input_size": 28, "batch_size": 2},
                    "segment": {
                        "model_type": "tiny-random",
                        "points_per_side": 2,
                        "device": "cpu",
                    },
                },
            }
        )
    )
    (tmp_path / "x").mkdir()
    assert main(["export", "-m", str(manifest_path), "--to", str(to)]) == 0
    assert sorted(p.name for p in (to / "data").iterdir()) == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
    ]
    card = (to / "README.md").read_text()
    assert "path: data/train-*" in card and "noise" in card
    ds = datasets.load_dataset(str(to), split="train", cache_dir=str(tmp_path / "hf-datasets"))
    assert len(ds) == 5 and isinstance(ds[0]["depth"], Image.Image)
    assert isinstance(ds.features["segmentation"], datasets.Image)
    assert main(["export", "-m", str(manifest_path), "--to", str(to)]) == 1  # not empty


def test_export_keeps_a_temporary_folder_it_did_not_make_and_refuses_beside_a_writer(
    labelled, tmp_path
):
    """Before, export wiped a pre-existing `.<to>.tmp` beside `to` (someone else's) and read
    the labels while a run or clean could be rewriting them."""
    from pipeline.dataset import export_dataset
    from pipeline.locks import Busy, exclusive

    to = tmp_path / "export" / "ds"
    theirs = tmp_path / "export" / ".ds.tmp"
    theirs.mkdir(parents=True)
    (theirs / "keep.txt").write_text("not unimrg's")
    assert export_dataset(labelled, to) == to and (to / "README.md").is_file()
    assert (theirs / "keep.txt").read_text() == "not unimrg's"
    assert sorted(p.name for p in to.parent.iterdir()) == [".ds.tmp", "ds"]  # none of its own
    for lock in (".run.lock", ".ingest.lock"):
        with exclusive(labelled.out / lock, "held by the test"):
            with pytest.raises(Busy, match=rf"{lock} is held"):
                export_dataset(labelled, tmp_path / "export" / "ds2")
    assert not (tmp_path / "export" / "ds2").exists()
