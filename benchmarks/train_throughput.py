"""Trainer throughput: the real training loop on the Janus-Pro-1B (or -7B) architecture, one run.

Runs `trainer.loop.Trainer` (the code `unimrg train` runs: DataLoader workers, four task batches
per step, bf16 autocast, AdamW, clipping) on synthetic data made on the spot: N 640x480 JPEGs
ingested into image shards, depth and segmentation label shards (PNG targets) and one LLaVA
conversation per image. The model is `JanusConfig` sized like Janus-Pro-1B (24-layer 2048-wide
Llama, SigLIP-L/16 at 384 px, 16384-code VQ; 576 image tokens) with random weights: weights do
not change the cost of a step. Nothing is checkpointed.

Reports, over the steps after --warmup: step time split into data wait (blocked on the
DataLoader) and compute, samples/s, and model FLOPs utilisation against the card's dense bf16
peak and against a bf16 matmul measured in the same run.

    PYTHONPATH=. python benchmarks/train_throughput.py                       # GPU, Janus-Pro-1B
    PYTHONPATH=. python benchmarks/train_throughput.py --batch-size 8 --gradient-checkpointing
    PYTHONPATH=. torchrun --nproc_per_node 8 benchmarks/train_throughput.py \
        --arch janus-pro-7b --parallel fsdp --gradient-checkpointing        # FSDP, Janus-Pro-7B
    python benchmarks/train_throughput.py --tiny --device cpu               # seconds; the test

Needs torch, transformers, pyarrow, pillow, rich; not prefect.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


#: Janus-Pro language models (deepseek-ai/Janus-Pro-1B / -7B config.json): layers, width, MLP,
#: heads; SigLIP-L/16 at 384 px and the 16384-code VQ are the same in both.
ARCHS = {"janus-pro-1b": (24, 2048, 5632, 16), "janus-pro-7b": (30, 4096, 11008, 32)}


def janus_pro_1b_config(image_token_id: int, layers: int | None = None, arch: str = "janus-pro-1b"):
    from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    depth, width, mlp, heads = ARCHS[arch]
    text = LlamaConfig(
        vocab_size=102400,
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers or depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=16384,
        rms_norm_eps=1e-6,
    )
    vision = JanusVisionConfig(num_hidden_layers=layers or 24)
    return JanusConfig(
        text_config=text,
        vision_config=vision,
        vq_config=JanusVQVAEConfig(),
        image_token_id=image_token_id,
    )


def build_adapter(tiny: bool, device: str, layers: int | None = None, arch: str = "janus-pro-1b"):
    import torch

    from trainer.adapters.janus.adapter import JanusAdapter
    from trainer.adapters.janus.tiny import tiny_tokenizer

    if tiny:
        return JanusAdapter.load("tiny-random", device=device)
    from transformers import JanusForConditionalGeneration

    tok = tiny_tokenizer()
    config = janus_pro_1b_config(tok.convert_tokens_to_ids("<image_placeholder>"), layers, arch)
    torch.manual_seed(0)
    with torch.device(device):
        model = JanusForConditionalGeneration(config)
    return JanusAdapter(model, tok, random_weights=True, source=f"{arch}-architecture")


def make_data(root: Path, n_images: int, size: tuple[int, int]):
    """Ingested JPEGs + label shards + LLaVA JSONL under `root`; returns the parsed manifest."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.ingest import ingest
    from pipeline.manifest import parse_manifest
    from pipeline.shards import Layout, write_parquet_atomic

    imgs = root / "images"
    imgs.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    convs = []
    for i in range(n_images):
        base = np.stack(
            [(xx * (1 + i % 5) + yy) % 256, (yy * 2 + i * 17) % 256, (xx + yy * 3) % 256], -1
        ).astype(np.float32)
        base += rng.normal(0, 12, base.shape)  # texture, so JPEGs have realistic sizes
        Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(imgs / f"{i:05d}.jpg", quality=90)
        convs.append(
            {
                "id": str(i),
                "image": f"{i:05d}.jpg",
                "conversations": [
                    {
                        "from": "human",
                        "value": "<image>\nDescribe the image in detail, including the "
                        "objects, their colours, their positions and what is happening.",
                    },
                    {
                        "from": "gpt",
                        "value": " ".join(
                            [
                                "The picture shows a smooth colour gradient with "
                                "diagonal stripes and fine grain across the frame."
                            ]
                            * 4
                        ),
                    },
                ],
            }
        )
    (root / "conv.jsonl").write_text("\n".join(json.dumps(c) for c in convs))
    m = parse_manifest(
        {
            "output_dir": "out",
            "shard_size": 256,
            "sources": [],
            "understanding": [{"path": "conv.jsonl", "image_root": "images"}],
            # Listed so the manifest allows depth and segmentation; never run (labels below).
            "stages": {"depth": {"model": "tiny-random"}, "segment": {"model_type": "tiny-random"}},
            "trainer": {"model": "benchmark", "max_steps": 1},
        },
        base_dir=root,
    )
    ingest(m, progress=False)
    layout = Layout(m.out)
    schema = pa.schema([("image_id", pa.string()), ("error", pa.string()), ("target", pa.binary())])
    for shard in layout.image_shards():
        t = pq.read_table(shard, columns=["image_id", "image"])
        depth, seg = [], []
        for iid, img in zip(t.column(0).to_pylist(), t.column(1).to_pylist()):
            g = np.asarray(Image.open(io.BytesIO(img["bytes"])).convert("L"))
            edges = (np.abs(np.diff(g.astype(int), axis=1, prepend=0)) > 40).astype(np.uint8) * 255
            for rows, arr in ((depth, 255 - g), (seg, edges)):
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                rows.append({"image_id": iid, "error": None, "target": buf.getvalue()})
        write_parquet_atomic(
            pa.Table.from_pylist(depth, schema=schema),
            layout.label_dir("depth", "bench") / shard.name,
        )
        write_parquet_atomic(
            pa.Table.from_pylist(seg, schema=schema),
            layout.label_dir("segment", "bench") / shard.name,
        )
    return m


