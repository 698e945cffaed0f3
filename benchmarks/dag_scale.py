"""How `unimrg run` scales with the number of shards: time, memory and threads of the process.

For each size it generates small seeded JPEGs (64x48, every one distinct) in a temporary
folder, writes a manifest with depth and segment on `tiny-random` (the settings of the bundled
`data_manifest.yaml`), runs the label DAG as a user does,

    unimrg run -m MANIFEST --only ingest depth segment

in a subprocess (cold), then the same command again (every label task cached; checked from the
command's summary lines). Meanwhile it samples the `unimrg run` process (psutil: resident memory
and OS threads, every 0.1 s; the Prefect server it starts is a separate process and is not
counted). `ms per cached task` is the whole cached rerun, start-up included, per label task (as
a user waits for it); below the table, the marginal cost of one more cached task (the slope
between the smallest and the largest size) and, from one more run, `--only ingest` on the
largest workspace, the fixed cost of a run with no label task (start-up, the server, ingest
finding nothing new, shutdown; not with --quick). One table:

    images, shard size, image shards, label tasks, cold s, s per task, cached rerun s,
    ms per cached task, peak RSS, peak OS threads, ingest images/s

    PYTHONPATH=. python benchmarks/dag_scale.py                    # 100 / 400 / 1000 label tasks
    PYTHONPATH=. python benchmarks/dag_scale.py --sizes 64x8 256x8 # IMAGESxSHARD_SIZE each
    PYTHONPATH=. python benchmarks/dag_scale.py --quick            # CI: 8 images, 4 shards

Every run gets a fresh PREFECT_HOME (the temporary Prefect server's database and the cache
records) and a fresh UNIMRG_CACHE (the file-hash memo), so nothing is carried over between
invocations; the tiny-random models are built once before any timing. `--keep DIR` keeps the
workspaces under DIR. The machine may be shared: a run whose RSS passes `--rss-limit` GiB
(default 10) is killed, with its Prefect server, and its row says when and how many label tasks
had finished. Outputs are noise (tiny-random) and only their cost is measured.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

#: (images, shard size): 100, 400 and 1000 label tasks (2 stages x image shards).
DEFAULT_SIZES = ((200, 4), (800, 4), (2000, 4))
QUICK_SIZES = ((8, 2),)

#: The stage settings of the bundled data_manifest.yaml: what a new user starts from.
STAGES = {
    "depth": {"model": "tiny-random", "batch_size": 4},
    "segment": {"model_type": "tiny-random", "points_per_side": 8, "render": "edges"},
}


def make_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (64, 48)) -> None:
    """`n` distinct seeded JPEGs (smooth gradients plus a few discs; ingest dedups by bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = np.stack(
            [(xx * (1 + i % 5) + yy + i) % 256, (yy * 3 + i * 7) % 256, (xx + yy * 2 + i) % 256],
            -1,
        ).astype(np.uint8)
        for _ in range(3):
            cx, cy, r = rng.integers(0, w), rng.integers(0, h), rng.integers(4, 16)
            base[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        Image.fromarray(base).save(folder / f"{i:06d}.jpg", quality=90)


def write_manifest(ws: Path, shard_size: int) -> Path:
    data = {
        "version": 1,
        "output_dir": "out",
        "shard_size": shard_size,
        "sources": [{"name": "imgs", "path": "imgs"}],
        "stages": STAGES,
    }
    path = ws / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class Run:
    seconds: float
    peak_rss: int
    peak_threads: int
    stdout: str
    #: Killed for passing the RSS limit (the machine is shared: a run must not take it all).
    killed: bool = False

    def finished_tasks(self) -> int:
        """Label task runs that reached a final state (Prefect's console lines)."""
        return len(_FINISHED.findall(self.stdout))


_FINISHED = re.compile(r"Task run '(?:depth|segment) shard-\d+' - Finished in state")


def run_cli(manifest: Path, only: list[str], env: dict[str, str], rss_limit: int) -> Run:
    """`unimrg run` in a subprocess, sampled every 0.1 s; raises when it fails. Past
    `rss_limit` bytes the run (and the Prefect server it started) is killed and so marked."""
    cmd = [sys.executable, "-m", "flows.cli", "run", "-m", str(manifest), "--only", *only]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=manifest.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a kill takes its server along
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stdout), daemon=True)
    reader.start()
    ps = psutil.Process(proc.pid)
    peak_rss = peak_threads = 0
    killed = False
    while proc.poll() is None:
        try:
            with ps.oneshot():
                peak_rss = max(peak_rss, ps.memory_info().rss)
                peak_threads = max(peak_threads, ps.num_threads())
        except psutil.Error:  # exited between poll() and the sample
            pass
        if peak_rss > rss_limit and not killed:
            killed = True
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    reader.join()
    out = b"".join(chunks).decode(errors="replace")
    if proc.returncode != 0 and not killed:
        sys.stderr.write(out[-4000:])
        raise SystemExit(f"dag_scale: `{' '.join(cmd)}` exited {proc.returncode}")
    return Run(seconds, peak_rss, peak_threads, out, killed)


