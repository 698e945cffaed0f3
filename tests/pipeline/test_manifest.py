"""Manifest parsing: typed objects, and errors that name the field path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.manifest import Manifest, ManifestError, load_manifest, parse_manifest

BASE = {"output_dir": "out", "sources": [{"name": "s", "path": "imgs"}]}


def _err(data) -> str:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data, origin="m.yaml")
    return str(exc.value)


def test_minimal_manifest_gets_defaults(tmp_path):
    m = parse_manifest(BASE, base_dir=tmp_path)
    assert m.shard_size == 256
    assert m.out == tmp_path / "out"
    assert m.stages.depth is None and m.trainer is None


def test_relative_paths_resolve_against_manifest_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "m.yaml"
    path.write_text(yaml.safe_dump(BASE))
    m = load_manifest(path)
    assert m.out == tmp_path / "sub" / "out"
    assert m.resolve("imgs") == tmp_path / "sub" / "imgs"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        (
            {"stages": {"depth": {"batch_size": "big"}}},
            "stages.depth.batch_size: expected a positive integer, got 'big'",
        ),
        (
            {"stages": {"depth": {"batch_size": 0}}},
            "stages.depth.batch_size: expected a positive integer, got 0",
        ),
        ({"shard_size": -3}, "shard_size: expected a positive integer, got -3"),
        (
            {"stages": {"segment": {"render": "outline"}}},
            "stages.segment.render: expected one of 'edges' or 'colors', got 'outline'",
        ),
        ({"stages": {"depth": {"batch_sise": 4}}}, "stages.depth.batch_sise: unknown field"),
        ({"trainer": {"lr": "fast"}}, "trainer.lr: expected a positive number, got 'fast'"),
        ({"sources": [{"name": "s"}]}, "sources.0.path: required field is missing"),
        ({"version": 2}, "version: expected one of 1, got 2"),
    ],
)
def test_errors_name_the_field_path(patch, expected):
    assert expected in _err({**BASE, **patch})


def test_missing_required_top_level_field():
    assert "output_dir: required field is missing" in _err({"sources": []})


def test_duplicate_source_names_rejected():
    msg = _err({**BASE, "sources": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]})
    assert "sources:" in msg and "'a'" in msg


def test_not_a_mapping_and_bad_yaml(tmp_path):
    assert "expected a mapping" in _err(["a"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(bad)
    with pytest.raises(ManifestError, match="manifest not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    """Every manifest field has a one-line description, and docs/manifest.md lists it."""
    from pipeline.manifest_docs import iter_fields

    doc = (Path(__file__).parents[2] / "docs" / "manifest.md").read_text()
    for path, info in iter_fields(Manifest):
        assert info.description, f"{path} has no description"
        assert f"`{path}`" in doc, (
            f"{path} missing from docs/manifest.md (run python -m pipeline.manifest_docs)"
        )


def test_bundled_manifest_is_valid():
    m = load_manifest(Path(__file__).parents[2] / "data_manifest.yaml")
    assert m.stages.depth is not None and m.stages.segment is not None


def test_unknown_trainer_adapter_names_the_field():
    msg = _err({**BASE, "trainer": {"adapter": "emu3"}})
    assert "trainer.adapter: expected an adapter in trainer/adapters/" in msg and "'emu3'" in msg
    assert parse_manifest({**BASE, "trainer": {"adapter": "janus"}}).trainer.adapter == "janus"
