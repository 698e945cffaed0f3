"""Depth stage: alignment, schema, 16-bit round trip, target, fingerprint, OOM back-off,
quarantine, tiny-random loading, byte-identical reruns, and the benchmark at tiny size."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.depth_png import decode_depth_png16, depth_target, quantize_depth
from pipeline.manifest import parse_manifest
from pipeline.shards import IMAGE_SCHEMA, Layout, read_quarantine, write_parquet_atomic
from pipeline.stage import build_stage, run_shard, run_stage
from pipeline.stages.depth.model import ModelNotFoundError, tiny_random_model_dir
from pipeline.stages.depth.stage import DEPTH_SCHEMA, DepthStage, resized_shape
from tests.conftest import encode, synthetic_image, write_image_shard

ROOT = Path(__file__).resolve().parents[2]


def tiny_stage(**kw) -> DepthStage:
    # input_size 42: three patches on the short side, so a forward takes milliseconds.
    return DepthStage(
        **{"model": "tiny-random", "input_size": 42, "batch_size": 2, "device": "cpu", **kw}
    )


def label_rows(path: str | Path) -> list[dict]:
    """Rows with image cells (`{"bytes", "path"}`, the `datasets` Image layout) as bytes."""
    from pipeline.shards import image_bytes

    rows = pq.read_table(path).to_pylist()
    for r in rows:
        for c in ("depth_png16", "target"):
            r[c] = image_bytes(r[c])
    return rows


def test_resized_shape_keeps_aspect_and_multiple_of_14():
    assert resized_shape(480, 640, 518) == (518, 686)  # 640 * 518 / 480 = 690.7 -> 686
    assert resized_shape(640, 480, 518) == (686, 518)
    assert resized_shape(64, 64, 520) == (518, 518)  # 520 rounds to the nearest multiple, 518
    for h, w in [(31, 1000), (1000, 31), (97, 53)]:
        rh, rw = resized_shape(h, w, 100)
        assert rh % 14 == 0 and rw % 14 == 0 and min(rh, rw) == 98


def test_labels_aligned_with_image_shards_and_schema(image_shards: Layout):
    stage = tiny_stage()
    results = run_stage(stage, image_shards)
    assert [r.shard for r in results] == [0, 1] and all(r.errors == 0 for r in results)
    for res, image_shard in zip(results, image_shards.image_shards(), strict=True):
        table = pq.read_table(res.path)
        assert table.schema.equals(DEPTH_SCHEMA)
        images = pq.read_table(image_shard).to_pylist()
        rows = label_rows(res.path)
        assert [r["image_id"] for r in rows] == [r["image_id"] for r in images]
        for row, img in zip(rows, images, strict=True):
            assert row["error"] is None
            assert (row["width"], row["height"]) == (img["width"], img["height"])
            depth = Image.open(io.BytesIO(row["depth_png16"]))
            target = Image.open(io.BytesIO(row["target"]))
            assert depth.mode.startswith("I;16") and target.mode == "L"
            assert depth.size == target.size == (img["width"], img["height"])
            assert row["depth_min"] <= row["depth_max"]
    # The files are the cache: a second run computes nothing.
    assert not any(r.computed for r in run_stage(stage, image_shards))


def test_depth_png16_round_trip_within_quantisation(image_shards: Layout):
    stage = tiny_stage()
    (res, _) = run_stage(stage, image_shards)
    images = [r["image"]["bytes"] for r in pq.read_table(image_shards.image_shard(0)).to_pylist()]
    floats = stage.predict(images)
    for row, ref in zip(label_rows(res.path), floats, strict=True):
        back = decode_depth_png16(row["depth_png16"], row["depth_min"], row["depth_max"])
        assert back.shape == ref.shape
        assert np.isclose(row["depth_min"], ref.min()) and np.isclose(row["depth_max"], ref.max())
        step = (row["depth_max"] - row["depth_min"]) / 65535
        assert step > 0, "tiny-random gave a flat map; the test would not test anything"
        err = np.abs(back.astype(np.float64) - ref.astype(np.float64)).max()
        assert err <= 0.5 * step * 1.01 + 1e-6 * abs(row["depth_max"])


def test_target_matches_independent_numpy():
    d = np.array([[0.0, 1.0], [2.0, 4.0]], np.float32)
    u16, u8, mn, mx = quantize_depth(torch.from_numpy(d)[None])
    # (d - min) / (max - min) * 255, truncated: 63.75 -> 63, 127.5 -> 127.
    assert u8[0].tolist() == [[0, 63], [127, 255]]
    assert u16[0].to(torch.int32).tolist() == [[0, 16384], [32768, 65535]]  # rounded
    assert (mn.item(), mx.item()) == (0.0, 4.0)

    rng = np.random.default_rng(0)
    arr = (rng.random((2, 5, 7)) * 3 - 1).astype(np.float32)
    _, u8, _, _ = quantize_depth(torch.from_numpy(arr))
    for k in range(2):
        ref = ((arr[k] - arr[k].min()) / (arr[k].max() - arr[k].min()) * 255.0).astype(np.uint8)
        np.testing.assert_array_equal(u8[k].numpy(), ref)
        np.testing.assert_array_equal(depth_target(arr[k]), ref)
    flat = quantize_depth(torch.ones(1, 3, 3))
    assert flat[0].to(torch.int32).max() == 0 and flat[1].max() == 0


def test_target_in_shard_matches_numpy_from_its_depth(image_shards: Layout):
    (res, _) = run_stage(tiny_stage(), image_shards)
    for row in label_rows(res.path):
        target = np.asarray(Image.open(io.BytesIO(row["target"])))
        depth = decode_depth_png16(row["depth_png16"], row["depth_min"], row["depth_max"])
        # From the 16-bit depth, the target can be off by one at a truncation boundary.
        assert np.abs(target.astype(int) - depth_target(depth).astype(int)).max() <= 1
        # Near is bright: the largest value (Depth Anything predicts inverse depth) is 255.
        assert target.flat[np.argmax(depth)] == 255 and target.flat[np.argmin(depth)] == 0


def test_fingerprint_changes_only_with_output_changing_parameters(tmp_path):
    base = tiny_stage()
    fp = base.fingerprint()
    assert base._model is None, "the fingerprint must not load the model"
    # Not output-changing.
    assert tiny_stage(batch_size=7).fingerprint() == fp
    assert tiny_stage(input_size=44).fingerprint() == fp  # 44 rounds to 42 as well
    assert tiny_stage(dtype="float32").fingerprint() == fp  # what `auto` is on CPU
    # Output-changing.
    assert tiny_stage(input_size=56).fingerprint() != fp
    assert tiny_stage(dtype="bfloat16").fingerprint() != fp
    # Model weights: a copy hashes the same weights; a changed tensor does not.
    local = tmp_path / "models" / "depth"
    shutil.copytree(tiny_random_model_dir(), local)
    same = tiny_stage(model="models/depth", base_dir=tmp_path)
    assert same.model_dir() == local
    from safetensors.torch import load_file, save_file

    weights = load_file(local / "model.safetensors")
    key = next(iter(sorted(weights)))
    weights[key] = weights[key] + 1
    other = tmp_path / "models" / "depth2"
    shutil.copytree(local, other)
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    fp_a = same.fingerprint()
    assert tiny_stage(model="models/depth", base_dir=tmp_path, batch_size=1).fingerprint() == fp_a
    assert tiny_stage(model="models/depth2", base_dir=tmp_path).fingerprint() not in (fp_a, fp)


def test_missing_hub_model_names_the_field():
    stage = tiny_stage(model="nobody/not-a-cached-model")
    with pytest.raises(ModelNotFoundError, match="stages.depth.model"):
        stage.fingerprint()


def test_from_config_resolves_local_dir_against_manifest(tmp_path):
    shutil.copytree(tiny_random_model_dir(), tmp_path / "weights" / "da")
    m = parse_manifest(
        {
            "output_dir": "out",
            "sources": [{"name": "s", "path": "imgs"}],
            "stages": {"depth": {"model": "weights/da", "batch_size": 4, "input_size": 28}},
        },
        base_dir=tmp_path,
    )
    stage = build_stage("depth", m)
    assert isinstance(stage, DepthStage)
    assert (stage.batch_size, stage.input_size) == (4, 28)
    assert stage.model_dir() == tmp_path / "weights" / "da"
    assert not stage.uses_random_weights() and tiny_stage().uses_random_weights()


def test_cuda_oom_halves_the_batch_and_says_so(layout, monkeypatch, caplog):
    write_image_shard(layout, 0, [synthetic_image(i, (70, 56)) for i in range(5)])
    shard = layout.image_shard(0)
    reference = tiny_stage(batch_size=4)
    reference.setup()
    reference.run_shard(shard, layout.root / "ref.parquet")

    stage = tiny_stage(batch_size=4)
    stage.setup()
    real = stage._model_forward
    calls: list[int] = []

    def forward(pixel_values):
        calls.append(pixel_values.shape[0])
        if pixel_values.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(pixel_values)

    monkeypatch.setattr(stage, "_model_forward", forward)
    with caplog.at_level(logging.WARNING, logger="pipeline.depth"):
        rows, bad = stage.run_shard(shard, layout.root / "oom.parquet")
    assert rows == 5 and bad == []
    assert calls[0] == 4 and max(calls[1:]) <= 2
    assert any("halving the batch to 2" in r.getMessage() for r in caplog.records)
    assert pq.read_table(layout.root / "oom.parquet").equals(
        pq.read_table(layout.root / "ref.parquet")
    )


def test_oom_on_a_single_image_marks_the_row(layout, monkeypatch):
    write_image_shard(layout, 0, [synthetic_image(0, (70, 56))])
    stage = tiny_stage()
    stage.setup()

    def forward(pixel_values):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(stage, "_model_forward", forward)
    res = run_shard(stage, layout, layout.image_shard(0))
    assert res.errors == 1
    assert "out of memory" in label_rows(res.path)[0]["error"]


def test_a_full_disk_while_writing_a_label_shard_names_it_and_commits_nothing(layout, monkeypatch):
    """The overlapped writer's error named no file, and a failed write was still followed by
    committing the shard (with the rows written before it: none here, a 0-row shard)."""
    import errno

    write_image_shard(layout, 0, [synthetic_image(i, (64, 48)) for i in range(3)])

    def full(self, table, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    stage = tiny_stage()
    out = layout.label_shard("depth", stage.fingerprint(), 0)
    with pytest.raises(OSError) as exc:
        run_shard(stage, layout, layout.image_shard(0))
    assert exc.value.errno == errno.ENOSPC and exc.value.filename == str(out), exc.value
    assert not out.exists() and not list(out.parent.glob(".*.tmp"))


def test_corrupt_row_is_quarantined_not_a_crash(layout):
    good = [encode(synthetic_image(i, (64, 48))) for i in range(3)]
    bad = good[1][:200] + b"\x00garbage" * 10  # a JPEG header, then nonsense
    rows = []
    for i, data in enumerate([good[0], bad, good[2], b"not an image at all"]):
        rows.append(
            {
                "image_id": hashlib.sha256(data).hexdigest(),
                "image": {"bytes": data, "path": f"x{i}.jpg"},
                "width": 64,
                "height": 48,
                "source": "test",
            }
        )
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), layout.image_shard(0))
    res = run_shard(tiny_stage(), layout, layout.image_shard(0))
    out = label_rows(res.path)
    assert res.rows == 4 and res.errors == 2
    assert [r["image_id"] for r in out] == [r["image_id"] for r in rows]
    assert out[0]["error"] is None and out[2]["error"] is None and out[0]["depth_png16"]
    assert "undecodable" in out[1]["error"] and out[1]["depth_png16"] is None
    quarantine = read_quarantine(layout).to_pylist()
    assert {q["image_id"] for q in quarantine} == {rows[1]["image_id"], rows[3]["image_id"]}
    assert all(q["stage"] == "depth" for q in quarantine)


def test_exif_orientation_gives_the_image_rows_size(layout):
    img = synthetic_image(3, (64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the row is 40 wide, 64 high
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    data = buf.getvalue()
    row = {
        "image_id": hashlib.sha256(data).hexdigest(),
        "image": {"bytes": data, "path": "r.jpg"},
        "width": 40,
        "height": 64,
        "source": "test",
    }
    write_parquet_atomic(pa.Table.from_pylist([row], schema=IMAGE_SCHEMA), layout.image_shard(0))
    out = label_rows(run_shard(tiny_stage(), layout, layout.image_shard(0)).path)[0]
    assert (out["width"], out["height"]) == (40, 64)
    assert Image.open(io.BytesIO(out["target"])).size == (40, 64)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_exif_orientation_outside_jpeg_gives_the_image_rows_size(layout, fmt):
    """PIL (so the image row) honours a PNG's eXIf orientation too; the depth must follow it."""
    from pipeline.images import exif_orientation as _exif_orientation

    img = synthetic_image(4, (64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif)
    data = buf.getvalue()
    assert _exif_orientation(data) == 6 and _exif_orientation(encode(img, "PNG")) == 1
    row = {
        "image_id": hashlib.sha256(data).hexdigest(),
        "image": {"bytes": data, "path": "r.img"},
        "width": 40,
        "height": 64,
        "source": "test",
    }
    write_parquet_atomic(pa.Table.from_pylist([row], schema=IMAGE_SCHEMA), layout.image_shard(0))
    out = label_rows(run_shard(tiny_stage(), layout, layout.image_shard(0)).path)[0]
    assert out["error"] is None and (out["width"], out["height"]) == (40, 64)
    assert Image.open(io.BytesIO(out["target"])).size == (40, 64)


def test_cuda_host_copy_event_is_recorded_on_the_models_device(monkeypatch):
    """The writer reads the pinned buffers after `event.synchronize()`: the event must follow the
    copies on the model device's stream (`record()` alone takes the current device's, cuda:0,
    under `device: cuda:1`). The CUDA branch of `_postprocess`, with fakes for what needs a GPU."""
    from pipeline.stages.depth.overlap import Prepared, result_rows

    stage = tiny_stage()
    stage.setup()
    recorded: list = []

    class FakeEvent:
        def record(self, stream=None):
            recorded.append(stream)

        def synchronize(self):
            pass

    real_empty = torch.empty
    monkeypatch.setattr(DepthStage, "_on_cuda", property(lambda self: True))
    monkeypatch.setattr(DepthStage, "_device", property(lambda self: torch.device("cuda", 1)))
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **kw: real_empty(*a, **kw))
    depth = torch.rand(2, 14, 14)
    res = stage._postprocess(Prepared([0, 1], [(20, 30), (20, 30)], None), depth)
    assert recorded == [("stream of", torch.device("cuda", 1))]
    rows = dict(result_rows(res, ["a", "b"]))
    assert rows[0]["image_id"] == "a" and (rows[1]["width"], rows[1]["height"]) == (30, 20)