_INGEST_RATE = re.compile(r"ingest: (\d+) new.*?\(([\d.]+) images/s\)")
_SUMMARY = re.compile(r"^(\w+): (\d+) shard\(s\), (\d+) computed, (\d+) cached", re.M)


def _counts(out: str) -> dict[str, tuple[int, int, int]]:
    """stage -> (shards, computed, cached) from the command's closing summary lines."""
    return {m[1]: (int(m[2]), int(m[3]), int(m[4])) for m in _SUMMARY.finditer(out)}


@dataclass
class Row:
    images: int
    shard_size: int
    shards: int
    tasks: int
    cold: Run
    cached: Run | None  # None when the cold run was killed
    ingest_rate: float


def measure(
    base: Path, images: int, shard_size: int, env: dict[str, str], seed: int, rss_limit: int
) -> Row:
    ws = base / f"ws-{images}x{shard_size}"
    make_images(ws / "imgs", images, seed)
    manifest = write_manifest(ws, shard_size)
    only = ["ingest", *STAGES]
    cold = run_cli(manifest, only, env, rss_limit)
    cached = None if cold.killed else run_cli(manifest, only, env, rss_limit)
    shards = -(-images // shard_size)
    for what, run, want in (("cold", cold, "computed"), ("cached", cached, "cached")):
        if run is None or run.killed:
            continue
        counts = _counts(run.stdout)
        bad = {
            s: c
            for s, c in counts.items()
            if c[0] != shards or c[1 if want == "computed" else 2] != shards
        }
        if set(counts) != set(STAGES) or bad:
            sys.stderr.write(run.stdout[-3000:])
            raise SystemExit(
                f"dag_scale: {what} run of {images}x{shard_size}: expected every "
                f"one of {shards} shards {want}, got {counts}"
            )
    m = _INGEST_RATE.search(cold.stdout)
    rate = float(m[2]) if m else float("nan")
    return Row(images, shard_size, shards, 2 * shards, cold, cached, rate)


def build_models(base: Path, env: dict[str, str]) -> None:
    """Build the tiny-random models into this run's UNIMRG_CACHE before any timing."""
    ws = base / "warmup"
    make_images(ws / "imgs", 1, 0)
    manifest = write_manifest(ws, 1)
    code = (
        "import sys; from pipeline.manifest import load_manifest; "
        "from pipeline.stage import build_stage; m = load_manifest(sys.argv[1]); "
        "[build_stage(s, m).fingerprint() for s in ('depth', 'segment')]"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(manifest)], env=env, cwd=ROOT, capture_output=True
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr.decode(errors="replace")[-4000:])
        raise SystemExit("dag_scale: building the tiny-random models failed")


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def table(rows: list[Row], fixed: Run | None, rss_limit: int) -> str:
    head = (
        "| images | shard size | image shards | label tasks | cold s | s per task | "
        "cached rerun s | ms per cached task | peak RSS | peak OS threads | ingest images/s |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        runs = [x for x in (r.cold, r.cached) if x is not None]
        rss = _mib(max(x.peak_rss for x in runs))
        threads = max(x.peak_threads for x in runs)
        if r.cold.killed:
            cold = (
                f"killed at {r.cold.seconds:.0f} s ({r.cold.finished_tasks()} tasks done) | - | "
                "- | -"
            )
            rss = f"> {_mib(rss_limit)} (limit)"
        else:
            per_cached = r.cached.seconds / r.tasks * 1e3
            cold = (
                f"{r.cold.seconds:.1f} | {r.cold.seconds / r.tasks:.3f} | "
                f"{r.cached.seconds:.1f} | {per_cached:.0f}"
            )
        lines.append(
            f"| {r.images} | {r.shard_size} | {r.shards} | {r.tasks} | {cold} | {rss} | "
            f"{threads} | {r.ingest_rate:.0f} |"
        )
    done = [r for r in rows if r.cached is not None]
    if len(done) > 1:
        a, b = done[0], done[-1]
        slope = (b.cached.seconds - a.cached.seconds) / (b.tasks - a.tasks) * 1e3
        lines.append(
            f"\nmarginal cost of a cached label task ({a.tasks} vs {b.tasks} tasks): {slope:.0f} ms"
        )
    if fixed is not None:
        lines.append(
            f"fixed cost of a run with no label task (`--only ingest`, nothing new): "
            f"{fixed.seconds:.1f} s, peak {_mib(fixed.peak_rss)}, {fixed.peak_threads} threads"
        )
    return "\n".join(lines)


def _parse_size(s: str) -> tuple[int, int]:
    try:
        images, shard = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected IMAGESxSHARD_SIZE such as 800x4, got {s!r}"
        ) from None
    if images < 1 or shard < 1:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}") from None
    return images, shard


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", type=_parse_size, help="IMAGESxSHARD_SIZE each")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CI)")
    ap.add_argument("--keep", type=Path, help="keep the workspaces under this folder")
    ap.add_argument(
        "--rss-limit",
        type=float,
        default=10.0,
        help="GiB; a run whose RSS passes it is killed and reported so (default 10)",
    )
    args = ap.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    rss_limit = int(args.rss_limit * 2**30)

    base = Path(tempfile.mkdtemp(prefix="dag-scale-", dir=args.keep))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PREFECT_HOME": str(base / "prefect-home"),
        "UNIMRG_CACHE": str(base / "unimrg-cache"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("PREFECT_API_URL", None)  # the temporary server, as `unimrg run` starts it
    try:
        build_models(base, env)
        rows = []
        for k, (images, shard) in enumerate(sizes):
            rows.append(measure(base, images, shard, env, k, rss_limit))
            r = rows[-1]
            print(
                f"{images} images x {shard}: cold {r.cold.seconds:.1f} s"
                + (" (killed at the RSS limit)" if r.cold.killed else "")
                + (f", cached {r.cached.seconds:.1f} s" if r.cached else "")
                + f", peak {_mib(max(x.peak_rss for x in (r.cold, r.cached) if x))}, "
                f"{max(x.peak_threads for x in (r.cold, r.cached) if x)} threads",
                flush=True,
            )
        fixed = None
        done = [r for r in rows if r.cached is not None]
        if done and not args.quick:
            last = done[-1]
            fixed = run_cli(
                base / f"ws-{last.images}x{last.shard_size}" / "manifest.yaml",
                ["ingest"],
                env,
                rss_limit,
            )
        print(f"\nunimrg run, 64x48 JPEGs, depth + segment on tiny-random, {os.cpu_count()} CPUs\n")
        print(table(rows, fixed, rss_limit))
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
