"""The eval throughput benchmark runs end to end at tiny size on CPU (numbers are not checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_throughput.py"


def test_eval_throughput_tiny_cpu(capsys):
    spec = importlib.util.spec_from_file_location("eval_throughput", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "-n",
            "10",
            "--batch-size",
            "4",
            "--max-new-tokens",
            "2",
            "-q",
        ]
    )
    assert r["questions"] == 10 and r["batch_size"] == 4
    assert r["questions_per_s"] > 0 and r["seconds"] > 0
    assert 0.0 <= r["accuracy_random_weights"] <= 1.0
    assert '"seconds_for_1000"' in capsys.readouterr().out
