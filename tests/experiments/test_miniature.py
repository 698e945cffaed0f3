"""The miniature experiment: its scenes, the data it writes, and a --quick run end to end."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from experiments import miniature as M


def test_scenes_have_exact_depth_occlusion_and_perspective():
    rng = np.random.default_rng(0)
    size_answers, pairs, occluded = 0, 0, 0
    for _ in range(60):
        sc = M.render_scene(rng, 32)
        objs = sc.objects
        for o, m in zip(objs, sc.masks):
            assert m.any() and np.allclose(sc.depth[m], o["z"])  # exact depth on visible pixels
            assert (sc.depth[m] < sc.depth.max()).all()
        # Visible masks are disjoint, and a farther object loses pixels only to nearer ones.
        owner = np.stack(sc.masks).sum(0)
        assert owner.max() <= 1
        for i, o in enumerate(objs):
            full = M._shape_mask(o["shape"], o["x"], o["y"], o["r"], 32)
            hidden = full & ~sc.masks[i]
            if hidden.any():
                occluded += 1
                assert (sc.depth[hidden] < o["z"]).all()
        for a in range(len(objs)):
            for b in range(a + 1, len(objs)):
                pairs += 1
                bigger = objs[a] if objs[a]["r"] > objs[b]["r"] else objs[b]
                closer = min(objs[a], objs[b], key=lambda o: o["z"])
                size_answers += bigger is closer
    assert occluded > 0
    # Perspective makes the nearer one usually bigger, the jitter keeps size from answering.
    assert 0.5 < size_answers / pairs < 0.95


@pytest.mark.parametrize("question_set", sorted(M.QUESTION_SETS))
def test_questions_have_one_right_option(question_set):
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(5):
        sc = M.render_scene(rng, 32, n_objects=3)
        by = {
            "z": sorted(sc.objects, key=lambda o: o["z"]),
            "x": sorted(sc.objects, key=lambda o: o["x"]),
        }
        for q in M.scene_questions(sc, random.Random(0), 40, question_set):
            seen.add(q["category"])
            right = q["options"][q["answer"]]
            assert len(set(q["options"])) == len(q["options"])
            if q["category"] in ("closest", "farthest", "leftmost"):
                assert q["options"] == list(M.COLOURS)  # the same options, in the same order
                want = {"closest": by["z"][0], "farthest": by["z"][-1], "leftmost": by["x"][0]}
                assert right == want[q["category"]]["colour"]
            if q["category"] == "closer":
                zs = {M._name(o): o["z"] for o in sc.objects}
                assert right == min(q["options"], key=zs.get)
            if q["category"] == "count":
                assert right == str(len(sc.objects))
    assert seen == set(M.QUESTION_SETS[question_set])


def test_a_bad_setting_is_refused_before_any_work(tmp_path):
    with pytest.raises(SystemExit) as e:
        M.main(["--quick", "--out", str(tmp_path / "x"), "--set", "question_set=bogus"])
    assert e.value.code == 2 and not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("miniature")
    assert M.main(["--quick", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_results_in_the_schema(quick):
    res = json.loads((quick / "results.json").read_text())
    assert set(res["arms"]) == {"understanding", "unimrg"}
    for arm in res["arms"].values():
        assert len(arm["seeds"]) == 2
        assert all(0.0 <= a <= 1.0 for a in arm["seeds"].values())
        assert arm["mean"] == pytest.approx(np.mean(list(arm["seeds"].values())))
        assert arm["std"] >= 0
        assert all(len(c) == res["config"]["steps"] for c in arm["loss"].values())
    unimrg = next(iter(res["arms"]["unimrg"]["loss"].values()))[0]
    assert {"understanding", "reconstruction", "depth", "segmentation"} <= set(unimrg)
    assert set(next(iter(res["arms"]["understanding"]["loss"].values()))[0]) == {
        "step",
        "understanding",
    }
    for arm in res["arms"].values():
        assert all(0.0 <= u <= 1.0 for u in arm["image_use"].values())
    diff = res["arms"]["unimrg"]["spatial_diff"]
    base, four = res["arms"]["understanding"]["spatial"], res["arms"]["unimrg"]["spatial"]
    assert diff["seeds"] == {s: pytest.approx(four[s] - base[s]) for s in base}
    assert res["config"]["steps"] == 3 and res["config"]["wall_s"] > 0
    # --quick post-trains a 2-step understanding-only base, whose own scores are reported
    assert res["base"]["steps"] == 2 and set(res["base"]["seeds"]) == {"0", "1"}
    assert all(len(c) == 2 for c in res["base"]["loss"].values())
    assert Image.open(quick / "results.png").size[0] > 100


def test_a_training_gives_the_same_numbers_in_whichever_process_it_runs(quick, tmp_path):
    # The fixture ran the trainings in a pool of two spawned processes (jobs=2, the default);
    # run them again one after another in this process.
    assert M.main(["--quick", "--out", str(tmp_path), "--set", "jobs=1"]) == 0
    pooled = json.loads((quick / "results.json").read_text())["arms"]
    inline = json.loads((tmp_path / "results.json").read_text())["arms"]
    for arm in pooled:
        assert pooled[arm]["loss"] == inline[arm]["loss"]
        assert pooled[arm]["seeds"] == inline[arm]["seeds"]


def test_arm_weights_scale_only_the_auxiliary_tasks():
    cfg = M.Config(aux_weight=0.25)
    assert M.arm_weights("unimrg", cfg) == {
        "understanding": 1.0,
        "reconstruction": 0.25,
        "depth": 0.25,
        "segmentation": 0.25,
    }
    assert M.arm_weights("understanding", cfg)["depth"] == 0.0


def test_quick_run_data_is_in_the_contract(quick):
    from pipeline.shards import Layout, image_bytes
    from trainer.evaluation.benchmarks import read_benchmark

    (work,) = (quick / "work").iterdir()
    layout = Layout(work / "out")
    shards = layout.image_shards()
    assert shards
    for shard in shards:
        ids = pq.read_table(shard, columns=["image_id"]).column(0).to_pylist()
        n = int(shard.stem.split("-")[1])
        depth = pq.read_table(layout.label_shard("depth", M.LABEL_FP["depth"], n))
        seg = pq.read_table(layout.label_shard("segment", M.LABEL_FP["segment"], n))
        assert depth.column("image_id").to_pylist() == ids == seg.column("image_id").to_pylist()
        edges = np.asarray(Image.open(io.BytesIO(image_bytes(seg.column("target")[0].as_py()))))
        assert set(np.unique(edges).tolist()) <= {0, 255} and edges.max() == 255
        d = np.asarray(Image.open(io.BytesIO(image_bytes(depth.column("target")[0].as_py()))))
        assert d.min() == 0 and d.max() == 255  # min-max scaled; near bright
        assert d[-1].mean() > d[0].mean()  # the ground's bottom rows are nearer than the sky
        assert seg.column("n_masks")[0].as_py() == len(seg.column("masks")[0].as_py())
    rows = read_benchmark(work / "test" / "test.tsv", "mcq")
    assert rows and {r["category"] for r in rows} <= set(M.QUESTION_SETS["order"])


def test_the_kmeans_codebook_uses_every_code_and_groups_similar_patches():
    import torch
    from transformers import JanusVQVAE, JanusVQVAEConfig

    from trainer.adapters.janus import nearest_codes

    torch.manual_seed(0)
    vq = JanusVQVAE(
        JanusVQVAEConfig(
            embed_dim=8,
            num_embeddings=16,
            latent_channels=32,
            base_channels=32,
            channel_multiplier=[1, 1, 1],
            num_res_blocks=1,
            projection_dim=16,
            image_token_embed_dim=16,
            num_hidden_layers=1,
            num_patches=4,
        )
    ).eval()
    rng = np.random.default_rng(0)
    scenes = [M.render_scene(rng, 16) for _ in range(40)]
    targets = M.fit_targets({str(i): sc for i, sc in enumerate(scenes)}, n=40)
    assert targets.shape == (120, 3, 16, 16) and targets.dtype == torch.uint8
    with torch.no_grad():
        h = vq.quant_conv(vq.encoder(targets.float().div(127.5).sub(1.0)))
        before = nearest_codes(h, vq.quantize.embedding.weight).unique().numel()
    used = M.fit_codebook(vq, targets, 16, seed=0)
    assert used == 16 >= before
    book = vq.quantize.embedding.weight
    assert torch.allclose(book.norm(dim=1), torch.ones(16), atol=1e-5)
    # each code is the normalised mean of its members: members are closer to it than to others
    z = torch.nn.functional.normalize(h.permute(0, 2, 3, 1).reshape(-1, 8), dim=-1)
    codes = nearest_codes(h, book).flatten()
    own = (z * book[codes]).sum(1)
    assert (own >= (z @ book.t()).max(1).values - 1e-5).all()
