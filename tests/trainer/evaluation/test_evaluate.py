"""The eval stage end to end on tiny-random Janus: files, caching, the table."""

from __future__ import annotations

import json

import pytest

from tests.trainer.evaluation.conftest import save_checkpoint
from trainer.evaluation.evaluate import eval_table, evaluate, format_table


def test_eval_writes_documented_files_and_caches(eval_manifest):
    m = eval_manifest()
    save_checkpoint(m, 2, seed=1)
    report = evaluate(m, progress=False)
    titles = sorted(report.results)
    assert titles == sorted(
        f"eval {b} {model}"
        for b in ("mini-mcq", "mini-pope", "spatial", "generation")
        for model in ("base", "step_000002")
    )
    assert {r["how"] for r in report.results.values()} == {"computed"}
    for t in report.tasks:
        assert t.out_dir.parent.parent == m.out / "eval"
        assert t.out_dir.name == t.benchmark
        lineage = json.loads((t.out_dir / "lineage.json").read_text())
        assert lineage["task"] == t.title and lineage["random_weights"] is True
        lines = (t.out_dir / "predictions.jsonl").read_text().splitlines()
        if t.kind == "generation":
            assert (t.out_dir / "grid.png").stat().st_size > 0
            assert len(lines) == 2  # the two held-out images
            assert set(t.scores()) >= {
                "depth_abs_rel",
                "depth_delta1",
                "seg_boundary_f",
                "recon_psnr",
            }
        else:
            rows = [json.loads(x) for x in lines]
            assert set(rows[0]) == {"index", "prediction", "choice", "answer", "correct"}
            assert all(r["correct"] == (r["choice"] == r["answer"]) for r in rows)
            acc = sum(r["correct"] for r in rows) / len(rows)
            assert t.scores()["accuracy"] == acc
    spatial = next(t for t in report.tasks if t.benchmark == "spatial")
    # one question per held-out image: its two masks make one pair
    assert len((spatial.out_dir / "predictions.jsonl").read_text().splitlines()) == 2

    # the table: one row per metric, delta = post - base, the random-weights line
    rows = eval_table(list(report.results.values()))
    pope = [r for r in rows if r["benchmark"] == "mini-pope"]
    assert [r["metric"] for r in pope] == ["accuracy", "precision", "recall", "f1", "yes_ratio"]
    for r in rows:
        if r["base"] is not None and r["post_trained"] is not None:
            assert r["delta"] == r["post_trained"] - r["base"]
    text = format_table(report)
    assert text.splitlines()[0].split() == ["benchmark", "metric", "base", "post-trained", "delta"]
    assert "RANDOM WEIGHTS" in text

    # unchanged rerun: nothing evaluated, no model loaded
    import trainer.evaluation.evaluate as ev

    def no_load(*a, **k):
        raise AssertionError("a model was loaded on an unchanged rerun")

    orig = ev.load_adapter
    ev.load_adapter = no_load
    try:
        again = evaluate(m, progress=False)
    finally:
        ev.load_adapter = orig
    assert {r["how"] for r in again.results.values()} == {"cached"}

    # a new checkpoint evaluates only itself
    save_checkpoint(m, 4, seed=2)
    third = evaluate(m, progress=False)
    computed = sorted(k for k, r in third.results.items() if r["how"] == "computed")
    assert computed == sorted(
        f"eval {b} step_000004" for b in ("mini-mcq", "mini-pope", "spatial", "generation")
    )
    assert all(r["how"] == "cached" for k, r in third.results.items() if "base" in k)


def test_model_choice_and_only(eval_manifest):
    m = eval_manifest()
    report = evaluate(m, model="base", only=["mini-mcq"], progress=False)
    assert list(report.results) == ["eval mini-mcq base"]
    rows = eval_table(list(report.results.values()))
    assert rows[0]["post_trained"] is None and rows[0]["delta"] is None


def test_status_reads_files_only(eval_manifest):
    from flows.status import collect_status
    from trainer.evaluation.eval_status import eval_status

    m = eval_manifest()
    before = eval_status(m)
    assert before.error is None and before.done == 0
    assert before.total == 3  # mini-mcq, mini-pope, generation (spatial is not built yet)
    assert "spatial: questions not built yet" in " ".join(before.notes)
    assert not (m.out / "eval").exists()  # status wrote nothing
    evaluate(m, model="base", progress=False)
    after = eval_status(m)
    assert (after.done, after.total, after.missing) == (4, 4, [])
    assert collect_status(m)["eval"]["done"] == 4


def test_model_path_is_a_checkpoint_folder(eval_manifest, monkeypatch, tmp_path):
    from trainer.evaluation.evaluate import eval_models

    m = eval_manifest()
    ckpt = save_checkpoint(m, 2, seed=1)
    monkeypatch.chdir(tmp_path)
    (model,) = eval_models(m, str(ckpt.relative_to(tmp_path)))
    assert model.label == "step_000002" and model.spec == str(ckpt.resolve())
    assert not model.base
    (spec,) = eval_models(m, "tiny-random")
    assert spec.spec == "tiny-random"


