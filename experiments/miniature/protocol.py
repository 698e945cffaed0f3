"""The protocol: a trained tokenizer, bases that already generate, four post-training arms.

`run(cfg, out)` does, through the project's own ingest, trainer, adapter and scorer:

1. the data (labels.py): scenes, conversations, captions, the held-out set, ingested, with exact
   depth and edge label shards;
2. the tokenizer (tokenizer.py): a Janus-architecture VQ trained on the scenes' images, depth and
   edge targets, once per setting (cached), and its gate;
3. `len(cfg.bases)` bases (model.py: a small Janus model, seeded per base, with that tokenizer),
   each pretrained on understanding and text-to-image (`BASE_WEIGHTS`; and reconstruction at
   `cfg.base_reconstruction`, 0 by default: `base_weights`) from random initialisation, as a
   real UMM is pretrained; the base gate: its held-out text-to-image loss
   is well below the codes' entropy given their position, and depends on the caption;
4. from each base, for each post-training seed, the arms (`ARMS`) at half the pretraining
   learning rate:
   understanding only; UniMRG (understanding + reconstruction + depth + segmentation);
   understanding + text-to-image replay (more generation, no image-to-X); understanding + depth;
5. every trained model scored on the held-out set (evaluation.py), the gates per run, and the
   paired statistics fixed before the run (report.py).

Trainings run `cfg.jobs` at a time, each in its own spawned process with `cfg.threads` torch
threads; a base's arms are queued when it finishes. `results.json` is rewritten after every
finished training, and a rerun continues (finished trainings are cache hits of the trainer,
finished scores are read back from each run's `miniature_eval.json`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ARMS", "BASE_WEIGHTS", "QUICK", "Config", "base_weights", "check", "run"]

_ZERO = {t: 0.0 for t in ("reconstruction", "depth", "segmentation", "text_to_image")}
#: arm -> trainer.loss_weights of its post-training (every task named)
ARMS = {
    "understanding": {"understanding": 1.0, **_ZERO},
    "unimrg": {
        "understanding": 1.0,
        **_ZERO,
        "reconstruction": 1.0,
        "depth": 1.0,
        "segmentation": 1.0,
    },
    "t2i_replay": {"understanding": 1.0, **_ZERO, "text_to_image": 1.0},
    "depth": {"understanding": 1.0, **_ZERO, "depth": 1.0},
}
#: the bases' pretraining: understanding and caption-to-image generation (and reconstruction at
#: `Config.base_reconstruction`: `base_weights`)
BASE_WEIGHTS = {"understanding": 1.0, **_ZERO, "text_to_image": 1.0}
#: bump when scoring changes: cached scores of older versions are recomputed
EVAL_VERSION = "1"


@dataclass
class Config:
    """Everything that sets the experiment's numbers (written into results.json)."""

    #: base seeds (each: its own initialisation and pretraining data order)
    bases: list[int] = field(default_factory=lambda: [0, 1, 2])
    #: post-training seeds (data order) per base: pairs = bases x post_seeds
    post_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] = field(default_factory=lambda: list(ARMS))
    # data
    image_size: int = 32
    train_scenes: int = 2000
    test_scenes: int = 200
    #: generic questions per scene, after its depth-order question
    generic_questions: int = 2
    float_prob: float = 0.7
    haze: float = 0.5
    data_seed: int = 1234
    # tokenizer (JanusVQVAE: codes per image = (image_size / patch_size)^2)
    vq_codes: int = 256
    vq_channels: int = 32
    vq_channel_multiplier: list[int] = field(default_factory=lambda: [1, 1, 1])
    vq_scenes: int = 1500
    vq_steps: int = 600
    vq_batch: int = 32
    vq_lr: float = 2e-3
    # model (Janus architecture; the VQ grid is the vision patch grid)
    lm_hidden: int = 128
    lm_layers: int = 2
    #: LM attention heads and key-value heads (grouped-query attention when fewer)
    lm_heads: int = 4
    lm_kv_heads: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    patch_size: int = 4
    # pretraining of the bases, from random initialisation: batch per task, steps, peak lr
    base_batch_size: int = 16
    base_steps: int = 1500
    base_lr: float = 2e-3
    #: reconstruction's loss weight in the bases' pretraining (0, the default run: understanding
    #: and text-to-image only). Every arm starts from the same base, so it is shared by all arms:
    #: a base that already copies its condition image into codes (docs/experiments.md)
    base_reconstruction: float = 0.0
    # post-training of the arms, from each base, at half the pretraining learning rate
    batch_size: int = 8
    post_steps: int = 500
    post_lr: float = 1e-3
    warmup_ratio: float = 0.05
    condition_grad_scale: float = 0.1
    #: generation prompts per task: the first N of the trainer's default phrasings (released:
    #: several). One phrasing keeps the distance from each code to its image patch fixed.
    prompt_phrasings: int = 1
    # gates, fixed before the run
    #: a generation task is learned when its held-out loss with a shuffled condition exceeds the
    #: one with the right condition by at least this (nats per code)
    gate_gap: float = 0.3
    #: tokenizer: entropy given position at least this far below the marginal (nats)
    vq_entropy_margin: float = 0.5
    #: tokenizer: decoded depth targets keep every object pair's order in this share of scenes
    vq_depth_order: float = 0.8
    #: tokenizer: boundary F-score of decoded edge targets at least this
    vq_edge_f1: float = 0.5
    #: base: text-to-image loss at least this far below the image codes' positional entropy
    base_t2i_margin: float = 0.5
    #: the paired statistic's threshold for "evidence against": upper end below this
    against_margin: float = 0.02
    gate_scenes: int = 96
    #: torch threads per training process
    threads: int = 1
    #: trainings at once, each in its own process (1: in this process, one after another)
    jobs: int = 2