def step_flops(adapter, trainer) -> float:
    """Model FLOPs of one optimizer step (forward + backward = 3x forward), trainable path.

    Per sequence of T tokens: 6 * P_lm * T for the language model's matmuls (embeddings
    excluded), 6 * T^2 * d per layer for causal attention, the heads on the positions that carry
    loss, and 6 * P_vision * 576 for the understanding encoder. The frozen VQ encoder (forward
    only) is not counted.
    """
    model = adapter.model
    cfg = model.config.text_config
    d, layers = cfg.hidden_size, cfg.num_hidden_layers
    lm = model.model.language_model
    p_lm = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n)
    p_vis = sum(p.numel() for p in model.model.vision_model.parameters())
    p_vis += sum(p.numel() for p in model.model.aligner.parameters())
    p_gen_head = sum(p.numel() for p in model.model.generation_head.parameters())
    p_gen_in = sum(p.numel() for p in model.model.generation_aligner.parameters())
    n_img = adapter.num_image_tokens
    vocab = cfg.vocab_size
    enc = trainer.dataset.encoder
    plan, ds = trainer.plan, trainer.dataset
    total = 0.0
    for k in range(trainer.micro_per_step):
        for task, item, _seed, _k in plan.batch(k):
            if task == "understanding":
                ids, labels = enc.understanding(ds.conversations[item])
                t = len(ids)
                heads = 2 * d * vocab * sum(1 for x in labels if x != -100)
            else:
                prompts = ds.prompts[task]
                t = sum(len(enc.generation(p)) for p in prompts) / len(prompts) + n_img - 1
                heads = 2 * (p_gen_head + p_gen_in) * n_img
            fwd = 2 * p_lm * t + 2 * t * t * d * layers + heads + 2 * p_vis * n_img
            total += 3 * fwd
    return total


def matmul_tflops(device: str) -> float | None:
    import torch

    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12


