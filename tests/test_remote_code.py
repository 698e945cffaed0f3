"""No code from a model folder ever runs (issue 20): a folder whose configs name Python files of
its own (`auto_map`) is refused with one line, transformers never asks on the terminal, and
every transformers load in the code passes `trust_remote_code=False`."""

from __future__ import annotations

import ast
import builtins
import json
import shutil
from pathlib import Path

import pytest

from pipeline.pretrained import CustomCodeRefused, custom_code

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "trainer", "flows", "benchmarks", "experiments", "scripts")


def _loads_without_the_flag(path: Path, root: Path = ROOT) -> list[str]:
    """`x.from_pretrained(...)` and transformers `pipeline(...)` calls that do not pass
    `trust_remote_code=False`, as `file:line`."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        loads = (isinstance(f, ast.Attribute) and f.attr == "from_pretrained") or (
            isinstance(f, ast.Name) and f.id == "pipeline"
        )
        flag = [k for k in node.keywords if k.arg == "trust_remote_code"]
        if loads and not (
            flag and isinstance(flag[0].value, ast.Constant) and flag[0].value.value is False
        ):
            bad.append(f"{path.relative_to(root)}:{node.lineno}")
    return bad


def test_the_checker_sees_a_load_without_the_flag(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text(
        "AutoTokenizer.from_pretrained(p)\n"
        "AutoConfig.from_pretrained(p, trust_remote_code=False)\n"
        "pipeline('depth-estimation', model=m)\n"
    )
    assert _loads_without_the_flag(mod, tmp_path) == ["m.py:1", "m.py:3"]


def test_every_transformers_load_passes_trust_remote_code_false():
    bad = [
        hit
        for package in PACKAGES
        if (ROOT / package).is_dir()
        for p in sorted((ROOT / package).rglob("*.py"))
        for hit in _loads_without_the_flag(p)
    ]
    assert not bad, "load without trust_remote_code=False (use pipeline.pretrained):\n" + "\n".join(
        bad
    )


EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("the model folder's code ran")
from transformers import JanusImageProcessor as EvilImageProcessor
from transformers import JanusProcessor as EvilProcessor
from transformers import PreTrainedTokenizerFast as EvilTokenizer
"""


def _edit(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        target = data
        *parents, last = key.split("__")
        for p in parents:
            target = target[p]
        target[last] = value
    path.write_text(json.dumps(data))


@pytest.fixture
def answers_yes(monkeypatch, tmp_path):
    """A terminal where someone answers y to every question; records the questions asked.
    Code transformers would import is copied to tmp_path, not the user's module cache."""
    monkeypatch.setattr(
        "transformers.dynamic_module_utils.HF_MODULES_CACHE", str(tmp_path / "hf-modules")
    )
    asked = []

    def fake_input(prompt=""):
        asked.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", fake_input)
    return asked


def _evil_janus(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny-random Janus with its tokenizer and processor configs naming classes from an
    `evil.py` in the folder that writes a marker file when imported."""
    from trainer.adapters.janus.tiny import tiny_random_dir

    folder, marker = tmp_path / "evil-janus", tmp_path / "MARKER"
    shutil.copytree(tiny_random_dir(), folder)
    (folder / "unimrg_adapter.json").unlink()  # a folder from elsewhere, not unimrg's own
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    _edit(
        folder / "tokenizer_config.json",
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]},
    )
    _edit(
        folder / "processor_config.json",
        processor_class="EvilProcessor",
        auto_map={"AutoProcessor": "evil.EvilProcessor"},
        image_processor__image_processor_type="EvilImageProcessor",
        image_processor__auto_map={"AutoImageProcessor": "evil.EvilImageProcessor"},
    )
    return folder, marker


def test_a_janus_folder_asking_to_run_its_code_is_refused_without_a_question(tmp_path, answers_yes):
    """Before, transformers asked twice on the terminal; answering y ran evil.py."""
    from trainer.adapters.janus.adapter import JanusAdapter

    folder, marker = _evil_janus(tmp_path)
    assert custom_code(folder) == [
        "evil.EvilImageProcessor",
        "evil.EvilProcessor",
        "evil.EvilTokenizer",
    ]
    with pytest.raises(CustomCodeRefused) as exc:
        JanusAdapter.load(str(folder))
    msg = str(exc.value)
    assert msg.startswith(f"{folder}: ") and "\n" not in msg
    assert "evil.EvilTokenizer" in msg and "never runs a model folder's code" in msg
    assert answers_yes == [] and not marker.exists()


def test_a_depth_folder_asking_to_run_its_code_is_refused(tmp_path, answers_yes):
    from pipeline.stages.depth.model import tiny_random_model_dir
    from pipeline.stages.depth.stage import DepthStage

    folder, marker = tmp_path / "evil-depth", tmp_path / "MARKER"
    shutil.copytree(tiny_random_model_dir(), folder)
    (folder / "evil.py").write_text(
        EVIL.format(marker=str(marker)) + "from transformers import DPTImageProcessor as Evil\n"
    )
    _edit(
        folder / "preprocessor_config.json",
        image_processor_type="Evil",
        auto_map={"AutoImageProcessor": "evil.Evil"},
    )
    stage = DepthStage(model=str(folder), device="cpu", batch_size=1, input_size=28)
    with pytest.raises(CustomCodeRefused, match=r"evil\.Evil\b"):
        stage.setup()
    assert answers_yes == [] and not marker.exists()
