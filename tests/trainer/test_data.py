"""Data layer: understanding resolution, weight-0 tasks, the batch plan, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.adapters import adapter_class, available_adapters
from trainer.data import DEFAULT_PROMPTS, BatchPlan, TrainData, collate, make_loader


@pytest.fixture(scope="module", params=available_adapters())
def encoder(request):
    """Every family's text encoder: the data layer must work the same for each."""
    return adapter_class(request.param).load("tiny-random").text_encoder()


def test_missing_understanding_images_are_skipped_and_counted(train_manifest):
    data = TrainData.build(train_manifest())
    rep = data.understanding.report
    assert rep["conversations"] == 6
    assert rep["used"] == 4
    assert rep["missing"] == 1  # not_there.png: no such file
    assert rep["quarantined"] == 1  # broken.jpg: ingest quarantined it
    # Each used conversation points at the image its path names.
    for conv, g in zip(data.understanding.conversations, data.understanding.image_rows):
        assert data.index.image_ids[g] == data.index.by_path[("understanding-0", _img_of(conv))]


def _img_of(conv):
    from tests.trainer.conftest import QUESTIONS

    return f"img{QUESTIONS.index(conv[0]['value'].split(chr(10))[1])}.png"


def test_weight_zero_disables_a_tasks_data(train_manifest, encoder, monkeypatch):
    # The depth labels point nowhere: with weight 0 they are never looked for.
    monkeypatch.setattr(
        "trainer.data.resolve_label_fingerprints",
        lambda m: {"depth": "no-such-fingerprint", "segment": "fp-segment-test"},
    )
    m = train_manifest(
        loss_weights={
            "understanding": 1.0,
            "reconstruction": 1.0,
            "depth": 0.0,
            "segmentation": 1.0,
        }
    )
    data = TrainData.build(m)
    assert "depth" not in data.streams and "depth" not in data.report
    ds = data.dataset(encoder, 32, (0, 0, 0))
    assert "depth" not in ds.label_dirs
    plan = BatchPlan(
        data.streams,
        data.groups,
        {"understanding": 1, "reconstruction": 1, "depth": 0, "segmentation": 1},
        2,
    )
    loader = make_loader(ds, plan)
    tasks = [next(loader)["task"] for _ in range(9)]
    assert tasks == ["understanding", "reconstruction", "segmentation"] * 3
    assert not any("depth" in p for p in ds.cache.reads)
    assert any("segment" in p for p in ds.cache.reads)
    # ... whereas with weight > 0 the missing labels are an error naming the folder.
    m2 = train_manifest()
    with pytest.raises(ValueError, match="no-such-fingerprint"):
        TrainData.build(m2)


def test_label_errors_are_left_out_of_the_stream(train_manifest, tmp_path):
    from pipeline.shards import Layout
    from tests.trainer.conftest import write_labels

    m = train_manifest()
    write_labels(Layout(m.out), n_bad=1)  # first row of every shard failed
    data = TrainData.build(m)
    n_shards = len(data.index.shards)
    assert data.report["depth"]["errors"] == n_shards
    assert len(data.streams["depth"]) == 4 - n_shards
    assert len(data.streams["segmentation"]) == 4


def test_samples_have_the_contracted_shapes(train_manifest, encoder):
    data = TrainData.build(train_manifest())
    ds = data.dataset(encoder, 32, (122, 116, 104), uncond_rate=1.0)
    g = int(data.streams["depth"][0])
    depth = ds[("depth", g, 1, 0)]
    assert depth["image"].shape == depth["target"].shape == (3, 32, 32)
    assert depth["image"].dtype == torch.uint8
    # depth targets are grayscale rendered to RGB: three equal channels
    assert torch.equal(depth["target"][0], depth["target"][1])
    rec = ds[("reconstruction", g, 1, 0)]
    assert torch.equal(rec["image"], rec["target"])
    assert rec["input_ids"].tolist() == encoder.generation("")  # uncond_rate 1: prompt dropped
    und = ds[("understanding", 0, 1, 0)]
    assert (und["labels"] != -100).any()