def test_clean_removes_the_eval_folders_of_models_outside_the_current_run(
    eval_manifest, capsys, monkeypatch
):
    """`unimrg clean`: the scores of the base model and of the current run's checkpoints stay
    (also one that --keep-current trims); another run's go with that run; an eval folder
    without its lineage yet (an eval in progress) is left alone. Random weights: noise scores."""
    import shutil
    from types import SimpleNamespace

    from flows.clean import clean, plan_clean
    from pipeline.lineage import ensure_lineage
    from tests.trainer.conftest import LABEL_FPS

    def stage(name, manifest):  # the fixture's label folders are current: no stage is built
        return SimpleNamespace(fingerprint=lambda: LABEL_FPS[name])

    monkeypatch.setattr("pipeline.stage.build_stage", stage)
    m = eval_manifest(held_out_images=0)
    only = ["mini-mcq"]
    ck2 = save_checkpoint(m, 2, seed=1)
    save_checkpoint(m, 3, seed=2)
    other = m.out / "train" / "feedfacefeedface" / "step_000002"  # another run's checkpoint
    shutil.copytree(ck2, other)
    # clean removes a run folder (or trims one) only when its lineage says unimrg trained it
    for run in (other.parent, ck2.parent):
        ensure_lineage(run, {"kind": "train", "stage": "train", "fingerprint": run.name})
    for model in ("base", str(ck2), "latest"):
        evaluate(m, model=model, only=only, progress=False)
    (task,) = evaluate(m, model=str(other), only=only, progress=False).tasks
    stale = task.out_dir.parent
    running = m.out / "eval" / "0123456789abcdef" / "mini-mcq"
    running.mkdir(parents=True)
    (running / "predictions.jsonl").write_text("")
    kept = [p for p in (m.out / "eval").iterdir() if p not in (stale, running.parent)]
    assert len(kept) == 3  # base, step_000002, step_000003

    capsys.readouterr()
    plan = clean(m, dry_run=True)
    assert {(r.kind, r.path) for r in plan.remove} == {
        ("train", str(other.parent)),
        ("eval", str(stale)),
    }
    (removal,) = [r for r in plan.remove if r.kind == "eval"]
    assert removal.made_by == "eval mini-mcq step_000002" and removal.bytes > 0
    assert list(plan.skipped) == ["eval/0123456789abcdef"]
    printed = capsys.readouterr().out
    assert f"would remove eval {stale}" in printed
    assert "left eval/0123456789abcdef alone: no lineage.json yet" in printed
    assert stale.is_dir()  # a dry run removes nothing

    trim = plan_clean(m, keep_current=True)
    assert [r.path for r in trim.remove if r.kind == "checkpoint"] == [str(ck2)]
    assert [r.path for r in trim.remove if r.kind == "eval"] == [str(stale)]

    clean(m)
    assert not stale.exists() and not other.exists()
    assert all(p.is_dir() for p in kept) and running.is_dir()
    assert plan_clean(m).remove == []


def _path_benchmark(root, name="paths.tsv", images=("imgs/0.png", "imgs/1.png")) -> None:
    from PIL import Image

    (root / "imgs").mkdir(parents=True, exist_ok=True)
    for i, rel in enumerate(images):
        Image.new("RGB", (16, 12), (200 * i, 30, 60)).save(root / rel)
    rows = [f"{i}\t{rel}\tIs it red?\t{'yes' if i else 'no'}" for i, rel in enumerate(images)]
    (root / name).write_text("\n".join(["index\timage_path\tquestion\tanswer", *rows]) + "\n")


def test_the_images_a_benchmark_points_to_are_part_of_its_cache_key(eval_manifest, tmp_path):
    """Changing or deleting a file an `image_path` row names used to return the old scores as
    cached."""
    from PIL import Image

    from trainer.evaluation.benchmarks import BenchmarkError

    bench = tmp_path / "bench"
    _path_benchmark(bench)
    m = eval_manifest(
        benchmarks=[{"name": "paths", "path": "bench/paths.tsv", "kind": "yesno"}],
        held_out_images=0,
    )
    title = "eval paths base"
    first = evaluate(m, model="base", progress=False)
    assert first.results[title]["how"] == "computed"
    assert evaluate(m, model="base", progress=False).results[title]["how"] == "cached"
    Image.new("RGB", (16, 12), (0, 0, 255)).save(bench / "imgs" / "1.png")  # another picture
    changed = evaluate(m, model="base", progress=False)
    assert changed.results[title]["how"] == "computed"
    assert changed.tasks[0].fingerprint != first.tasks[0].fingerprint
    (bench / "imgs" / "0.png").unlink()
    with pytest.raises(BenchmarkError) as exc:
        evaluate(m, model="base", progress=False)
    msg = str(exc.value)
    assert str(bench / "paths.tsv") in msg and "index '0'" in msg and "not found" in msg, msg


