"""The UniMRG training loop: four tasks, one model, files as the cache.

    unimrg train [-m MANIFEST] [--max-steps N] [--resume]
    torchrun --nproc_per_node N -m trainer -m MANIFEST [--max-steps N] [--resume]

Per optimizer step: `grad_accum` micro-steps, each one batch of every enabled task
(`round_robin`) or T task batches drawn by weight (`weighted`); every batch is backpropagated as
soon as its loss is known (activation memory of one batch), its loss times its weight divided by
the number of micro-batches per step (as the released code's mmengine wrapper), gradients
accumulate, then are
all-reduced across ranks (DDP; with `trainer.parallel: fsdp` FSDP2 reduce-scatters each
batch's gradients into the shards during its backward, trainer/parallel.py), clipped to
`grad_clip`, and AdamW steps with 1% linear warmup
then cosine decay. bf16 autocast on CUDA; master weights stay float32.

Output, under <output_dir>/<trainer.output_subdir>/<fingerprint>/:

    step_000500/
        model/          save_pretrained form, opened on its own by transformers' AutoModel,
                        AutoProcessor (processor config, chat template) and AutoTokenizer;
                        weights in the training dtype's storage precision (bf16 on CUDA)
        trainer_state.pt  optimizer, scheduler, step and batch position (plain tensors and
                        containers: resume reads it with `torch.load(weights_only=True)`)
        rng_rank<r>.pt  each rank's RNG states (tensors and numbers, weights_only too)
        config.yaml     the resolved config
    log.jsonl           per logged step: per-task losses, lr, grad norm, samples/s, data wait
    probe/step_000500.png   generated depth / segmentation / reconstruction next to targets
    data_report.json    what the data layer found (usable labels, skipped conversations)

A non-finite loss (any task's) or gradient norm, checked before each optimizer step with one
all-reduce so every rank agrees, stops training at that step (`TrainingDiverged`, one line
naming the step and the task); the weights are checked before each checkpoint too, so no
non-finite state is saved. The last finite checkpoint stays, `diverged.json` records the
divergence (`unimrg eval` refuses the run), and the run is not done: no final checkpoint.

The newest `trainer.keep_last` checkpoints are kept, plus the final one. `--resume` continues
from the newest checkpoint that loads completely and can be resumed from: its step, batch
position, scheduler and optimizer state and RNG states are all checked against this run before
any is applied (`check_resumable`); one that fails is skipped, and the reason printed. `export_checkpoint` (`unimrg export --checkpoint`) copies a checkpoint's model into a
clean hub-ready folder. The checkpoint folders, RNG states and export live in
trainer/checkpoints.py; the fingerprint, lineage, run record and log reading in
trainer/run_folder.py; the ranks in trainer/ranks.py; which parameters train, their AdamW
groups and the schedule in trainer/optimizer.py; the choice of checkpoint to resume from in
trainer/resume.py; the divergence record and stop in trainer/divergence.py (callers import
those names from there).

The fingerprint covers the label fingerprints, the understanding data, the image shards, the
model's identity and the trainer settings: when `step_<max_steps>` exists, `train` returns at once.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
from collections import defaultdict
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.lineage import LINEAGE_FILE, ensure_lineage
from pipeline.locks import exclusive
from pipeline.manifest import TASKS, ManifestError
from pipeline.shards import atomic_write_bytes, make_readable
from trainer import data as data_mod
from trainer.adapters import adapter_class
from trainer.checkpoints import (
    MODEL_SUBDIR,
    TRAINER_STATE,
    capture_rng_state,
    checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    rng_to_saved,
    step_dir,
    writing,
)
from trainer.divergence import describe_nonfinite, stop_diverged
from trainer.objective import Objective
from trainer.optimizer import lr_factor, param_groups, select_trainable
from trainer.ranks import Dist
from trainer.resume import open_resumable
from trainer.run_folder import (
    DIVERGED_FILE,
    RUN_FILE,
    last_logged,
    other_length_message,
    same_run_other_length,
    train_fingerprint,
    train_lineage,
    train_output_dir,
    trainer_cfg,
    truncate_log,
)
from trainer.train_progress import TrainProgress

__all__ = ["TrainObserver", "TrainResult", "Trainer", "train"]


@dataclass(frozen=True)
class TrainResult:
    fingerprint: str
    output_dir: Path
    steps: int
    last_losses: dict[str, float]
    computed: bool


class TrainObserver:
    """What a caller wants to hear while training runs (all no-ops; override what you need).

    Called on the main rank only, in the training thread, between optimizer steps: keep it
    quick. An orchestrator uses it to show progress (flows/train_watch.py); a notebook might
    plot live.
    """

    def on_log(self, record: dict[str, Any]) -> None:
        """A record was appended to log.jsonl (every `log_every` steps and the last step)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """Checkpoint `step_<step>` is complete at `path`."""

    def on_probe(self, step: int, path: Path) -> None:
        """The probe grid of `step` was written to `path` (a PNG)."""


