"""`unimrg status`: done / stale / missing per stage, read from the files alone."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from flows.status import collect_status, print_status
from pipeline.manifest import parse_manifest
from pipeline.shards import Layout, write_parquet_atomic
from pipeline.stage import build_stage


def _manifest(root, input_size=28, depth_model="tiny-random", trainer=False):
    data = {
        "output_dir": "out",
        "sources": [{"name": "s", "path": "imgs"}],
        "stages": {
            "depth": {"model": depth_model, "input_size": input_size},
            "segment": {"model_type": "tiny-random"},
        },
    }
    if trainer:
        data["trainer"] = {
            "model": "tiny-random",
            "max_steps": 3,
            "loss_weights": {
                "understanding": 0.0,
                "reconstruction": 1.0,
                "depth": 1.0,
                "segmentation": 1.0,
            },
        }
    return parse_manifest(data, base_dir=root)


def _fake_label(layout: Layout, stage: str, fp: str, n: int) -> None:
    # status looks at which label shards exist and whether they match their image shard
    ids = pq.read_table(layout.image_shard(n), columns=["image_id"]).column(0)
    write_parquet_atomic(
        pa.table({"image_id": ids, "error": [None] * len(ids)}), layout.label_shard(stage, fp, n)
    )


def test_done_stale_missing_follow_the_fingerprint(image_shards: Layout, capsys):
    root = image_shards.root.parent
    m = _manifest(root)
    fp = build_stage("depth", m).fingerprint()
    st = collect_status(m)
    assert st["images"] == {
        "shards": 2,
        "rows": 5,
        "dir": str(image_shards.images_dir),
        "corrupt": {},
    }
    assert (st["stages"]["depth"]["done"], st["stages"]["depth"]["missing"]) == (0, 2)
    assert st["stages"]["depth"]["random_weights"] is True

    _fake_label(image_shards, "depth", fp, 0)
    d = collect_status(m)["stages"]["depth"]
    assert (d["done"], d["stale"], d["missing"]) == (1, 0, 1)
    assert d["missing_shards"] == [1]
    assert d["labels_dir"] == str(image_shards.label_dir("depth", fp))

    # a depth parameter changes: shard 0's labels are now stale, segment is untouched
    m2 = _manifest(root, input_size=42)
    st2 = collect_status(m2)
    d2 = st2["stages"]["depth"]
    assert d2["fingerprint"] != fp
    assert (d2["done"], d2["stale"], d2["missing"]) == (0, 1, 1)
    assert d2["stale_shards"] == [0] and d2["other_fingerprints"] == [fp]
    assert st2["stages"]["segment"]["missing"] == 2

    assert print_status(m2, as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["depth"]["stale"] == 1
    assert print_status(m2) == 0
    out = capsys.readouterr().out
    assert "depth" in out and "stale shards 0" in out and "random weights" in out


def test_a_stage_that_cannot_fingerprint_is_reported_not_fatal(image_shards: Layout, capsys):
    m = _manifest(image_shards.root.parent, depth_model="no/such-model-dir")
    st = collect_status(m)
    assert "stages.depth.model" in st["stages"]["depth"]["error"]
    assert st["stages"]["depth"]["missing"] == 2
    assert st["stages"]["segment"]["error"] is None
    assert print_status(m) == 1
    assert "stages.depth.model" in capsys.readouterr().out


def test_train_done_when_its_final_checkpoint_exists(image_shards: Layout):
    from trainer.checkpoints import step_dir
    from trainer.run_folder import train_output_dir

    m = _manifest(image_shards.root.parent, trainer=True)
    t = collect_status(m)["train"]
    assert t["error"] is None and t["done"] is False and t["latest_step"] is None
    out = train_output_dir(m, t["fingerprint"])
    step_dir(out, 2).mkdir(parents=True)
    assert collect_status(m)["train"]["latest_step"] == 2
    step_dir(out, 3).mkdir()
    t = collect_status(m)["train"]
    assert t["done"] is True and t["output_dir"] == str(out)


def test_status_command_prints_json(image_shards: Layout):
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = image_shards.root.parent
    (root / "m.yaml").write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "sources": [{"name": "s", "path": "imgs"}],
                "stages": {"segment": {"model_type": "tiny-random"}},
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "status", "-m", str(root / "m.yaml"), "--json"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert proc.returncode == 0, proc.stderr
    st = json.loads(proc.stdout)
    assert st["stages"]["segment"]["missing"] == 2 and "depth" not in st["stages"]
