"""Label stages are found by folder: one package in pipeline/stages/ plus its manifest section."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.manifest import StagesConfig
from pipeline.stages import available_stages, stage_class, stage_config_class

ROOT = Path(__file__).resolve().parents[2]


def test_the_built_in_stages_are_found_by_folder_name():
    assert available_stages() == ["depth", "segment"]
    assert stage_class("depth").name == "depth" and stage_class("segment").name == "segment"


def test_each_stage_package_gives_its_manifest_section():
    for name in available_stages():
        field = StagesConfig.model_fields[name]
        assert field.annotation == stage_config_class(name) | None
        assert field.description


def test_an_unknown_stage_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"stages.nope: unknown stage, known: \['depth'"):
        stage_class("nope")


# A whole new stage in one folder: the recipe of docs/stages.md, run in a fresh interpreter with a
# temporary folder added to the package's search path (the manifest's sections are built at import).
ECHO_STAGE = '''
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from pipeline.config import PosInt, StrictConfig
from pipeline.fingerprint import fingerprint
from pipeline.stage import LabelStage


class EchoConfig(StrictConfig):
    """Copies the image size."""

    section_description: ClassVar[str] = "Echo stage settings."
    batch_size: PosInt = Field(4, description="Rows per batch.")


@dataclass
class EchoStage(LabelStage):
    name: ClassVar[str] = "echo"
    version: ClassVar[str] = "1"
    batch_size: int = 4

    @classmethod
    def from_config(cls, cfg, base_dir):
        return cls(batch_size=cfg.batch_size)

    def setup(self):
        pass

    def fingerprint(self):
        return fingerprint({"stage": self.name, "version": self.version})

    def schema(self):
        return pa.schema([("image_id", pa.string()), ("error", pa.string()), ("w", pa.int32())])

    def process(self, batch):
        ids, ws = batch.column("image_id").to_pylist(), batch.column("width").to_pylist()
        return [{"image_id": i, "error": None, "w": w} for i, w in zip(ids, ws)]
'''

ECHO_INIT = """
from pipeline.stages.echo.stage import EchoConfig, EchoStage

CONFIG = EchoConfig
STAGE = EchoStage
"""

DRIVER = """
import sys
import pipeline.stages
pipeline.stages.__path__.append(sys.argv[1])
from pipeline.manifest import ManifestError, parse_manifest
from pipeline.stage import STAGE_NAMES, build_stage

m = parse_manifest({"output_dir": "o", "sources": [], "stages": {"echo": {"batch_size": 2}}})
stage = build_stage("echo", m)
print(STAGE_NAMES, type(stage).__name__, stage.batch_size)
try:
    parse_manifest({"output_dir": "o", "sources": [], "stages": {"echo": {"batch_size": 0}}})
except ManifestError as exc:
    print(exc)
"""


def test_adding_a_stage_is_one_folder_plus_its_manifest_section(tmp_path):
    (tmp_path / "echo").mkdir()
    (tmp_path / "echo" / "stage.py").write_text(textwrap.dedent(ECHO_STAGE))
    (tmp_path / "echo" / "__init__.py").write_text(textwrap.dedent(ECHO_INIT))
    # A module, not a package, beside the stages is not a stage (one plugin, one folder).
    (tmp_path / "stray.py").write_text("STAGE = None\n")
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "('depth', 'echo', 'segment') EchoStage 2"
    assert "stages.echo.batch_size: expected a positive integer, got 0" in lines[1]


def test_a_package_without_stage_is_a_one_line_error(tmp_path, monkeypatch):
    import pipeline.stages

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "__init__.py").write_text("")
    monkeypatch.setattr(pipeline.stages, "__path__", [*pipeline.stages.__path__, str(tmp_path)])
    assert "empty" in available_stages()
    with pytest.raises(ValueError, match=r"pipeline/stages/empty/__init__.py: defines no STAGE"):
        stage_class("empty")
