"""`unimrg status` names what made each fingerprint; `unimrg clean` removes the unused ones.
tiny-random labels: noise."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest

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
    ensure_lineage(run, {"kind": "train", "stage": "train", "fingerprint": run.name})
    unknown_run = image_shards.root / "train" / "fedcba9876543210"  # no record: not ours to say
    (unknown_run / "step_000001").mkdir(parents=True)
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
        str(run),
        str(stale_tmp),
    }
    unrecorded = image_shards.label_dir("segment", "feedfacefeedface")
    capsys.readouterr()
    plan = clean(cur, dry_run=True)
    assert {r.path for r in plan.remove} == unused
    assert set(plan.skipped) == {"labels/segment/feedfacefeedface", "train/fedcba9876543210"}
    assert all("no lineage.json says unimrg made it" in why for why in plan.skipped.values())
    printed = capsys.readouterr().out
    assert "would free" in printed and all(p in printed for p in unused)
    assert all(os.path.exists(p) for p in unused)  # a dry run removes nothing

    freed = clean(cur)
    assert freed.bytes == plan.bytes > 2048
    assert not any(os.path.exists(p) for p in unused)
    assert image_shards.label_shards("depth", cur_depth.fingerprint())
    assert image_shards.label_shards("segment", seg.fingerprint())
    assert fresh_tmp.exists() and len(image_shards.image_shards()) == 2
    assert unrecorded.is_dir() and unknown_run.is_dir()  # not known to be unimrg's: kept
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


# --- only what unimrg made, only inside output_dir, never beside a live run (issue 20) ---


def _old(path):
    """Make `path` (a file, written when missing) look left over (older than clean's
    one-hour grace)."""
    if not path.exists():
        path.write_bytes(b"half-written")
    os.utime(path, (time.time() - 7200, time.time() - 7200))
    return path


def _train_run(root, fp: str, record: dict | None = None):
    run = root / fp
    (run / "step_000001").mkdir(parents=True)
    (run / "step_000001" / "x.bin").write_bytes(b"0" * 64)
    ensure_lineage(run, record or {"kind": "train", "stage": "train", "fingerprint": fp})
    return run


def _no_stages(root):
    return parse_manifest(
        {"output_dir": "out", "sources": [{"name": "s", "path": "imgs"}]}, base_dir=root
    )


@pytest.mark.parametrize("sub", [".", "../victim"])
def test_clean_keeps_what_an_unchecked_subdir_points_at(image_shards, tmp_path, sub):
    """Were a bad eval subfolder to get past the manifest check (forced in here without it),
    clean still removes nothing through it. Before, with `.` it listed the training runs
    (`train/` read as an eval folder), with `../victim` a folder outside output_dir."""
    from pipeline.manifest import EvalConfig

    run = _train_run(image_shards.root / "train", "0123456789abcdef")
    victim = tmp_path / "victim" / "0123456789abcdef" / "bench"
    victim.mkdir(parents=True)
    (victim / "lineage.json").write_text('{"task": "eval bench base", "model": {"spec": "x"}}')
    m = _no_stages(tmp_path)
    m = m.model_copy(update={"eval": EvalConfig().model_copy(update={"output_subdir": sub})})
    plan = clean(m)
    assert [r.path for r in plan.remove] == [str(run)]  # no trainer configured: unused
    assert victim.is_dir() and image_shards.image_shards()
    if sub != ".":
        assert "outside output_dir" in plan.skipped["../victim/0123456789abcdef"]


def test_clean_removes_temporaries_only_in_its_own_folders(image_shards, tmp_path):
    """`.*.tmp` anywhere below output_dir went before (with output_dir: /, other programs'
    files); now only in images/, quarantine/, labels/, the train and eval folders, and output_dir
    itself, never through a symbolic link."""
    out = image_shards.root
    ours = [
        _old(out / ".preview.png.ab12.tmp"),
        _old(image_shards.images_dir / ".shard-00007.parquet.x.tmp"),
    ]
    half_ckpt = out / "train" / "0123456789abcdef" / ".step_000004.tmp"
    half_ckpt.mkdir(parents=True)
    (half_ckpt / "trainer_state.pt").write_bytes(b"half")
    ours.append(_old(half_ckpt))
    (out / "notes").mkdir()
    theirs = [_old(out / "notes" / ".draft.tmp")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    theirs.append(_old(elsewhere / ".other.tmp"))
    (out / "labels").mkdir(exist_ok=True)
    (out / "labels" / "linked").symlink_to(elsewhere)  # a link inside labels/ to outside
    (out / ".link.tmp").symlink_to(elsewhere / ".other.tmp")

    plan = clean(_no_stages(tmp_path))
    assert sorted(r.path for r in plan.remove if r.kind == "temporary") == sorted(map(str, ours))
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs) and (out / ".link.tmp").is_symlink()


def test_clean_leaves_folders_whose_lineage_is_not_unimrgs(image_shards, tmp_path):
    out = image_shards.root
    real = _train_run(out / "train", "0123456789abcdef")
    wrong_name = _train_run(
        out / "train",
        "aaaaaaaaaaaaaaaa",
        {"kind": "train", "stage": "train", "fingerprint": "bbbbbbbbbbbbbbbb"},
    )
    wrong_kind = _train_run(
        out / "train",
        "cccccccccccccccc",
        {"kind": "labels", "stage": "depth", "fingerprint": "cccccccccccccccc"},
    )
    (out / "train" / "dddddddddddddddd").symlink_to(real)  # a link to a run: not removed through
    fake_eval = out / "eval" / "eeeeeeeeeeeeeeee" / "mine"
    fake_eval.mkdir(parents=True)
    (fake_eval / "lineage.json").write_text('{"task": "something else"}')

    plan = clean(_no_stages(tmp_path))
    assert [r.path for r in plan.remove] == [str(real)]
    assert wrong_name.is_dir() and wrong_kind.is_dir() and fake_eval.is_dir()
    assert "not this folder's" in plan.skipped["train/aaaaaaaaaaaaaaaa"]
    assert "symbolic link" in plan.skipped["train/dddddddddddddddd"]


@pytest.mark.parametrize(
    "lock", [".run.lock", ".ingest.lock", ".eval.lock", "train/fedcba9876543210/.train.lock"]
)
def test_clean_is_refused_while_a_run_ingest_or_training_holds_its_lock(
    image_shards, tmp_path, lock, capsys
):
    """Before, clean took no lock: beside a training of another manifest it removed the live
    run folder (log, lineage, lock) while training went on, and exited 0."""
    from flows.cli import main
    from pipeline.locks import Busy, exclusive

    out = image_shards.root
    live = _train_run(out / "train", "fedcba9876543210")  # another manifest's training
    (tmp_path / "m.yaml").write_text("output_dir: out\nsources: [{name: s, path: imgs}]\n")
    with exclusive(out / lock, "held by the test"):
        with pytest.raises(Busy, match=r"refused, not waiting"):
            clean(_no_stages(tmp_path))
        assert live.is_dir() and (live / "lineage.json").is_file()
        capsys.readouterr()
        assert main(["clean", "-m", str(tmp_path / "m.yaml")]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{lock.rsplit('/', 1)[-1]} is held" in err
        assert clean(_no_stages(tmp_path), dry_run=True).remove  # a dry run needs no lock
    assert [r.path for r in clean(_no_stages(tmp_path)).remove] == [str(live)]
    assert not live.exists()
