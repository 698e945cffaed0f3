"""`unimrg score` and `unimrg eval` as a user meets them (subprocesses, tiny-random Janus)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.manifest import load_manifest
from tests.trainer.evaluation.conftest import save_checkpoint, write_mcq_tsv

ROOT = Path(__file__).parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_score_prints_the_metrics_as_json(tmp_path):
    tsv = tmp_path / "b.tsv"
    write_mcq_tsv(tsv, n=4)  # answers A B C A
    preds = tmp_path / "p.jsonl"
    replies = ["A", "The answer is (B).", "dog", "I cannot tell"]  # right, right, wrong, unread
    preds.write_text(
        "".join(json.dumps({"index": i, "prediction": r}) + "\n" for i, r in enumerate(replies))
    )
    proc = _run("score", "--benchmark", str(tsv), "--predictions", str(preds), "--kind", "mcq")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out == {"accuracy": 0.5, "per_category": {"animals": 2 / 3, "colours": 0.0}}


def test_score_bad_predictions_is_one_line(tmp_path):
    tsv = tmp_path / "b.tsv"
    write_mcq_tsv(tsv, n=3)
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"index": 0, "prediction": "A"}\nnot json\n')
    proc = _run("score", "--benchmark", str(tsv), "--predictions", str(preds), "--kind", "mcq")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"unimrg: error: {preds}: line 2: not JSON (Expecting value)"
    preds.write_text('{"index": 0, "prediction": "A"}\n')
    proc = _run("score", "--benchmark", str(tsv), "--predictions", str(preds), "--kind", "mcq")
    assert proc.returncode == 1 and "no prediction for index '1' (and 1 more)" in proc.stderr


def test_score_non_utf8_inputs_are_one_line_naming_the_file(tmp_path, capsys):
    from flows.cli import main

    tsv = tmp_path / "b.tsv"
    write_mcq_tsv(tsv, n=2)
    preds = tmp_path / "p.jsonl"
    preds.write_bytes(b'{"index": 0, "prediction": "A"}\n{"index": 1, "prediction": "\xe9"}\n')
    args = ["score", "--benchmark", str(tsv), "--predictions", str(preds), "--kind", "mcq"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"unimrg: error: {preds}: line 2: not UTF-8") and err.count("\n") == 1
    tsv.write_bytes(tsv.read_bytes().replace(b"Question 1?", b"Question \xff?"))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"unimrg: error: {tsv}: line 3: not UTF-8") and err.count("\n") == 1


def test_eval_end_to_end_prints_the_table_and_caches(tmp_path):
    write_mcq_tsv(tmp_path / "mini.tsv", n=6)
    m = tmp_path / "m.yaml"
    m.write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "sources": [],
                # No label stages or conversations here: reconstruction is the one task.
                "trainer": {
                    "model": "tiny-random",
                    "max_steps": 2,
                    "loss_weights": {"understanding": 0, "depth": 0, "segmentation": 0},
                },
                "eval": {
                    "benchmarks": [{"name": "mini", "path": "mini.tsv", "kind": "mcq"}],
                    "batch_size": 4,
                    "max_new_tokens": 3,
                },
            }
        )
    )
    save_checkpoint(load_manifest(m), 2, seed=3)
    proc = _run("eval", "-m", str(m))
    assert proc.returncode == 0, proc.stderr
    assert "questions/s" in proc.stdout  # the progress bar's rate
    lines = proc.stdout.splitlines()
    lines = lines[lines.index("eval: 2 evaluated, 0 cached") :]
    assert lines[1].split() == ["benchmark", "metric", "base", "post-trained", "delta"]
    assert lines[3].split()[:2] == ["mini", "accuracy"]
    assert "post-trained: step_000002" in proc.stdout
    assert "probes: eval.held_out_images is 0" in proc.stdout
    assert "RANDOM WEIGHTS" in proc.stdout
    preds = list((tmp_path / "out" / "eval").glob("*/mini/predictions.jsonl"))
    assert len(preds) == 2 and all(len(p.read_text().splitlines()) == 6 for p in preds)
    again = _run("eval", "-m", str(m), "-q")
    assert again.returncode == 0 and again.stdout.splitlines()[0] == "eval: 0 evaluated, 2 cached"
    assert again.stdout.splitlines()[1:] == lines[1:]
    bad = _run("eval", "-m", str(m), "--only", "nope")
    assert bad.returncode == 1 and "--only: unknown benchmark(s) ['nope']" in bad.stderr