def test_tiny_random_loads_through_the_real_loader(monkeypatch):
    from transformers import DepthAnythingForDepthEstimation

    d = tiny_random_model_dir()
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {
        p.name for p in d.iterdir()
    }
    loaded: list[Path] = []
    real = DepthAnythingForDepthEstimation.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        loaded.append(Path(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(DepthAnythingForDepthEstimation, "from_pretrained", classmethod(spy))
    stage = tiny_stage()
    stage.setup()
    assert loaded == [d]
    assert isinstance(stage._model, DepthAnythingForDepthEstimation)
    assert stage._model.config.backbone_config.hidden_size == 32


def test_tiny_random_weights_are_reproducible(tmp_path, monkeypatch):
    first = (tiny_random_model_dir() / "model.safetensors").read_bytes()
    monkeypatch.setenv("UNIMRG_CACHE", str(tmp_path / "other-cache"))
    again = tiny_random_model_dir()
    assert again.is_relative_to(tmp_path)
    assert (again / "model.safetensors").read_bytes() == first


def test_reruns_are_byte_identical_on_cpu(tmp_path):
    layouts = []
    for name in ("a", "b"):
        lay = Layout(tmp_path / name)
        write_image_shard(
            lay, 0, [synthetic_image(i, s) for i, s in enumerate([(96, 64), (64, 96), (96, 64)])]
        )
        layouts.append(lay)
    # Different batch sizes, same fingerprint: the same bytes (CPU runs one image per forward).
    (a,) = run_stage(tiny_stage(batch_size=1), layouts[0])
    (b,) = run_stage(tiny_stage(batch_size=3), layouts[1])
    assert a.fingerprint == b.fingerprint
    assert Path(a.path).read_bytes() == Path(b.path).read_bytes()


def test_process_matches_run_shard(image_shards: Layout):
    stage = tiny_stage()
    (res, _) = run_stage(stage, image_shards)
    batch = pq.read_table(image_shards.image_shard(0)).to_batches()[0]
    assert stage.process(batch) == label_rows(res.path)


def test_benchmark_runs_at_tiny_size_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location(
        "depth_throughput", ROOT / "benchmarks" / "depth_throughput.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--tiny", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "bare forward" in out and "stage end to end" in out and "pipeline" in out
    assert {r["model"] for r in results} == {"tiny"}
    assert all(r["forward"] > 0 and r["stage"] > 0 and r["pipeline"] > 0 for r in results)


def test_batched_jpeg_decode_finds_the_bad_file(layout, monkeypatch):
    """The CUDA path decodes a batch of JPEGs in one call; one bad file must not fail the rest.
    Run that path on the CPU (torchvision's batched decode_jpeg works there too)."""
    monkeypatch.setattr(DepthStage, "_batch_decode_jpegs", lambda self: True)
    good = [encode(synthetic_image(i, (64, 48))) for i in range(3)]
    blobs = [good[0], good[1][:300] + b"\x00" * 50, good[2]]
    stage = tiny_stage()
    stage.setup()
    images, errors = stage._decode([0, 1, 2], blobs)
    assert set(images) == {0, 2} and set(errors) == {1}
    assert tuple(images[0].shape) == (3, 48, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_labels_match_cpu_labels(image_shards: Layout):
    """nvjpeg decode, GPU resize, bf16 forward and the overlapped writer on a real GPU."""
    cpu = run_stage(tiny_stage(), image_shards)
    gpu = run_stage(tiny_stage(device="cuda", dtype="float32"), image_shards)
    bf16 = run_stage(tiny_stage(device="cuda"), image_shards)
    assert bf16[0].fingerprint != gpu[0].fingerprint
    for a, b, c in zip(cpu, gpu, bf16, strict=True):
        for ra, rb, rc in zip(
            label_rows(a.path), label_rows(b.path), label_rows(c.path), strict=True
        ):
            assert ra["image_id"] == rb["image_id"] == rc["image_id"] and rc["error"] is None
            da = decode_depth_png16(ra["depth_png16"], ra["depth_min"], ra["depth_max"])
            db = decode_depth_png16(rb["depth_png16"], rb["depth_min"], rb["depth_max"])
            # nvjpeg and libjpeg differ by a few grey levels; the depth maps must still agree.
            scale = ra["depth_max"] - ra["depth_min"]
            assert np.abs(da - db).mean() < 0.05 * scale


def test_rows_stream_out_in_order_as_row_groups(layout, monkeypatch):
    """Mixed sizes are computed bucket by bucket, out of row order; the writer still streams
    them in shard order, several row groups per file."""
    import pipeline.stages.depth.overlap as depth_module

    monkeypatch.setattr(depth_module, "_ROW_GROUP", 2)
    sizes = [(64, 48), (48, 64), (64, 48), (80, 40), (48, 64), (64, 48), (40, 80)]
    write_image_shard(layout, 0, [synthetic_image(i, s) for i, s in enumerate(sizes)])
    seen: list[int] = []
    stage = tiny_stage(batch_size=2)
    stage.setup()
    rows, bad = stage.run_shard(layout.image_shard(0), layout.root / "d.parquet", seen.append)
    assert rows == 7 and not bad and sum(seen) == 7
    pf = pq.ParquetFile(layout.root / "d.parquet")
    assert pf.metadata.num_row_groups >= 3
    out = pf.read().to_pylist()
    images = pq.read_table(layout.image_shard(0)).to_pylist()
    assert [r["image_id"] for r in out] == [r["image_id"] for r in images]
    assert [(r["width"], r["height"]) for r in out] == sizes


def test_hub_id_resolves_to_the_cached_snapshot(tmp_path, monkeypatch):
    """A hub id loads from the local Hugging Face cache; the fingerprint records its commit."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--depth-model"
    shutil.copytree(tiny_random_model_dir(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    stage = tiny_stage(model="org/depth-model")
    assert stage.is_hub_model() and stage.model_dir() == repo / "snapshots" / commit
    fp = stage.fingerprint()
    assert fp != tiny_stage().fingerprint()  # another model id, same weights
    assert tiny_stage(model="org/depth-model", revision="main").fingerprint() == fp
    stage.setup()
    assert stage._model.config.backbone_config.hidden_size == 32


def _plain_recipe(stage: DepthStage, blobs: list[bytes]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The labels written the plain way, one image at a time, no threads, no in-place tricks:
    torchvision decode, float, antialiased bicubic resize, normalise, forward, bilinear back,
    min-max quantise (the documented recipe, docs/depth.md)."""
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_image

    out = []
    for data in blobs:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
        h, w = img.shape[-2:]
        x = F.interpolate(
            img[None].float(),
            size=resized_shape(h, w, stage.input_size),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
        x = (x * stage._rescale - stage._mean) / stage._std
        with torch.inference_mode():
            d = stage._model(pixel_values=x).predicted_depth.float()
        full = F.interpolate(d[:, None], size=(h, w), mode="bilinear", align_corners=True)[:, 0]
        n = (full - full.amin()) / (full.amax() - full.amin())
        u16 = torch.round(n * 65535.0).to(torch.int32).to(torch.uint16)[0].numpy()
        out.append((u16, torch.floor(n * 255.0).to(torch.uint8)[0].numpy()))
    return out


def test_threaded_in_place_path_gives_the_plain_recipes_values(layout):
    """Decoding and resizing on worker threads, in-place quantisation, per-size batches (two
    sizes that share one model input shape in a batch) and the writer's I/O thread change no
    decoded value of the label rows."""
    import cv2

    sizes = [(96, 64), (93, 64), (96, 64), (64, 96), (93, 64)]
    images = [synthetic_image(i, s) for i, s in enumerate(sizes)]
    assert resized_shape(64, 96, 42) == resized_shape(64, 93, 42)
    shard = write_image_shard(layout, 0, images)
    stage = tiny_stage(batch_size=4)
    stage.setup()
    res = run_shard(stage, layout, shard, force=True)
    rows = label_rows(res.path)
    want = _plain_recipe(stage, [encode(im, "JPEG") for im in images])
    for row, (u16, u8) in zip(rows, want, strict=True):
        got16 = cv2.imdecode(np.frombuffer(row["depth_png16"], np.uint8), cv2.IMREAD_UNCHANGED)
        got8 = cv2.imdecode(np.frombuffer(row["target"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(got16, u16) and np.array_equal(got8, u8)


def test_quantize_in_place_equals_out_of_place():
    d = torch.randn(3, 17, 23) * 5
    d[2] = 1.5  # flat map
    want = quantize_depth(d.clone())
    scratch = d.clone()
    got = quantize_depth(scratch, inplace=True)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(scratch, d)  # it did use the input as scratch space