#: `--quick`: everything runs, in under two minutes; its numbers mean nothing
QUICK = dict(
    bases=[0],
    post_seeds=[0, 1],
    train_scenes=24,
    test_scenes=8,
    vq_scenes=16,
    vq_steps=4,
    vq_batch=8,
    base_steps=2,
    post_steps=2,
    base_batch_size=4,
    batch_size=4,
    gate_scenes=8,
)


def base_weights(cfg: Config) -> dict[str, float]:
    """trainer.loss_weights of the bases' pretraining."""
    return {**BASE_WEIGHTS, "reconstruction": cfg.base_reconstruction}


def check(cfg: Config) -> None:
    """Refuse a config the run would fail on, before any work."""
    unknown = [a for a in cfg.arms if a not in ARMS]
    if unknown:
        raise ValueError(f"arms: {unknown} not among {list(ARMS)}")
    if "understanding" not in cfg.arms:
        raise ValueError("arms: the understanding arm is the baseline every arm is paired with")
    if not cfg.bases or not cfg.post_seeds:
        raise ValueError("bases and post_seeds: at least one each")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"patch_size {cfg.patch_size} does not divide image_size")
    if 2 ** (len(cfg.vq_channel_multiplier) - 1) != cfg.patch_size:
        raise ValueError(
            f"vq_channel_multiplier: {len(cfg.vq_channel_multiplier)} levels downsample by "
            f"{2 ** (len(cfg.vq_channel_multiplier) - 1)}, patch_size is {cfg.patch_size} (the "
            "VQ grid must be the vision patch grid)"
        )
    if cfg.lm_hidden % cfg.lm_heads or cfg.lm_heads % cfg.lm_kv_heads:
        raise ValueError(
            f"lm_heads {cfg.lm_heads} must divide lm_hidden {cfg.lm_hidden}, and lm_kv_heads "
            f"{cfg.lm_kv_heads} must divide lm_heads"
        )
    if cfg.vision_hidden % cfg.vision_heads:
        raise ValueError(f"vision_heads {cfg.vision_heads} must divide vision_hidden")
    if cfg.jobs < 1 or cfg.threads < 1:
        raise ValueError("jobs and threads: at least 1")
    if cfg.base_reconstruction < 0:
        raise ValueError("base_reconstruction: a loss weight, at least 0")
    if not 0 <= cfg.float_prob <= 1 or not 0 <= cfg.haze <= 1:
        raise ValueError("float_prob and haze: in [0, 1]")


#: bump when the scenes, questions or captions change: the data folder is keyed by it
DATA_VERSION = "2"


def _key(cfg: Config, names: tuple[str, ...], extra: Any = None) -> str:
    blob = json.dumps({"v": DATA_VERSION, **{k: getattr(cfg, k) for k in names}, "extra": extra})
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