def run(args) -> dict:
    import torch

    from trainer.loop import Trainer
    from trainer.ranks import Dist

    dist_ctx = Dist.setup(group=args.parallel == "fsdp")  # torchrun's ranks, else one
    device = args.device
    if device == "auto":
        device = dist_ctx.device
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (2 if args.tiny else 16)
    n_images = args.images or (16 if args.tiny else 512)
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        t0 = time.perf_counter()
        m = make_data(Path(tmp), n_images, (64, 48) if args.tiny else (640, 480))
        data_s = time.perf_counter() - t0
        adapter = build_adapter(args.tiny, device, args.layers, args.arch)
        gc = args.gradient_checkpointing
        if gc is None:
            gc = (
                device.startswith("cuda")
                and torch.cuda.get_device_properties(device).total_memory < 120 * 2**30
            )
        steps = args.warmup + args.steps
        trainer_cfg = m.trainer.model_copy(
            update={
                "model": "benchmark",
                "batch_size": batch,
                "max_steps": steps,
                "log_every": 1,
                "save_every": 10**9,
                "eval_every": 10**9,
                "gradient_checkpointing": gc,
                "grad_accum": 1,
                "parallel": args.parallel,
            }
        )
        m = m.model_copy(update={"trainer": trainer_cfg})
        workers = args.workers if args.workers is not None else (0 if args.tiny else 8)
        trainer = Trainer(
            m,
            "bench",
            Path(tmp) / "run",
            dist_ctx,
            {"depth": "bench", "segment": "bench"},
            None,
            workers,
            probe_count=0,
            adapter=adapter,
            checkpoints=False,
        )
        flops = step_flops(adapter, trainer)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        trainer.run(progress=not args.quiet)
        if not trainer.is_main:
            dist_ctx.close()
            return {}
        log = [json.loads(x) for x in (Path(tmp) / "run" / "log.jsonl").read_text().splitlines()]
        peak_mem = (
            torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else None
        )
    dist_ctx.close()
    measured = log[args.warmup :]
    step = statistics.median(r["step_s"] for r in measured)
    wait = statistics.median(r["data_wait_s"] for r in measured)
    samples = trainer.micro_per_step * batch * dist_ctx.world
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    ceiling = matmul_tflops(device)
    achieved = flops / step / 1e12  # per rank: each rank's own batches
    n_params = sum(p.numel() for p in adapter.model.parameters())
    return {
        "device": name,
        "model": "tiny-random" if args.tiny else f"{args.arch} architecture",
        "parallel": f"{args.parallel} x {dist_ctx.world}",
        "params_b": round(n_params / 1e9, 3),
        "batch_per_task": batch,
        "samples_per_step": samples,
        "gradient_checkpointing": gc,
        "workers": workers,
        "steps_measured": len(measured),
        "step_s": round(step, 4),
        "data_wait_s": round(wait, 4),
        "compute_s": round(step - wait, 4),
        "data_wait_share": round(wait / step, 4),
        "samples_per_s": round(samples / step, 2),
        "model_tflops_per_step": float(f"{flops / 1e12:.4g}"),
        "achieved_tflops": float(f"{achieved:.4g}"),
        "mfu_vs_spec": round(achieved / peak, 4) if peak else None,
        "mfu_vs_measured_matmul": round(achieved / ceiling, 4) if ceiling else None,
        "matmul_tflops": round(ceiling, 1) if ceiling else None,
        "peak_mem_gib": round(peak_mem, 1) if peak_mem else None,
        "data_setup_s": round(data_s, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--tiny", action="store_true", help="tiny-random Janus, 64x48 images (CPU test)")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="steps run before measuring")
    p.add_argument("--batch-size", type=int, help="per task per step (default 16; tiny 2)")
    p.add_argument("--images", type=int, help="synthetic images (default 512; tiny 16)")
    p.add_argument("--workers", type=int, help="DataLoader workers (default 8; tiny 0)")
    p.add_argument("--threads", type=int, default=1, help="CPU only: torch threads")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on when the GPU has < 120 GiB",
    )
    p.add_argument(
        "--layers",
        type=int,
        help="smoke checks only: LM and vision depth (default: Janus-Pro-1B's 24 each)",
    )
    p.add_argument("--arch", choices=sorted(ARCHS), default="janus-pro-1b", help="model size")
    p.add_argument(
        "--parallel",
        choices=["ddp", "fsdp"],
        default="ddp",
        help="trainer.parallel (fsdp: run under torchrun; one process is a 1-rank FSDP)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    result = run(args)
    if not result:  # not the main rank
        return result
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
