"""Threads and memory of the flow's process do not grow with the number of shards (issue 21).

The label flow runs depth (`tiny-random`, torch ops in the task threads) over 10 and then 40
one-image shards, under the session's Prefect harness; a sampler reads the process's OS thread
count and RSS from /proc while each flow runs. Before the fix every shard task ran in a new
thread of Prefect's unbounded pool, and each such thread kept the OpenMP team its torch ops
started: 40 shards held about 60 more threads than 10. Also: `benchmarks/dag_scale.py --quick`
runs and prints its table.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import encode, synthetic_image

ROOT = Path(__file__).resolve().parents[2]


def _proc_status() -> tuple[int, int]:
    """(OS threads, RSS in bytes) of this process."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return int(fields["Threads"][0]), int(fields["VmRSS"][0]) * 1024


class _Peak:
    """Samples this process every 20 ms while in the `with` block."""

    def __enter__(self):
        self.threads = self.rss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            t, r = _proc_status()
            self.threads, self.rss = max(self.threads, t), max(self.rss, r)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _workspace(root: Path, shards: int) -> Path:
    (root / "imgs").mkdir(parents=True)
    for i in range(shards):
        img = synthetic_image(1000 + i, (40, 32))
        (root / "imgs" / f"{i:03d}.jpg").write_bytes(encode(img))
    data = {
        "output_dir": "out",
        "shard_size": 1,
        "sources": [{"name": "imgs", "path": "imgs"}],
        "stages": {"depth": {"model": "tiny-random", "batch_size": 1, "input_size": 28}},
    }
    (root / "m.yaml").write_text(yaml.safe_dump(data))
    return root / "m.yaml"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_threads_and_memory_flat_in_the_number_of_shards(prefect_api, tmp_path):
    from flows.dag import label_flow
    from pipeline.ingest import ingest
    from pipeline.manifest import load_manifest

    peaks = {}
    # 10 first, then 40: the larger run comes second, after the model and Prefect are warm.
    for n in (10, 10, 40):
        manifest = _workspace(tmp_path / f"ws{len(peaks)}-{n}", n)
        ingest(load_manifest(manifest), progress=False)
        with _Peak() as peak:
            rows = label_flow(manifest_path=str(manifest), stage="depth")
        assert len(rows) == n and all(r["how"] == "computed" for r in rows)
        peaks[n] = peak  # the second 10-shard run replaces the first (cold imports)
    small, large = peaks[10], peaks[40]
    assert large.threads <= small.threads + 2, (small.threads, large.threads)
    assert large.rss <= small.rss * 1.15, (small.rss >> 20, large.rss >> 20)


def test_dag_scale_quick_prints_its_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)  # the benchmark measures `unimrg run`'s own server
    out = subprocess.run(
        [sys.executable, "benchmarks/dag_scale.py", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "| images | shard size | image shards | label tasks |" in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("| 8 | 2 | 4 | 8 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[4]) > 0 and float(cells[6]) > 0  # cold and cached seconds
    assert int(cells[9]) > 0  # peak OS threads