DATA_KEYS = (
    "image_size",
    "train_scenes",
    "test_scenes",
    "generic_questions",
    "float_prob",
    "haze",
    "data_seed",
)
VQ_KEYS = (
    "vq_codes",
    "vq_channels",
    "vq_channel_multiplier",
    "vq_scenes",
    "vq_steps",
    "vq_batch",
    "vq_lr",
    "patch_size",
)
MODEL_KEYS = (
    "lm_hidden",
    "lm_layers",
    "lm_heads",
    "lm_kv_heads",
    "vision_hidden",
    "vision_layers",
    "vision_heads",
)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _tokenizer(root: Path, cfg: Config, train_scenes: list, test_scenes: list) -> dict:
    """Train (or load) the tokenizer; its record with the gate."""
    import torch

    from experiments.miniature.labels import vq_training_targets
    from experiments.miniature.model import sizes_of
    from experiments.miniature.tokenizer import load_vq, save_vq, train_vq, vq_gate
    from trainer.adapters.janus.tiny import tiny_model, tiny_tokenizer

    folder = root / f"vq-{_key(cfg, VQ_KEYS)}"
    # The VQ of a model of these sizes (the LM part is built and dropped).
    vq = tiny_model(tiny_tokenizer(), sizes_of(cfg), seed=cfg.data_seed).model.vqmodel
    record = load_vq(vq, folder)
    if record is None:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.data_seed)
        targets = vq_training_targets(train_scenes[: cfg.vq_scenes])
        summary = train_vq(
            vq,
            targets,
            cfg.vq_steps,
            batch=cfg.vq_batch,
            lr=cfg.vq_lr,
            seed=cfg.data_seed,
            log=_log if cfg.vq_steps >= 100 else None,
        )
        gate = vq_gate(vq, test_scenes, cfg.vq_codes)
        record = {
            "training": summary,
            "gate": gate,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        save_vq(vq, folder, record)
    g = record["gate"]
    record["passed"] = {
        "entropy_given_position": g["all"]["entropy_given_position"]
        <= g["all"]["entropy"] - cfg.vq_entropy_margin,
        "depth_order": g["depth_order"] >= cfg.vq_depth_order,
        "edge_f1": g["edge_f1"] >= cfg.vq_edge_f1,
    }
    record["folder"] = str(folder)
    return record


def _manifest(
    root: Path,
    cfg: Config,
    weights: dict,
    seed: int,
    model_dir: Path,
    steps: int,
    lr,
    batch: int,
    save_every: int | None = None,
):
    """The manifest of one training. `save_every`: keep a checkpoint every that many steps
    (prototype.py); none: the final one only."""
    from pipeline.manifest import parse_manifest
    from trainer.data import DEFAULT_PROMPTS

    saving = {"save_every": steps}
    if save_every:
        saving = {"save_every": save_every, "keep_last": steps // save_every + 1}
    return parse_manifest(
        {
            "output_dir": "out",
            "shard_size": 256,
            "sources": [],
            # Listed so the manifest allows the depth and segmentation tasks; never run: their
            # labels are the renderer's exact targets (labels.py), passed by fingerprint.
            "stages": {"depth": {"model": "tiny-random"}, "segment": {"model_type": "tiny-random"}},
            "understanding": [{"path": "conversations.jsonl", "image_root": "scenes"}],
            "captions": [{"path": "captions.jsonl", "image_root": "scenes"}],
            "trainer": {
                "model": str(model_dir),
                "loss_weights": weights,
                "batch_size": batch,
                "lr": lr,
                "warmup_ratio": cfg.warmup_ratio,
                "max_steps": steps,
                **saving,
                "eval_every": steps,
                "log_every": 10,
                "seed": seed,
                "condition_grad_scale": cfg.condition_grad_scale,
                "prompts": {t: p[: cfg.prompt_phrasings] for t, p in DEFAULT_PROMPTS.items()},
                "num_workers": 0,
                "dtype": "float32",
            },
        },
        base_dir=root,
    )


def _train_and_score(
    root: Path,
    cfg: Config,
    weights: dict,
    seed: int,
    model_dir: Path,
    steps: int,
    lr: float,
    batch: int,
) -> dict[str, Any]:
    """One training through `trainer.loop.train`, then its final checkpoint scored (cached in
    the run folder)."""
    import torch
    import transformers

    from experiments.miniature.evaluation import evaluate
    from experiments.miniature.labels import LABEL_FP
    from trainer.loop import train

    torch.set_num_threads(cfg.threads)
    transformers.logging.set_verbosity_error()  # generate()'s per-call notices, 36 runs over
    t0 = time.perf_counter()
    m = _manifest(root, cfg, weights, seed, model_dir, steps, lr, batch)
    res = train(m, progress=False, num_workers=0, probe_count=0, label_fingerprints=LABEL_FP)
    ckpt = res.output_dir / f"step_{steps:06d}"
    cache = res.output_dir / "miniature_eval.json"
    key = {"version": EVAL_VERSION, "gate_scenes": cfg.gate_scenes}
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key:
        metrics = cached["metrics"]
    else:
        metrics = evaluate(ckpt, root, cfg.gate_scenes)
        cache.write_text(json.dumps({"key": key, "metrics": metrics}))
    log = [json.loads(x) for x in (res.output_dir / "log.jsonl").read_text().splitlines()]
    return {
        "checkpoint": str(ckpt),
        "metrics": metrics,
        "loss": [{"step": r["step"], **r["loss"]} for r in log],
        "seconds": round(time.perf_counter() - t0, 1),
        "trained": res.computed,
    }


class _Pool:
    """Trainings `jobs` at a time in spawned processes (or in this process when jobs is 1);
    `submit` may be called while others run; `results()` yields (key, result) as each ends."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.pending: list[tuple[Any, tuple]] = []
        self.futures: dict = {}
        self.pool = None
        if jobs > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"))

    def submit(self, key, args: tuple) -> None:
        if self.pool is None:
            self.pending.append((key, args))
        else:
            self.futures[self.pool.submit(_train_and_score, *args)] = key

    def results(self):
        if self.pool is None:
            while self.pending:
                key, args = self.pending.pop(0)
                yield key, _train_and_score(*args)
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        try:
            while self.futures:
                done, _ = wait(list(self.futures), return_when=FIRST_COMPLETED)
                for fut in done:
                    key = self.futures.pop(fut)
                    yield key, fut.result()
        finally:
            self.pool.shutdown(cancel_futures=True)


@dataclass
class Prepared:
    """What every training of a setting shares: the data folder, the tokenizer, the texts."""

    root: Path  # the dataset's folder, out/work/<key>: the manifests' base_dir
    info: dict[str, Any]  # labels.write_dataset's record
    label_fps: dict[str, str]
    tok: dict[str, Any]  # the tokenizer's record, with its gate
    texts: list[str]
    model_key: str

    def init_model(self, cfg: Config, seed: int) -> Path:
        """The initial model of base `seed` (built once, kept)."""
        from experiments.miniature.model import build_model

        name = f"init-{self.model_key}-base{seed}"
        return build_model(
            self.root / "models" / name, cfg, seed, self.texts, Path(self.tok["folder"])
        )


def prepare(cfg: Config, out: Path, say=_log) -> Prepared:
    """The data (written and ingested), the label shards and the tokenizer under `out/work`:
    each is cached, so a rerun, or another setting with the same data, reuses them."""
    import torch

    from experiments.miniature.labels import write_dataset, write_labels
    from experiments.miniature.model import texts_of
    from pipeline.ingest import ingest

    torch.set_num_threads(cfg.threads)
    out.mkdir(parents=True, exist_ok=True)
    root = out / "work" / _key(cfg, DATA_KEYS)  # one folder per dataset
    info = write_dataset(root, cfg)
    scenes, test_scenes = list(info["scenes"].values()), info["test_scenes"]
    base_manifest = _manifest(root, cfg, base_weights(cfg), 0, root, 1, cfg.base_lr, 1)
    ingest(base_manifest, progress=False)  # idempotent: a rerun adds nothing
    label_fps = write_labels(base_manifest.out, info["scenes"])
    say(f"data: {len(scenes)} training scenes, {info['test_questions']} held-out questions")
    tok = _tokenizer(root, cfg, scenes, test_scenes)
    say(
        "tokenizer: entropy given position {:.2f} vs marginal {:.2f} nats, depth order kept "
        "{:.2f}, edge F1 {:.2f} ({})".format(
            tok["gate"]["all"]["entropy_given_position"],
            tok["gate"]["all"]["entropy"],
            tok["gate"]["depth_order"],
            tok["gate"]["edge_f1"],
            "passed" if all(tok["passed"].values()) else "FAILED",
        )
    )
    texts = texts_of(root)
    # The initial models hold a tokenizer fitted to the texts: keyed by them too.
    model_key = _key(
        cfg, MODEL_KEYS + VQ_KEYS, hashlib.sha256("\n".join(texts).encode()).hexdigest()
    )
    return Prepared(root, info, label_fps, tok, texts, model_key)


def run(cfg: Config, out: Path, progress: bool = True) -> dict[str, Any]:
    from experiments.miniature import report
    from experiments.miniature.scenes import cue_report
    from pipeline.shards import atomic_write_bytes

    check(cfg)
    say = _log if progress else (lambda m: None)
    t_start = time.perf_counter()
    prep = prepare(cfg, out, say)
    root, info, tok = prep.root, prep.info, prep.tok
    scenes, test_scenes = list(info["scenes"].values()), info["test_scenes"]
    label_fps = prep.label_fps
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "data": {
            "train_scenes": len(scenes),
            "conversations": info["conversations"],
            "test_questions": info["test_questions"],
            "cues": cue_report(test_scenes),
            "floors": report.floors(root / "test" / "test.tsv", test_scenes),
            "label_fingerprints": label_fps,
        },
        "tokenizer": tok,
        "bases": {},
        "runs": {arm: {} for arm in cfg.arms},
    }
    timings: dict[str, float] = {}
    pool = _Pool(cfg.jobs)
    for b in cfg.bases:
        init = prep.init_model(cfg, b)
        pool.submit(
            ("base", b),
            (
                root,
                cfg,
                base_weights(cfg),
                b,
                init,
                cfg.base_steps,
                cfg.base_lr,
                cfg.base_batch_size,
            ),
        )
    # Longest first within a base: less idle at the end.
    order = sorted(cfg.arms, key=lambda a: -sum(w > 0 for w in ARMS[a].values()))

    def write() -> None:
        results["config"]["wall_s"] = round(time.perf_counter() - t_start, 1)
        results["config"]["seconds_per_run"] = timings
        results["config"]["machine"] = (
            f"{platform.machine()}, {os.cpu_count()} CPUs, {cfg.jobs} training process(es) of "
            f"{cfg.threads} torch thread(s)"
        )
        report.summarise(results, cfg)
        atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())

    for key, done in pool.results():
        if key[0] == "base":
            b = key[1]
            results["bases"][str(b)] = report.base_entry(done, tok, cfg)
            timings[f"base/{b}"] = done["seconds"]
            g = results["bases"][str(b)]["gate"]
            say(
                f"base {b}: spatial {done['metrics']['spatial_accuracy']:.3f}, generic "
                f"{done['metrics']['generic_accuracy']:.3f}, text-to-image {g['right']:.2f} "
                f"(shuffled caption {g['shuffled']:.2f}, positional entropy "
                f"{g['positional_entropy']:.2f}) ({done['seconds']:.0f} s)"
            )
            for s in cfg.post_seeds:
                for arm in order:
                    pool.submit(
                        ("arm", b, s, arm),
                        (
                            root,
                            cfg,
                            ARMS[arm],
                            s,
                            Path(done["checkpoint"]),
                            cfg.post_steps,
                            cfg.post_lr,
                            cfg.batch_size,
                        ),
                    )
        else:
            _, b, s, arm = key
            entry = report.run_entry(done, arm, cfg)
            results["runs"][arm][f"{b}/{s}"] = entry
            timings[f"{arm}/{b}/{s}"] = done["seconds"]
            m = done["metrics"]
            say(
                f"{arm:>13} base {b} seed {s}: spatial {m['spatial_accuracy']:.3f}, generic "
                f"{m['generic_accuracy']:.3f}, image use {m['image_use']:.2f}, gate "
                f"{'passed' if entry['gate']['passed'] else 'not passed'} ({done['seconds']:.0f} s)"
            )
        write()
    write()
    (out / "results.md").write_text(report.table(results))
    report.plot(results, out / "results.png")
    return results