def test_eval_fingerprints_and_scores_survive_moving_output_dir(
    eval_manifest, tmp_path, monkeypatch
):
    """The fingerprint held the checkpoint's (and the spatial probe's) absolute path: moving
    output_dir re-evaluated everything and let `unimrg clean` delete the scores."""
    from types import SimpleNamespace

    from flows.clean import plan_clean
    from pipeline.manifest import parse_manifest
    from tests.trainer.conftest import LABEL_FPS
    from trainer.evaluation.evaluate import eval_models, plan_eval

    monkeypatch.setattr(
        "pipeline.stage.build_stage",
        lambda name, manifest: SimpleNamespace(fingerprint=lambda: LABEL_FPS[name]),
    )
    m = eval_manifest()
    save_checkpoint(m, 2, seed=1)
    before, _ = plan_eval(m, eval_models(m))
    assert {t.benchmark for t in before} == {"mini-mcq", "mini-pope", "spatial", "generation"}
    evaluate(m, only=["mini-mcq"], progress=False)  # base and step_000002
    data = m.model_dump(mode="json", exclude={"base_dir"})
    (tmp_path / "out").rename(tmp_path / "moved")
    moved = parse_manifest({**data, "output_dir": "moved"}, base_dir=m.base_dir)
    after, _ = plan_eval(moved, eval_models(moved))
    assert [(t.title, t.fingerprint) for t in after] == [(t.title, t.fingerprint) for t in before]
    report = evaluate(moved, only=["mini-mcq"], progress=False)
    assert {r["how"] for r in report.results.values()} == {"cached"}
    assert [r for r in plan_clean(moved).remove if r.kind == "eval"] == []


def test_a_failed_eval_leaves_no_folder_behind(eval_manifest, tmp_path):
    from trainer.evaluation.benchmarks import BenchmarkError

    bench = tmp_path / "bench"
    _path_benchmark(bench)
    (bench / "imgs" / "1.png").write_bytes(b"not an image")
    m = eval_manifest(
        benchmarks=[{"name": "paths", "path": "bench/paths.tsv", "kind": "yesno"}],
        held_out_images=0,
    )
    with pytest.raises(BenchmarkError, match="not a readable image"):
        evaluate(m, model="base", progress=False)
    left = sorted(p.relative_to(m.out) for p in (m.out / "eval").rglob("*"))
    assert left == [], left


def test_clean_removes_what_killed_evals_left_behind(eval_manifest, monkeypatch):
    """An eval writes each task into `.<benchmark>.<random>.tmp` and removes it when it fails;
    a killed one leaves `eval/<fp>/` holding only that: older than an hour it goes (a younger
    one may be an eval in progress). A folder without lineage that an eval did not write this
    way is never removed."""
    import os
    import time
    from types import SimpleNamespace

    from flows.clean import plan_clean
    from tests.trainer.conftest import LABEL_FPS

    monkeypatch.setattr(
        "pipeline.stage.build_stage",
        lambda name, manifest: SimpleNamespace(fingerprint=lambda: LABEL_FPS[name]),
    )
    m = eval_manifest(held_out_images=0)
    (done,) = evaluate(m, model="base", only=["mini-mcq"], progress=False).tasks
    old = time.time() - 2 * 3600
    killed = m.out / "eval" / "0123456789abcdef"
    running = m.out / "eval" / "fedcba9876543210"
    unknown = m.out / "eval" / "00000000deadbeef"
    for d in (killed, running):
        (d / ".mini-mcq.x1y2z3.tmp").mkdir(parents=True)
        (d / ".mini-mcq.x1y2z3.tmp" / "predictions.jsonl").write_text("")
    (unknown / "mini-mcq").mkdir(parents=True)  # not an eval's temporary folder
    for p in (*killed.rglob("*"), killed, *unknown.rglob("*"), unknown):
        os.utime(p, (old, old))
    plan = plan_clean(m)
    assert [r.path for r in plan.remove if r.kind == "eval"] == [str(killed)]
    assert {"eval/fedcba9876543210", "eval/00000000deadbeef"} <= set(plan.skipped)
    assert done.done


def test_an_eval_is_refused_while_clean_holds_the_output_folder_and_runs_beside_another_eval(
    eval_manifest,
):
    """Before, an eval took no lock: `unimrg clean` beside it could remove the folder of a model
    outside the current run while the eval wrote into it. Evals hold `.eval.lock` shared, clean
    exclusively (tests/flows/test_clean.py: clean refused while an eval holds it)."""
    from pipeline.locks import Busy, exclusive, shared
    from trainer.evaluation.evaluate import EVAL_LOCK

    m = eval_manifest(held_out_images=0)
    with exclusive(m.out / EVAL_LOCK, "`unimrg clean` is running there"):
        with pytest.raises(Busy, match=r"\.eval\.lock is held"):
            evaluate(m, model="base", only=["mini-mcq"], progress=False)
    assert not [p for p in (m.out / "eval").glob("*/*") if p.is_dir()]  # nothing written
    with shared(m.out / EVAL_LOCK, "another eval"):
        (task,) = evaluate(m, model="base", only=["mini-mcq"], progress=False).tasks
    assert (task.out_dir / "scores.json").is_file()
