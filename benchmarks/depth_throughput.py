"""Depth throughput, three ways, one run, one device, printed side by side:

  (a) bare forward  the model alone on pre-made tensors of the stage's input shape (the ceiling;
                    bf16 on CUDA, fp32 on CPU, batch --batch-size);
  (b) stage e2e     `DepthStage` from Parquet shards of JPEG bytes to written label shards
                    (decode, resize, forward, resize back, 16-bit + target PNGs, Parquet);
  (c) pipeline      transformers `pipeline("depth-estimation")` fed one PIL image at a time
                    (JPEG decode included), in its default float32: with a bfloat16 model its
                    postprocess fails (numpy has no bfloat16).

Architectures are Depth Anything V2 Small / Base / Large built from their configs with random
weights (no hub here): weights do not change the cost of a forward pass. Images are synthetic
640x480 JPEGs (the COCO-typical size), so the model input is 518x686.

    PYTHONPATH=. python benchmarks/depth_throughput.py --device cuda --models small,large \\
        --n-images 2048 --batch-size 32
    python benchmarks/depth_throughput.py --device cpu --models small --n-images 16
    python benchmarks/depth_throughput.py --tiny --device cpu      # seconds; what the tests run

Needs torch, torchvision, transformers, pyarrow, opencv; not prefect.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from pipeline.pretrained import from_pretrained  # noqa: E402
from pipeline.shards import IMAGE_SCHEMA, Layout, write_parquet_atomic  # noqa: E402
from pipeline.stage import run_shard  # noqa: E402
from pipeline.stages.depth.stage import DepthStage, resized_shape  # noqa: E402

# Depth Anything V2 configs as on the hub (`depth-anything/Depth-Anything-V2-*-hf`).
ARCHS = {
    "tiny": {
        "backbone": {
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "mlp_ratio": 2,
            "out_indices": [1, 2, 3, 4],
        },
        "reassemble_hidden_size": 32,
        "neck_hidden_sizes": [8, 16, 32, 32],
        "fusion_hidden_size": 16,
        "head_hidden_size": 8,
    },
    "small": {
        "backbone": {
            "hidden_size": 384,
            "num_hidden_layers": 12,
            "num_attention_heads": 6,
            "out_indices": [3, 6, 9, 12],
        },
        "reassemble_hidden_size": 384,
        "neck_hidden_sizes": [48, 96, 192, 384],
        "fusion_hidden_size": 64,
        "head_hidden_size": 32,
    },
    "base": {
        "backbone": {
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "out_indices": [3, 6, 9, 12],
        },
        "reassemble_hidden_size": 768,
        "neck_hidden_sizes": [96, 192, 384, 768],
        "fusion_hidden_size": 128,
        "head_hidden_size": 32,
    },
    "large": {
        "backbone": {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "out_indices": [5, 12, 18, 24],
        },
        "reassemble_hidden_size": 1024,
        "neck_hidden_sizes": [256, 512, 1024, 1024],
        "fusion_hidden_size": 256,
        "head_hidden_size": 32,
    },
}


def save_random_model(arch: str, folder: Path) -> int:
    """Save a random-weight Depth Anything V2 `arch` and its processor; returns the parameter count."""
    import torch
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    spec = ARCHS[arch]
    backbone = Dinov2Config(
        image_size=518, patch_size=14, reshape_hidden_states=False, **spec["backbone"]
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        **{k: v for k, v in spec.items() if k != "backbone"},
    )
    torch.manual_seed(0)
    model = DepthAnythingForDepthEstimation(config).eval()
    model.save_pretrained(folder)
    DPTImageProcessor(
        do_resize=True,
        size={"height": 518, "width": 518},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=False,
    ).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def synthetic_jpegs(n: int, width: int, height: int) -> list[bytes]:
    """Distinct, seeded photo-like JPEGs (smooth shading, shapes, a little noise)."""
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        a, b, c = rng.random(3) * 0.05
        img = (
            np.stack(
                [
                    np.sin(xx * a + i) * 60 + yy * 0.2,
                    np.cos(yy * b) * 60 + xx * 0.1,
                    np.sin((xx + yy) * c) * 60 + 80,
                ],
                -1,
            )
            + 100
        )
        for _ in range(4):
            cx, cy, r = (
                rng.integers(0, width),
                rng.integers(0, height),
                rng.integers(10, height // 3),
            )
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        img += rng.normal(0, 4, img.shape)
        buf = io.BytesIO()
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(
    layout: Layout, jpegs: list[bytes], width: int, height: int, shard_size: int
) -> list[Path]:
    import pyarrow as pa

    paths = []
    for n, start in enumerate(range(0, len(jpegs), shard_size)):
        rows = [
            {
                "image_id": hashlib.sha256(d).hexdigest(),
                "image": {"bytes": d, "path": f"{start + k}.jpg"},
                "width": width,
                "height": height,
                "source": "bench",
            }
            for k, d in enumerate(jpegs[start : start + shard_size])
        ]
        write_parquet_atomic(pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA), layout.image_shard(n))
        paths.append(layout.image_shard(n))
    return paths


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_forward(stage: DepthStage, shape: tuple[int, int], batch: int, n_images: int) -> float:
    """(a) images/s of the bare model on pre-made tensors (the model's dtype and device)."""
    import torch

    model = stage._model
    x = torch.randn(batch, 3, *shape, device=model.device).to(model.dtype)
    steps = max(1, n_images // batch)
    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels, allocator
            model(pixel_values=x)
        _sync(str(model.device))
        t0 = time.perf_counter()
        for _ in range(steps):
            model(pixel_values=x)
        _sync(str(model.device))
    return steps * batch / (time.perf_counter() - t0)


def bench_stage(stage: DepthStage, layout: Layout, shards: list[Path]) -> float:
    """(b) images/s from image shards (Parquet, JPEG bytes) to written label shards."""
    t0 = time.perf_counter()
    rows = sum(run_shard(stage, layout, s, force=True).rows for s in shards)
    return rows / (time.perf_counter() - t0)


def make_pipeline(model_dir: Path, device: str, input_size: int):
    """transformers' depth-estimation pipeline in its default float32, at the stage's input size."""
    import torch
    from transformers import AutoImageProcessor, DepthAnythingForDepthEstimation, pipeline

    model = from_pretrained(DepthAnythingForDepthEstimation, model_dir, dtype=torch.float32)
    size = max(14, round(input_size / 14) * 14)
    processor = from_pretrained(AutoImageProcessor, model_dir, size={"height": size, "width": size})
    return pipeline(
        "depth-estimation",
        model=model,
        image_processor=processor,
        device=device,
        trust_remote_code=False,
    )


def bench_pipeline(pipe, device: str, jpegs: list[bytes]) -> float:
    """(c) images/s of the pipeline fed one PIL image per call (JPEG decode included)."""
    from PIL import Image

    t0 = time.perf_counter()
    for data in jpegs:
        pipe(Image.open(io.BytesIO(data)))["depth"]
    _sync(device)
    return len(jpegs) / (time.perf_counter() - t0)


def _rate(x: float) -> str:
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--models", default="small,large", help=f"comma list of {sorted(ARCHS)}")
    p.add_argument("--n-images", type=int, default=512, help="images for (a) and (b)")
    p.add_argument("--pipeline-images", type=int, default=128, help="images for (c), the slow one")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--input-size", type=int, default=518, help="short side fed to the model")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--shard-size", type=int, default=256, help="images per image shard")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="tiny architecture, few small images, small input: a smoke run in seconds",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure (a), (b), (c) this many times, interleaved; report the best "
        "(steadier on a shared machine)",
    )
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.n_images, args.pipeline_images = "tiny", 8, 4
        args.batch_size, args.input_size, args.width, args.height, args.shard_size = (
            4,
            42,
            96,
            72,
            4,
        )
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    import torch
    from PIL import Image

    args = parse_args(argv)
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(ARCHS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(ARCHS)}")
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "CPU"
    print(
        f"device {device} ({gpu}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    jpegs = synthetic_jpegs(max(args.n_images, args.pipeline_images), args.width, args.height)
    shape = resized_shape(args.height, args.width, args.input_size)
    results = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"depth-bench-{name}-") as tmp:
            root = Path(tmp)
            params = save_random_model(name, root / "model")
            stage = DepthStage(
                model=str(root / "model"),
                batch_size=args.batch_size,
                input_size=args.input_size,
                device=device,
            )
            stage.setup()
            pipe = make_pipeline(root / "model", device, args.input_size)
            warm = Layout(root / "warm")
            for shard in write_shards(
                warm, jpegs[: args.batch_size], args.width, args.height, args.shard_size
            ):
                run_shard(stage, warm, shard, force=True)  # warm-up: kernels, nvjpeg, threads
            pipe(Image.open(io.BytesIO(jpegs[0])))
            layout = Layout(root / "timed")
            shards = write_shards(
                layout, jpegs[: args.n_images], args.width, args.height, args.shard_size
            )
            fwd = e2e = pipe_rate = 0.0
            stats: dict = {}
            for _ in range(max(1, args.repeats)):
                fwd = max(fwd, bench_forward(stage, shape, args.batch_size, args.n_images))
                stage.stats.clear()
                rate = bench_stage(stage, layout, shards)
                if rate > e2e:
                    e2e, stats = rate, {k: round(v, 3) for k, v in stage.stats.items()}
                pipe_rate = max(
                    pipe_rate, bench_pipeline(pipe, device, jpegs[: args.pipeline_images])
                )
            del stage, pipe
        results.append(
            {
                "model": name,
                "params_m": round(params / 1e6, 1),
                "device": gpu,
                "dtype": DepthStage(device=device).resolved_dtype(),
                "batch_size": args.batch_size,
                "input": f"{shape[0]}x{shape[1]}",
                "images": f"{args.width}x{args.height}",
                "forward": fwd,
                "stage": e2e,
                "pipeline": pipe_rate,
                "stage_vs_forward": e2e / fwd,
                "stage_vs_pipeline": e2e / pipe_rate,
                "stage_thread_seconds": stats,
            }
        )
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print()
    print(
        f"images {args.width}x{args.height} JPEG -> model input {shape[0]}x{shape[1]}, "
        f"batch {args.batch_size}, (a)/(b) {args.n_images} images, (c) {args.pipeline_images}"
    )
    header = (
        f"{'model':<7}{'params':>8}{'dtype':>10}  {'(a) bare forward':>17}"
        f"{'(b) stage end to end':>22}{'(c) pipeline, 1 img':>21}{'b/a':>7}{'b/c':>8}"
    )
    print(header)
    for r in results:
        print(
            f"{r['model']:<7}{r['params_m']:>7.1f}M{r['dtype']:>10}  {_rate(r['forward']):>11} img/s"
            f"{_rate(r['stage']):>16} img/s{_rate(r['pipeline']):>15} img/s"
            f"{r['stage_vs_forward']:>7.0%}{r['stage_vs_pipeline']:>7.1f}x"
        )
    for r in results:
        print(
            f"{r['model']}: stage compute-thread seconds {r['stage_thread_seconds']} "
            "(wait_input: starved of decoded images; wait_output: writer behind; "
            "tail: last batch to renamed file)"
        )
    print("(c) runs in float32: transformers' depth pipeline cannot postprocess bfloat16.")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