def test_prompts_are_drawn_from_the_lists(train_manifest, encoder):
    data = TrainData.build(train_manifest())
    ds = data.dataset(encoder, 32, (0, 0, 0), uncond_rate=0.0)
    seen = {
        tuple(ds[("depth", int(data.streams["depth"][0]), s, 0)]["input_ids"].tolist())
        for s in range(40)
    }
    assert seen == {tuple(encoder.generation(p)) for p in DEFAULT_PROMPTS["depth"]}
    assert DEFAULT_PROMPTS["depth"][0] == "Generate the depth map of this image."
    assert DEFAULT_PROMPTS["segmentation"][0] == "Generate the segmentation mask of this image."


def _plan(**kw):
    streams = {"understanding": np.arange(10), "reconstruction": np.arange(7)}
    groups = {"understanding": np.arange(10) // 3, "reconstruction": np.arange(7) // 3}
    return BatchPlan(streams, groups, {"understanding": 1.0, "reconstruction": 1.0}, 3, **kw)


def test_plan_round_robin_covers_each_epoch_and_is_pure():
    plan = _plan()
    assert [plan.task_of(k)[0] for k in range(4)] == ["understanding", "reconstruction"] * 2
    items = [i for k in range(0, 20, 2) for _, i, _, _ in plan.batch(k)][:30]
    assert sorted(items[:10]) == list(range(10)) and sorted(items[10:20]) == list(range(10))
    assert _plan().batch(13) == plan.batch(13)  # no hidden state: resume at any batch


def test_plan_ranks_take_disjoint_items():
    a, b = _plan(rank=0, world=2), _plan(rank=1, world=2)
    ia = [i for k in (0, 2) for _, i, _, _ in a.batch(k)]
    ib = [i for k in (0, 2) for _, i, _, _ in b.batch(k)]
    assert not set(ia[:5]) & set(ib[:5])
    assert sorted(ia[:5] + ib[:5]) == list(range(10))


def test_weighted_plan_draws_in_proportion():
    streams = {"understanding": np.arange(5), "depth": np.arange(5)}
    plan = BatchPlan(
        streams,
        {k: np.zeros(5, int) for k in streams},
        {"understanding": 3.0, "depth": 1.0},
        1,
        mode="weighted",
        seed=3,
    )
    tasks = [plan.task_of(k)[0] for k in range(2000)]
    assert 0.7 < tasks.count("understanding") / 2000 < 0.8
    assert plan.task_of(1500) == BatchPlan(
        streams, plan.groups, {"understanding": 3.0, "depth": 1.0}, 1, mode="weighted", seed=3
    ).task_of(1500)


def test_collate_right_pads():
    s = [
        {
            "task": "understanding",
            "batch": 0,
            "input_ids": torch.tensor([5, 6, 7]),
            "labels": torch.tensor([-100, 6, 7]),
            "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
        },
        {
            "task": "understanding",
            "batch": 0,
            "input_ids": torch.tensor([8]),
            "labels": torch.tensor([8]),
            "image": torch.zeros(3, 4, 4, dtype=torch.uint8),
        },
    ]
    b = collate(s, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_a_label_row_without_target_is_skipped_to_the_next(train_manifest, encoder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.shards import Layout
    from tests.trainer.conftest import LABEL_FPS

    m = train_manifest()
    shard = Layout(m.out).label_dir("depth", LABEL_FPS["depth"]) / "shard-00000.parquet"
    t = pq.read_table(shard)
    targets = t.column("target").to_pylist()
    targets[0] = None  # no error recorded, yet no target: found only when read
    t = t.set_column(t.schema.get_field_index("target"), "target", pa.array(targets, pa.binary()))
    pq.write_table(t, shard)
    data = TrainData.build(m)
    ds = data.dataset(encoder, 32, (0, 0, 0))
    first, second = int(data.streams["depth"][0]), int(data.streams["depth"][1])
    with pytest.warns(UserWarning, match="has no target"):
        got = ds[("depth", first, 0, 0)]
    assert torch.equal(got["target"], torch.from_numpy(ds.target("depth", second)))
    assert ds.skipped["depth"] == 1
