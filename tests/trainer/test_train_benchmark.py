"""The throughput benchmark runs end to end at tiny size on CPU (numbers are not checked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_train_throughput_tiny_cpu(capsys, parallel):
    spec = importlib.util.spec_from_file_location("train_throughput", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(
        [
            "--tiny",
            "--device",
            "cpu",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--images",
            "8",
            "--workers",
            "0",
            "--parallel",
            parallel,
            "-q",
        ]
    )
    assert r["parallel"] == f"{parallel} x 1"
    assert r["steps_measured"] == 2
    assert r["samples_per_step"] == 4 * 2
    assert 0 <= r["data_wait_s"] <= r["step_s"]
    assert r["compute_s"] > 0 and r["samples_per_s"] > 0 and r["model_tflops_per_step"] > 0
    assert "data_wait_share" in capsys.readouterr().out
