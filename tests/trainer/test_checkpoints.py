"""Checkpoints other tools can use: transformers opens them alone, bf16 storage, keep_last,
safe resume (weights_only, falls back past a damaged one), export. tiny-random: weights are noise."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from trainer.checkpoints import export_checkpoint, prune_checkpoints
from trainer.loop import train


class _Payload:
    """Pickled, it would create `marker` when unpickled (what weights_only must refuse)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


# Runs in a fresh interpreter, away from the project: only transformers and the folder.
OPEN_WITH_TRANSFORMERS = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import (AutoModel, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)

    folder = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype="auto")
    base = AutoModel.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.new("RGB", (40, 30), (200, 10, 10)),
                       return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    print(json.dumps({
        "model": type(model).__name__, "base": type(base).__name__,
        "processor": type(processor).__name__, "tokenizer": type(tokenizer).__name__,
        "dtype": str(next(model.parameters()).dtype), "prompt": prompt,
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "pixels": list(inputs["pixel_values"].shape), "logits": list(out.logits.shape),
    }))
    """
)


def _open_outside(folder: Path, tmp_path: Path) -> dict:
    script = tmp_path / "open_model.py"
    script.write_text(OPEN_WITH_TRANSFORMERS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(script), str(folder)],
        cwd=tmp_path,
        env={**env, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_checkpoint_opens_with_transformers_alone_in_bf16(train_manifest, tmp_path):
    m = train_manifest(max_steps=1, eval_every=100, dtype="bfloat16")
    result = train(m, progress=False, num_workers=0)
    ckpt = result.output_dir / "step_000001"
    model_dir = ckpt / "model"
    assert (ckpt / "trainer_state.pt").is_file() and not (model_dir / "trainer_state.pt").exists()
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"BF16"}, dtypes
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    got = _open_outside(model_dir, tmp_path)
    assert got["model"] == "JanusForConditionalGeneration" and got["base"] == "JanusModel"
    assert got["processor"] == "JanusProcessor" and got["dtype"] == "torch.bfloat16"
    assert got["prompt"] == "<|User|>: <image_placeholder>\nWhat is this?\n\n<|Assistant|>:"
    assert got["image_tokens"] == 16 and got["pixels"] == [1, 3, 32, 32]
    # Every file of the run is readable by others (safetensors writes 0600 by itself).
    written = {p.name for p in result.output_dir.rglob("*")}
    assert {"lineage.json", "log.jsonl", "data_report.json", "step_000001.png"} <= written
    for p in result.output_dir.rglob("*"):
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) & want == want, p


def test_float32_training_stores_float32(train_manifest):
    m = train_manifest(max_steps=1, eval_every=100)  # CPU: dtype auto is float32
    out = train(m, progress=False, num_workers=0).output_dir
    from safetensors import safe_open

    with safe_open(out / "step_000001" / "model" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_keep_last_keeps_the_newest_and_the_final(train_manifest, tmp_path):
    m = train_manifest(max_steps=4, save_every=1, keep_last=2, eval_every=100)
    out = train(m, progress=False, num_workers=0).output_dir
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000003", "step_000004"]
    # The final one stays even when newer checkpoints exist (a longer run's, say).
    d = tmp_path / "run"
    for n in range(1, 6):
        (d / f"step_{n:06d}").mkdir(parents=True)
    removed = prune_checkpoints(d, keep_last=2, final_step=2)
    assert sorted(p.name for p in removed) == ["step_000001", "step_000003"]
    assert sorted(p.name for p in d.iterdir()) == ["step_000002", "step_000004", "step_000005"]


def test_resume_never_unpickles_code_and_falls_back_past_a_bad_checkpoint(
    train_manifest, tmp_path, capsys
):
    m = train_manifest(max_steps=3, save_every=1, eval_every=100)
    out = train(m, progress=False, num_workers=0).output_dir
    ckpt2 = out / "step_000002"
    state = torch.load(ckpt2 / "trainer_state.pt", weights_only=True)
    marker = tmp_path / "payload-ran"
    torch.save({**state, "extra": _Payload(marker)}, ckpt2 / "trainer_state.pt")
    import shutil

    shutil.rmtree(out / "step_000003")  # interrupted before the final checkpoint
    capsys.readouterr()
    resumed = train(m, resume=True, progress=False, num_workers=0)
    printed = capsys.readouterr().out
    assert not marker.exists(), "the planted pickle payload ran"
    assert resumed.computed and resumed.steps == 3
    assert f"skipping {ckpt2}" in printed and "weights_only" in printed.replace("\n", " ")
    assert f"resume: from {out / 'step_000001'}" in printed
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


def _state_with(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _first_exp_avg(state: dict) -> dict:
    return next(iter(state["optimizer"]["state"].values()))


#: What a checkpoint that loads can still hold that makes it unusable: (name, file, change, the
#: reason printed). Each one used to crash the resume with a traceback, or (a step of 100)
#: report "trained: 100 steps" with no final checkpoint written.
BAD_STATES = [
    ("step 100", "trainer_state.pt", lambda s: s.update(step=100), "disagrees with the folder"),
    ("step as text", "trainer_state.pt", lambda s: s.update(step="2"), "not an integer"),
    ("step 0", "trainer_state.pt", lambda s: s.update(step=0, batches=0), "disagrees"),
    ("batches", "trainer_state.pt", lambda s: s.update(batches=3), "batches 3"),
    (
        "optimizer shape",
        "trainer_state.pt",
        lambda s: _first_exp_avg(s).update(exp_avg=torch.zeros(3, 5)),
        "shape (3, 5)",
    ),
    (
        "optimizer groups",
        "trainer_state.pt",
        lambda s: s["optimizer"]["param_groups"].pop(),
        "1 parameter groups",
    ),
    (
        "optimizer NaN",
        "trainer_state.pt",
        lambda s: _first_exp_avg(s)["exp_avg"].fill_(float("nan")),
        "not finite",
    ),
    ("no optimizer state", "trainer_state.pt", lambda s: s.update(optimizer=[]), "optimizer"),
    ("scheduler keys", "trainer_state.pt", lambda s: s.update(scheduler={}), "scheduler state"),
    (
        "scheduler step",
        "trainer_state.pt",
        lambda s: s["scheduler"].update(last_epoch=7),
        "scheduler state is at step 7",
    ),
    ("rng", "rng_rank0.pt", lambda s: s["numpy"].update(keys=torch.zeros(3)), "RNG"),
    ("parallel", "trainer_state.pt", lambda s: s.update(parallel="fsdp"), "fsdp"),
]


def test_resume_falls_back_past_a_checkpoint_that_loads_but_cannot_be_resumed_from(
    train_manifest, tmp_path, capsys
):
    import shutil

    m = train_manifest(max_steps=3, save_every=1, eval_every=100)
    out = train(m, progress=False, num_workers=0).output_dir
    reference = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    pristine = tmp_path / "pristine"
    shutil.copytree(out / "step_000002", pristine)
    for name, file, change, reason in BAD_STATES:
        shutil.rmtree(out / "step_000003", ignore_errors=True)  # interrupted before the final
        shutil.rmtree(out / "step_000002")
        shutil.copytree(pristine, out / "step_000002")
        _state_with(out / "step_000002" / file, change)
        capsys.readouterr()
        res = train(m, resume=True, progress=False, num_workers=0)
        printed = capsys.readouterr().out.replace("\n", " ")
        assert f"skipping {out / 'step_000002'}" in printed and reason in printed, (name, printed)
        assert f"resume: from {out / 'step_000001'}" in printed, (name, printed)
        # It reached the end from step 1, and says only the steps it trained.
        assert res.computed and res.steps == 3, name
        assert (out / "step_000003" / "model" / "model.safetensors").exists(), name
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2, 3], name
        # Nothing of the refused state was applied: the same losses as the unbroken run.
        for a, b in zip(log[1:], reference[1:]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), name


def test_resume_with_no_usable_checkpoint_is_one_line(train_manifest, tmp_path, capsys):
    import shutil

    m = train_manifest(max_steps=2, save_every=1, eval_every=100)
    out = train(m, progress=False, num_workers=0).output_dir
    shutil.rmtree(out / "step_000002")
    _state_with(out / "step_000001" / "trainer_state.pt", lambda s: s.update(step=5))
    with pytest.raises(ValueError) as exc:
        train(m, resume=True, progress=False, num_workers=0)
    msg = str(exc.value)
    assert "\n" not in msg and "step_000001" in msg and "disagrees with the folder" in msg, msg


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),  # what write() raises: no file named
        RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
            "writing file data/0: file write failed"
        ),  # torch's zip writer
    ],
)
def test_a_failed_checkpoint_write_is_one_line_naming_the_file(
    train_manifest, tmp_path, capsys, monkeypatch, error
):
    from flows.cli import main
    from tests.trainer.conftest import manifest_file

    path = manifest_file(train_manifest(max_steps=2, save_every=1), tmp_path / "m.yaml")
    real = torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith("trainer_state.pt"):
            raise error
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", "-m", str(path)]) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("unimrg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    (out,) = (tmp_path / "out" / "train").iterdir()
    assert str(out / "step_000001" / "trainer_state.pt") in lines[0], lines[0]
    if error.args[0] == 28:
        assert "the disk is full" in lines[0], lines[0]
    assert not list(out.glob("step_*")) and not list(out.glob(".step_*"))


def test_resume_reads_rng_and_trainer_state_with_weights_only(train_manifest):
    m = train_manifest(max_steps=1, eval_every=100)
    ckpt = train(m, progress=False, num_workers=0).output_dir / "step_000001"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    rng = torch.load(ckpt / "rng_rank0.pt", weights_only=True)
    assert state["step"] == 1 and "optimizer" in state and "scheduler" in state
    assert isinstance(rng["torch"], torch.Tensor) and isinstance(rng["numpy"]["keys"], torch.Tensor)


def test_export_writes_a_clean_hub_ready_folder(train_manifest, tmp_path):
    m = train_manifest(max_steps=1, eval_every=100)
    ckpt = train(m, progress=False, num_workers=0).output_dir / "step_000001"
    to = export_checkpoint(ckpt, tmp_path / "export" / "janus-unimrg")
    names = sorted(p.name for p in to.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(
        names
    )
    assert "README.md" in names and "chat_template.jinja" in names
    assert not {"trainer_state.pt", "rng_rank0.pt", "config.yaml", "unimrg_adapter.json"} & set(
        names
    )
    card = (to / "README.md").read_text()
    assert "library_name: transformers" in card and "noise" in card  # tiny-random says so
    assert _open_outside(to, tmp_path)["model"] == "JanusForConditionalGeneration"
    with pytest.raises(ValueError, match="not empty"):
        export_checkpoint(ckpt, to)
    with pytest.raises(ValueError, match="holds no model"):
        export_checkpoint(tmp_path, tmp_path / "x")


LINEAGE_FIELDS = {
    "kind",
    "stage",
    "stage_version",
    "fingerprint",
    "model",
    "parameters",
    "covers",
    "random_weights",
    "libraries",
    "created",
}


def _train_lineage(out: Path) -> dict:
    from pipeline.lineage import read_lineage

    rec = read_lineage(out)
    assert rec is not None and LINEAGE_FIELDS <= set(rec), rec
    assert rec["kind"] == "train" and rec["fingerprint"] == out.name
    assert rec["libraries"]["transformers"] and rec["libraries"]["torch"]
    assert rec["parameters"]["max_steps"] == 1 and "keep_last" in rec["parameters"]
    assert rec["label_fingerprints"] == {"depth": "fp-depth-test", "segment": "fp-segment-test"}
    assert rec["covers"]["labels"] == rec["label_fingerprints"]
    return rec


def test_train_lineage_for_tiny_random_a_local_directory_and_a_hub_cache_model(
    train_manifest, tmp_path, monkeypatch
):
    from tests.conftest import fake_hub_cache
    from trainer.adapters.janus.adapter import JanusAdapter
    from trainer.adapters.janus.tiny import tiny_random_dir

    kw = {"max_steps": 1, "eval_every": 100}
    out = train(train_manifest(**kw), progress=False, num_workers=0).output_dir
    rec = _train_lineage(out)
    assert rec["model"]["spec"] == "tiny-random" and rec["random_weights"] is True
    assert rec["model"]["weights"]

    JanusAdapter.load("tiny-random").save(tmp_path / "models" / "mine")
    out = train(train_manifest(model="models/mine", **kw), progress=False, num_workers=0).output_dir
    rec = _train_lineage(out)
    assert rec["model"]["source"] == "local" and rec["model"]["path"].endswith("models/mine")

    snap = fake_hub_cache(monkeypatch, tmp_path / "hf", "org/janus", tiny_random_dir())
    (snap / "unimrg_adapter.json").unlink()  # a real hub model has no project file
    m = train_manifest(model="org/janus", **kw)
    out = train(m, progress=False, num_workers=0).output_dir
    rec = _train_lineage(out)
    # Pinned to the snapshot commit, although the manifest says `revision: null`.
    assert rec["model"]["revision"] == snap.name and rec["model"]["source"] == "hub"
    assert rec["model"]["weights"] and rec["random_weights"] is False
    assert rec["covers"]["model"]["revision"] == snap.name


def test_keep_current_trims_the_current_run_to_newest_and_final(train_manifest):
    from flows.clean import plan_clean

    m = train_manifest(max_steps=3, save_every=1, keep_last=3, eval_every=100)
    out = train(m, progress=False, num_workers=0).output_dir
    import shutil

    shutil.copytree(out / "step_000003", out / "step_000004")  # a longer run's, say
    plan = plan_clean(m, keep_current=True)
    assert sorted(r.path for r in plan.remove if r.kind == "checkpoint") == [
        str(out / "step_000001"),
        str(out / "step_000002"),
    ]
    assert [r for r in plan_clean(m).remove if r.kind == "checkpoint"] == []


def test_export_keeps_a_temporary_folder_it_did_not_make_and_refuses_during_training(tmp_path):
    """Before, `export --to X` removed a `.X.tmp` beside X that it did not make, and copied a
    checkpoint while its training could rotate it away."""
    from pipeline.locks import Busy, exclusive

    ckpt = tmp_path / "train" / "0123456789abcdef" / "step_000001"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "config.json").write_text('{"model_type": "janus"}')
    to = tmp_path / "export" / "janus"
    theirs = tmp_path / "export" / ".janus.tmp"
    theirs.mkdir(parents=True)
    (theirs / "keep.txt").write_text("not unimrg's")
    assert export_checkpoint(ckpt, to) == to and (to / "config.json").is_file()
    assert (theirs / "keep.txt").read_text() == "not unimrg's"
    assert sorted(p.name for p in to.parent.iterdir()) == [".janus.tmp", "janus"]
    with exclusive(ckpt.parent / ".train.lock", "the training"):
        with pytest.raises(Busy, match=r"\.train\.lock is held"):
            export_checkpoint(ckpt, tmp_path / "export" / "janus-2")
    assert not (tmp_path / "export" / "janus-2").exists()