def train(
    manifest,
    max_steps: int | None = None,
    resume: bool = False,
    progress: bool = True,
    *,
    num_workers: int | None = None,
    probe_count: int = 4,
    observer: TrainObserver | None = None,
    on_other_length: str = "refuse",
    label_fingerprints: dict[str, str] | None = None,
) -> TrainResult:
    """Train the manifest's model; return at once when its final checkpoint exists.

    `max_steps` replaces `trainer.max_steps` (the schedule is planned over it, and it is part of
    the fingerprint). `resume` continues from the newest checkpoint of this fingerprint. When
    there is none but a run of the same settings with another `max_steps` has checkpoints,
    `resume` raises ManifestError saying what to do (`on_other_length="refuse"`, the CLI) or
    says so and starts this run at step 0 (`"new_run"`, the DAG: a changed manifest is a new
    run). `label_fingerprints` (stage -> fingerprint): read labels written outside the label
    stages (e.g. exact targets of a synthetic dataset, experiments/miniature/labels.py) from
    labels/<stage>/<fingerprint>/ instead of the configured stages' folders.
    `num_workers`: DataLoader processes per rank (default: `trainer.num_workers`, else
    $UNIMRG_TRAIN_WORKERS, else up to 8). `observer` hears of logged steps, checkpoints and
    probes as they happen.
    """
    cfg = trainer_cfg(manifest)
    if max_steps is not None and max_steps != cfg.max_steps:
        if max_steps <= 0:
            raise ValueError(f"--max-steps: expected a positive integer, got {max_steps}")
        manifest = manifest.model_copy(
            update={"trainer": cfg.model_copy(update={"max_steps": max_steps})}
        )
        cfg = manifest.trainer
    if label_fingerprints is None:
        label_fps = data_mod.resolve_label_fingerprints(manifest)
    else:
        label_fps = dict(label_fingerprints)
    fp = train_fingerprint(manifest, label_fps)
    out = train_output_dir(manifest, fp)
    final = step_dir(out, cfg.max_steps)
    family = train_fingerprint(manifest, label_fps, schedule=False)
    if resume and on_other_length == "refuse" and not final.exists() and not latest_checkpoint(out):
        # Refused before the lock, so a refused resume leaves no new run folder behind.
        other = same_run_other_length(manifest, family, fp)
        if other is not None:
            raise ManifestError(other_length_message(other, cfg.max_steps))
    # One training per run folder: a second `unimrg train` is refused at once (rank 0 holds
    # the lock for the job; the other ranks of the same torchrun job do not take it).
    lock = ExitStack()
    if int(os.environ.get("RANK", "0")) == 0:
        lock.enter_context(exclusive(out / ".train.lock", "another `unimrg train` is using it"))
    with lock:
        if final.exists():
            return TrainResult(fp, out, cfg.max_steps, last_logged(out), computed=False)
        # Newest first: resume falls back to an older one when the newest does not load.
        start = checkpoints(out)[::-1] if resume else None
        if resume and not start:
            other = same_run_other_length(manifest, family, fp)
            if other is not None and on_other_length == "refuse":
                raise ManifestError(other_length_message(other, cfg.max_steps))
            if progress or other is not None:
                print(
                    f"resume: no checkpoint of this run in {out}; "
                    + (
                        f"a run of the same settings but max_steps {other[1]} is at "
                        f"{other[0]}; this one starts a new schedule from step 0"
                        if other is not None
                        else "starting from step 0"
                    )
                )
        dist_ctx = Dist.setup(group=cfg.parallel == "fsdp")
        try:
            if num_workers is None:
                num_workers = cfg.num_workers
            if num_workers is None:
                env = os.environ.get("UNIMRG_TRAIN_WORKERS")
                num_workers = (
                    int(env)
                    if env
                    else min(8, max(1, (os.cpu_count() or 2) // dist_ctx.local_world - 1))
                )
            trainer = Trainer(
                manifest, fp, out, dist_ctx, label_fps, start or None, num_workers, probe_count
            )
            trainer.observer = observer or TrainObserver()
            if trainer.is_main:
                out.mkdir(parents=True, exist_ok=True)
                record = {"fingerprint": fp, "schedule_free": family, "max_steps": cfg.max_steps}
                atomic_write_bytes(out / RUN_FILE, json.dumps(record).encode())
            return trainer.run(progress)
        finally:
            dist_ctx.close()


# --------------------------------------------------------------------------------------------


class Trainer:
    """One training run: model, data, optimizer and the loop (torchtitan-style, flat)."""

    def __init__(
        self,
        manifest,
        fp: str,
        out: Path,
        dist_ctx: Dist,
        label_fingerprints: dict[str, str],
        resume_from: Path | list[Path] | None,
        num_workers: int,
        probe_count: int = 4,
        adapter: Any = None,
        checkpoints: bool = True,
    ):
        import torch

        self.torch = torch
        self.manifest, self.cfg, self.fp, self.out, self.dist = (
            manifest,
            manifest.trainer,
            fp,
            out,
            dist_ctx,
        )
        cfg = self.cfg
        self.label_fingerprints = label_fingerprints
        self.is_main = dist_ctx.rank == 0
        self.cuda = dist_ctx.device.startswith("cuda")
        torch.manual_seed(cfg.seed)
        # The data and its batch plan need no model: built first, so that resume can check a
        # checkpoint's batch position against the plan before choosing it.
        self.objective = Objective(
            {t: float(cfg.loss_weights.get(t, 0.0)) for t in TASKS}, cfg.sampler
        )
        self.data = data_mod.TrainData.build(manifest, label_fingerprints, probe_count)
        self.plan = data_mod.BatchPlan(
            self.data.streams,
            self.data.groups,
            self.objective.weights,
            cfg.batch_size,
            cfg.sampler,
            cfg.seed,
            dist_ctx.rank,
            dist_ctx.world,
        )
        self.micro_per_step = len(self.plan.tasks) * cfg.grad_accum
        resume_state = None
        if isinstance(resume_from, Path):
            resume_from = [resume_from]
        if resume_from:
            adapter, resume_state = open_resumable(
                resume_from, adapter, cfg, dist_ctx, self.micro_per_step
            )
        if adapter is None:
            cls = adapter_class(cfg.adapter)
            adapter = cls.load(
                cfg.model, cfg.revision, manifest.base_dir, dist_ctx.device, cfg.image_size
            )
        self.adapter = adapter
        adapter.condition_grad_scale = float(cfg.condition_grad_scale)
        model = adapter.model
        self.params = select_trainable(adapter, cfg)
        if cfg.gradient_checkpointing:
            adapter.enable_checkpointing()
        if cfg.dtype == "auto":
            self.amp_dtype = torch.bfloat16 if self.cuda else None
        else:
            self.amp_dtype = None if cfg.dtype == "float32" else getattr(torch, cfg.dtype)
        self.fsdp = None  # trainer/parallel.py: sharded model, DCP checkpoints
        if cfg.parallel == "fsdp":
            from trainer.parallel import FSDP

            self.fsdp = FSDP(adapter, dist_ctx.device, self.amp_dtype)
            self.params = [p for p in model.parameters() if p.requires_grad]
        self.dataset = self.data.dataset(
            adapter.text_encoder(),
            adapter.image_size,
            # The processor's background colour (JanusImageProcessor: image mean x 255).
            fill=tuple(cfg.pad_color or (int(m * 255) for m in adapter.image_mean)),
            prompts=cfg.prompts,
            uncond_rate=cfg.uncond_rate,
            resize={"understanding": cfg.understanding_resize, "generation": cfg.generation_resize},
            resample={"image": cfg.image_resample, **cfg.target_resample},
        )
        self.num_workers = num_workers
        self.checkpoints = checkpoints  # False: benchmarks only, nothing is saved
        self.optimizer = torch.optim.AdamW(
            param_groups(self.adapter, self.params, cfg),
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            **({"fused": True} if self.cuda else {}),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg.max_steps, cfg.warmup_ratio)
        )
        self.step, self.batches = 0, 0
        self.observer = TrainObserver()
        if resume_state is not None:
            self._resume(resume_state, resume_from)

    # ---- setup pieces

    def _train_mode(self) -> None:
        self.adapter.model.train()
        for name, module in self.adapter.model.named_modules():
            if any(fnmatch.fnmatchcase(name + ".x", pat) for pat in self.adapter.frozen_patterns):
                module.eval()

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return self.torch.autocast("cuda" if self.cuda else "cpu", dtype=self.amp_dtype)

    def resolved_config(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fp,
            "trainer": self.cfg.model_dump(mode="json"),
            "label_fingerprints": self.data.label_fingerprints,
            "understanding": [u.model_dump(mode="json") for u in self.manifest.understanding],
            "output_dir": str(self.manifest.out),
            "world_size": self.dist.world,
            "num_workers": self.num_workers,
            "random_weights": bool(self.adapter.random_weights),
        }

    # ---- checkpoints

    def storage_dtype(self):
        """The precision checkpoints store weights in: the training (autocast) dtype."""
        return self.amp_dtype or self.torch.float32

    def _save(self) -> Path:
        if not self._weights_finite():
            self._diverged(
                self.step,
                "the weights after its optimizer step are not finite",
                {"tasks": [], "weights": "not finite"},
            )
        final = step_dir(self.out, self.step)
        tmp = self.out / f".{final.name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.dist.barrier()
        try:
            self._write_checkpoint(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk gets its space back
            raise
        if self.is_main:
            if final.exists():  # left by an earlier run of this fingerprint that we restarted
                shutil.rmtree(final)
            os.rename(tmp, final)
            prune_checkpoints(self.out, self.cfg.keep_last, self.cfg.max_steps)
        self.dist.barrier()
        return final

    def _write_checkpoint(self, tmp: Path, final: Path) -> None:
        """Every rank's part of checkpoint `final` into its temporary folder `tmp`; a failed
        write is an OSError naming the file in `final` (`writing`)."""
        import yaml

        torch = self.torch
        rng_file = f"rng_rank{self.dist.rank}.pt"
        with writing(final / rng_file):
            torch.save(rng_to_saved(capture_rng_state()), tmp / rng_file)
        self.dist.barrier()
        if self.fsdp is not None:  # every rank writes its shards; the export at the end only
            from trainer.parallel import DCP_DIR

            with writing(final / DCP_DIR):
                self.fsdp.save(tmp, self.optimizer)
            if self.step == self.cfg.max_steps:
                with writing(final / MODEL_SUBDIR):
                    self.fsdp.export(tmp / MODEL_SUBDIR, self.is_main, self.storage_dtype())
        if not self.is_main:
            return
        if self.fsdp is None:
            with writing(final / MODEL_SUBDIR):
                self.adapter.save(tmp / MODEL_SUBDIR, dtype=self.storage_dtype())
        with writing(final / TRAINER_STATE):
            torch.save(
                {
                    "step": self.step,
                    "batches": self.batches,
                    "world_size": self.dist.world,
                    "parallel": self.cfg.parallel,
                    **({"optimizer": self.optimizer.state_dict()} if self.fsdp is None else {}),
                    "scheduler": self.scheduler.state_dict(),
                },
                tmp / TRAINER_STATE,
            )
        with writing(final / "config.yaml"):
            (tmp / "config.yaml").write_text(
                yaml.safe_dump(self.resolved_config(), sort_keys=False)
            )
        make_readable(tmp)  # safetensors writes 0600

    def _resume(self, resume_state: tuple[Path, dict, dict], candidates: list[Path]) -> None:
        """Apply the state `open_resumable` chose. Under FSDP the sharded model and optimizer
        are read only here (DCP, every rank together); a checkpoint whose shards do not read is
        skipped, with the reason printed, and the next older resumable one is tried."""
        from torch.distributed.checkpoint.api import CheckpointException

        while True:
            ckpt = resume_state[0]
            try:
                self._load_state(*resume_state)
                return
            except (Exception, CheckpointException) as exc:
                if self.fsdp is None:
                    raise
                reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}"
                if self.is_main:
                    print(f"resume: skipping {ckpt}: its sharded state does not load: {reason}")
                older = candidates[candidates.index(ckpt) + 1 :]
                if not older:
                    raise ValueError(
                        f"resume: no checkpoint under {ckpt.parent} can be resumed from: "
                        f"{ckpt.name} (its sharded state does not load: {reason})"
                    ) from None
                _, resume_state = open_resumable(
                    older, None, self.cfg, self.dist, self.micro_per_step
                )

    def _load_state(self, ckpt: Path, state: dict, rng_state: dict) -> None:
        if self.fsdp is not None:
            self.fsdp.load(ckpt, self.optimizer)
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.batches = int(state["step"]), int(state["batches"])
        if state.get("world_size", 1) != self.dist.world and self.is_main:
            print(
                f"resume: {ckpt} was written by {state['world_size']} ranks, now "
                f"{self.dist.world}: the data order from here differs from an unbroken run"
            )
        restore_rng_state(rng_state)

    # ---- the loop

    def _allreduce_grads(self) -> None:
        if self.dist.world == 1 or self.fsdp is not None:  # FSDP reduce-scatters in backward
            return
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        # Every rank runs the same task sequence, so the same parameters hold gradients.
        grads = [p.grad for p in self.params if p.grad is not None]
        bucket: list = []
        size = 0
        for i, g in enumerate(grads):
            bucket.append(g)
            size += g.numel()
            if size >= (1 << 25) or i == len(grads) - 1:
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat)
                flat.div_(self.dist.world)
                for g2, s in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    g2.copy_(s)
                bucket, size = [], 0

    def _reduce_losses(self, losses: dict[str, Any], grad_norm: Any) -> tuple[dict, bool]:
        """(per-task losses averaged over ranks, whether every rank's losses and gradient norm
        are finite). One all-reduce carries both, so all ranks agree on stopping."""
        torch = self.torch
        names = sorted(losses)
        vals = torch.stack([losses[n].float() for n in names])
        norm = torch.as_tensor(grad_norm, dtype=vals.dtype, device=vals.device).reshape(1)
        bad = (~torch.isfinite(torch.cat([vals, norm]))).any().to(vals.dtype).reshape(1)
        vec = torch.cat([vals, bad])
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.all_reduce(vec)
            vec[:-1] /= self.dist.world
        *means, flag = vec.tolist()
        return dict(zip(names, means)), flag == 0

    def _weights_finite(self) -> bool:
        """Whether every rank's trainable weights (its shards under FSDP) are finite: checked
        before each checkpoint, so a non-finite state is never saved."""
        torch = self.torch
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.params]
        ok = torch.stack([torch.isfinite(p.detach()).all() for p in local]).all()
        flag = (~ok).float().reshape(1)
        if self.dist.world > 1:
            import torch.distributed as dist

            dist.all_reduce(flag)
        return flag.item() == 0

    def _diverged(self, step: int, what: str, record: dict[str, Any]) -> None:
        """Stop every rank (they all call this at the same step): trainer/divergence.py."""
        stop_diverged(
            self.out,
            step,
            what,
            record,
            lr=self.cfg.lr,
            kept=latest_checkpoint(self.out) if self.checkpoints else None,
            write=self.is_main and self.checkpoints,
        )

    def _check_step(self, step: int, losses: dict[str, float], grad_norm: float) -> None:
        """Raise TrainingDiverged (on every rank) when a loss or the gradient norm of `step` is
        not finite; called before the optimizer step, so the weights are still the last finite
        step's."""
        self._diverged(step, *describe_nonfinite(losses, grad_norm))

    def _check_in_sync(self) -> None:
        """After DDP training every rank must hold the same weights."""
        if self.dist.world == 1 or self.fsdp is not None:
            return
        import torch.distributed as dist

        torch = self.torch
        s = torch.stack([p.detach().double().sum() for p in self.params]).sum().view(1)
        lo, hi = s.clone(), s.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.isclose(lo, hi, rtol=1e-9, atol=1e-6).all():
            raise RuntimeError(f"ranks diverged: weight checksums {lo.item()} .. {hi.item()}")

    def run(self, progress: bool = True) -> TrainResult:
        torch = self.torch
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        # Before any other output (benchmarks, which save nothing, have no model identity).
        if self.is_main and self.checkpoints and not (self.out / LINEAGE_FILE).is_file():
            record = train_lineage(self.manifest, self.label_fingerprints)
            ensure_lineage(self.out, {**record, "fingerprint": self.fp})
        if self.is_main:
            atomic_write_bytes(
                self.out / "data_report.json",
                json.dumps(
                    {
                        **self.data.report,
                        "probe_rows": self.data.probe_rows,
                        "probe_held_out": self.data.probe_held_out,
                    },
                    indent=2,
                    default=int,
                ).encode(),
            )
            und = self.data.report.get("understanding")
            if progress and und:
                print(f"understanding: {und}")
        log_path = self.out / "log.jsonl"
        if self.is_main and self.step:
            truncate_log(log_path, self.step)
        log = open(log_path, "a" if self.step else "w") if self.is_main else None  # noqa: SIM115
        loader = data_mod.make_loader(
            self.dataset, self.plan, self.batches, self.num_workers, pin_memory=self.cuda
        )
        bar = TrainProgress(progress and self.is_main, cfg.max_steps, self.step)
        self._train_mode()
        last: dict[str, float] = {}
        try:
            while self.step < cfg.max_steps:
                t_step = time.perf_counter()
                wait = 0.0
                sums: dict[str, Any] = defaultdict(float)
                counts: dict[str, int] = defaultdict(int)
                for _ in range(self.micro_per_step):
                    t0 = time.perf_counter()
                    batch = next(loader)
                    wait += time.perf_counter() - t0
                    if batch["batch"] != self.batches:
                        raise RuntimeError(
                            f"data out of order: got batch {batch['batch']}, "
                            f"expected {self.batches}"
                        )
                    task = batch["task"]
                    with self._autocast():
                        loss = (self.fsdp or self.objective).task_loss(self.adapter, task, batch)
                    # As mmengine's optimizer wrapper in the released code: every
                    # micro-batch's loss is divided by the micro-batches per step, so the
                    # summed gradient that is clipped is their mean, not their sum.
                    coef = self.objective.coefficient(task) / self.micro_per_step
                    (loss * coef).backward()
                    sums[task] = sums[task] + loss.detach()
                    counts[task] += 1
                    self.batches += 1
                self._allreduce_grads()
                if self.fsdp is not None:
                    grad_norm = self.fsdp.clip_grad_norm(self.params, cfg.grad_clip)
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                # Checked before the optimizer step: a non-finite loss or gradient norm on any
                # rank stops every rank here, the weights still those of the last finite step.
                last, finite = self._reduce_losses(
                    {t: sums[t] / counts[t] for t in sums}, grad_norm
                )
                if not finite:
                    self._check_step(self.step + 1, last, float(grad_norm))
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                dt = time.perf_counter() - t_step
                samples = self.micro_per_step * cfg.batch_size * self.dist.world
                record = {
                    "step": self.step,
                    "loss": last,
                    "total": self.objective.total(last),
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "samples_per_s": samples / dt,
                    "step_s": dt,
                    "data_wait_s": wait,
                    "time": time.time(),
                }
                bar.update(self.step, last, samples / dt, wait / dt)
                if log and (self.step % cfg.log_every == 0 or self.step == cfg.max_steps):
                    with writing(log_path):
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    self.observer.on_log(record)
                if self.checkpoints and (
                    self.step % cfg.save_every == 0 or self.step == cfg.max_steps
                ):
                    saved = self._save()
                    if self.is_main:
                        self.observer.on_checkpoint(self.step, saved)
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    self._probe()
            self._check_in_sync()
            if self.step != cfg.max_steps:  # resume validates the step; never report another
                raise RuntimeError(f"train: stopped at step {self.step}, not {cfg.max_steps}")
            if self.is_main and self.checkpoints:  # an earlier attempt's record is outdated
                (self.out / DIVERGED_FILE).unlink(missing_ok=True)
        finally:
            bar.close()
            if log:
                log.close()
            del loader
        return TrainResult(self.fp, self.out, self.step, last, computed=True)

    def _probe(self) -> None:
        # Under FSDP every rank generates (the sharded weights are gathered together).
        if (not self.is_main and self.fsdp is None) or not self.data.probe_rows:
            return
        from trainer.probe_grid import write_probe

        self.adapter.model.eval()
        run = self.fsdp.run if self.fsdp is not None else (lambda f, *a, **k: f(*a, **k))
        try:
            with self.torch.no_grad(), self._autocast():
                path = run(
                    write_probe,
                    self.adapter,
                    self.dataset,
                    self.data.probe_rows,
                    self.plan.tasks,
                    self.out / "probe" / f"step_{self.step:06d}.png",
                    self.step,
                    self.data.probe_held_out,
                    self.dataset.prompts,
                    temperature=self.cfg.probe_temperature,
                    cfg_weight=self.adapter.probe_cfg_weight
                    if self.cfg.probe_cfg_weight is None
                    else self.cfg.probe_cfg_weight,
                    write=self.is_main,
                )
            if self.is_main:
                self.observer.on_probe(self.step, path)
        finally:
            self._train_mode()
