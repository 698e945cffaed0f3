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
    msg = _err({**BASE, "trainer": {"adapter": "chameleon"}})
    assert (
        "trainer.adapter: expected an adapter in trainer/adapters/" in msg and "'chameleon'" in msg
    )
    assert parse_manifest({**FULL, "trainer": {"adapter": "janus"}}).trainer.adapter == "janus"


#: Everything the default trainer (four tasks) needs: both label stages and understanding data.
FULL = {
    **BASE,
    "stages": {"depth": {"model": "tiny-random"}, "segment": {"model_type": "tiny-random"}},
    "understanding": [{"path": "c.jsonl", "image_root": "imgs"}],
}


def test_partial_loss_weights_keep_the_released_weight_for_the_others():
    m = parse_manifest({**FULL, "trainer": {"loss_weights": {"depth": 0.5}}})
    assert m.trainer.loss_weights == {
        "understanding": 1.0,
        "reconstruction": 1.0,
        "depth": 0.5,
        "segmentation": 1.0,
        "text_to_image": 0.0,  # not in the released recipe: off unless asked for
    }


@pytest.mark.parametrize(
    ("trainer", "extra", "expected"),
    [
        ({"loss_weights": {"dpeth": 1.0}}, {}, "trainer.loss_weights: unknown tasks ['dpeth']"),
        (
            {
                "loss_weights": dict.fromkeys(
                    ["understanding", "reconstruction", "depth", "segmentation"], 0
                )
            },
            {},
            "trainer.loss_weights: every task has weight 0",
        ),
        ({"loss_weights": {"depth": -1}}, {}, "trainer.loss_weights: expected numbers >= 0"),
        ({"uncond_rate": {"reconstrution": 0.1}}, {}, "trainer.uncond_rate: unknown generation"),
        (
            {"uncond_rate": {"depth": 2}},
            {},
            "trainer.uncond_rate: depth: expected a rate in [0, 1]",
        ),
        ({"prompts": {"depth": []}}, {}, "trainer.prompts: ['depth']: expected a non-empty list"),
        ({"prompts": {"segmantation": ["x"]}}, {}, "trainer.prompts: unknown generation tasks"),
        ({"target_resample": {"depth": "lanczos"}}, {}, "trainer.target_resample.depth"),
        ({"pad_color": [0, 300, 0]}, {}, "trainer.pad_color: expected three integers 0-255"),
        (
            {},
            {"stages": {"depth": {"model": "tiny-random"}}},
            "trainer.loss_weights.segmentation: is 1.0 but stages.segment is not configured",
        ),
        (
            {"loss_weights": {"segmentation": 0}},
            {"understanding": []},
            "trainer.loss_weights.understanding: is 1.0 but `understanding:` lists no",
        ),
    ],
)
def test_trainer_settings_the_trainer_would_reject_fail_at_the_door(trainer, extra, expected):
    msg = _err({**FULL, **extra, "trainer": trainer})
    assert expected in msg


def test_uncond_rate_is_per_task_with_released_defaults():
    t = parse_manifest({**FULL, "trainer": {}}).trainer
    assert t.uncond_rate == {"reconstruction": 0.1, "depth": 0.0, "segmentation": 0.0}
    assert t.target_resample == {"depth": "bicubic", "segmentation": "nearest"}
    assert (t.generation_resize, t.understanding_resize, t.condition_grad_scale) == (
        "stretch",
        "pad",
        0.1,
    )
    t = parse_manifest({**FULL, "trainer": {"uncond_rate": 0.3}}).trainer
    assert t.uncond_rate == {"reconstruction": 0.3, "depth": 0.0, "segmentation": 0.0}
    t = parse_manifest({**FULL, "trainer": {"uncond_rate": {"depth": 0.2}}}).trainer
    assert t.uncond_rate == {"reconstruction": 0.1, "depth": 0.2, "segmentation": 0.0}


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    from pipeline.manifest import ManifestError, load_manifest

    path = tmp_path / "m.yaml"
    path.write_text("output_dir: out\nshard_size: 4\nsources: []\nshard_size: 8\n")
    with pytest.raises(ManifestError, match=r"line 4: key 'shard_size' given twice .*line 2"):
        load_manifest(path)


@pytest.mark.parametrize(
    "field, value, ok",
    [
        ("pred_iou_thresh", 1.5, False),
        ("pred_iou_thresh", -0.1, False),
        ("pred_iou_thresh", 1.0, True),
        ("stability_score_thresh", 2, False),
        ("box_nms_thresh", 0, False),
        ("box_nms_thresh", 1.0, True),
        ("crop_nms_thresh", 1.2, False),
    ],
)
def test_segment_thresholds_are_range_checked(field, value, ok):
    from pipeline.manifest import ManifestError, parse_manifest

    data = {"output_dir": "o", "sources": [], "stages": {"segment": {field: value}}}
    if ok:
        assert getattr(parse_manifest(data).stages.segment, field) == value
    else:
        with pytest.raises(
            ManifestError, match=rf"stages.segment.{field}: (expected a number|input should be)"
        ):
            parse_manifest(data)


def test_max_image_pixels_can_raise_pillows_limit(tmp_path, monkeypatch):
    """Pillow refuses images over twice its own limit before ingest can judge them; the
    manifest's limit replaces Pillow's, so raising it lets bigger images in."""
    import yaml
    from PIL import Image

    from pipeline.ingest import ingest
    from pipeline.manifest import load_manifest
    from tests.conftest import encode, synthetic_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # stands for Pillow's 178M default
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "big.png").write_bytes(encode(synthetic_image(1, (80, 80)), "PNG"))
    path = tmp_path / "m.yaml"
    spec = {"output_dir": "out", "sources": [{"name": "s", "path": "imgs"}]}
    path.write_text(yaml.safe_dump({**spec, "max_image_pixels": 10_000}))
    assert ingest(load_manifest(path), progress=False).new == 1  # 6400 px > 2 x 1000
    path.write_text(yaml.safe_dump({**spec, "max_image_pixels": 5000, "output_dir": "out2"}))
    assert ingest(load_manifest(path), progress=False).quarantined == 1


def test_the_decompression_bomb_warning_does_not_reach_the_console(tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from tests.conftest import encode, synthetic_image

    (tmp_path / "imgs").mkdir()
    for i in range(6):  # over the limit but under twice it: Pillow warns, ingest quarantines
        data = encode(synthetic_image(i, (80, 80)), "PNG")
        (tmp_path / "imgs" / f"{i}.png").write_bytes(data)
    path = tmp_path / "m.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output_dir": "out",
                "max_image_pixels": 4000,
                "sources": [{"name": "s", "path": "imgs"}],
            }
        )
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", "-q", "-m", str(path)],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr
    assert "DecompressionBomb" not in out.stderr, out.stderr


# --- what a destructive command may touch: configured subfolders and output_dir (issue 20) ---

#: A trainer section that needs no stages or understanding data.
RECON_ONLY = {"loss_weights": {"understanding": 0, "depth": 0, "segmentation": 0}}


@pytest.mark.parametrize("section", ["trainer", "eval"])
@pytest.mark.parametrize(
    "subdir", ["../victim", "/etc", ".", "..", "", "a/b", ".hidden", "images", "labels"]
)
def test_output_subdirs_are_single_plain_names(section, subdir):
    """`unimrg clean` removes folders below <output_dir>/<output_subdir>/: `../victim` removed
    every folder of a sibling directory, `/etc` was listed, `.` listed images/ and labels/."""
    extra = {"trainer": RECON_ONLY} if section == "eval" else {}
    cfg = {**(RECON_ONLY if section == "trainer" else {}), "output_subdir": subdir}
    msg = _err({**BASE, **extra, section: cfg})
    assert msg.startswith(f"m.yaml: {section}.output_subdir: ")
    assert "\n" not in msg


def test_train_and_eval_subfolders_differ():
    msg = _err(
        {
            **BASE,
            "trainer": {**RECON_ONLY, "output_subdir": "runs"},
            "eval": {"output_subdir": "runs"},
        }
    )
    assert "eval.output_subdir: 'runs' is also trainer.output_subdir" in msg
    ok = parse_manifest({**BASE, "trainer": {**RECON_ONLY, "output_subdir": "runs-2"}})
    assert ok.trainer.output_subdir == "runs-2"


def test_output_dir_may_not_be_the_root_or_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for out in ("/", "~", str(tmp_path / "home" / "sub" / "..")):
        with pytest.raises(ManifestError, match=r"^m.yaml: output_dir: .*(root|home folder)"):
            parse_manifest({**BASE, "output_dir": out}, base_dir=tmp_path, origin="m.yaml")
    assert parse_manifest({**BASE, "output_dir": "~/out"}, base_dir=tmp_path).out.name == "out"


@pytest.mark.parametrize(
    ("out", "sources", "understanding", "expected"),
    [
        ("imgs/out", [{"name": "s", "path": "imgs"}], [], "is inside source 's' (sources.0.path"),
        ("data", [{"name": "s", "path": "data/imgs"}], [], "holds source 's' (sources.0.path"),
        ("imgs", [{"name": "s", "path": "imgs"}], [], "holds source 's'"),
        ("imgs/o", [{"name": "g", "path": "imgs/**/*.jpg"}], [], "is inside source 'g'"),
        ("o", [{"name": "p", "path": "o/images/shard-00000.parquet"}], [], "holds source 'p'"),
        (
            "conv/out",
            [],
            [{"path": "c.json", "image_root": "conv"}],
            "is inside source 'understanding-0' (understanding.0.image_root: conv)",
        ),
        ("link/out", [{"name": "s", "path": "imgs"}], [], "is inside source 's'"),
    ],
)
def test_output_dir_may_not_overlap_a_source(tmp_path, out, sources, understanding, expected):
    """An output_dir inside a source fed the tool's own outputs (preview, loss plots, probe
    grids) back into ingest; a source inside output_dir is among the files clean looks at."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "imgs")  # output_dir through a link into a source
    data = {"output_dir": out, "sources": sources, "understanding": understanding}
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data, base_dir=tmp_path, origin="m.yaml")
    msg = str(exc.value)
    assert msg.startswith(f"m.yaml: output_dir: {out}: ") and expected in msg, msg


def test_output_dir_beside_its_sources_is_fine(tmp_path):
    (tmp_path / "imgs").mkdir()
    data = {
        "output_dir": "out",
        "sources": [{"name": "s", "path": "imgs"}, {"name": "g", "path": "imgs-2/*.jpg"}],
        "understanding": [{"path": "out/c.json", "image_root": "imgs"}],  # data, not a source
    }
    assert parse_manifest(data, base_dir=tmp_path).out == tmp_path / "out"


# --- numbers and malformed files (issue 20) ---


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), "nan", "inf"])
@pytest.mark.parametrize(
    "field",
    [
        "trainer.lr",
        "trainer.grad_clip",
        "trainer.weight_decay",
        "trainer.warmup_ratio",
        "trainer.condition_grad_scale",
        "trainer.probe_temperature",
        "trainer.probe_cfg_weight",
        "trainer.loss_weights.reconstruction",
        "trainer.uncond_rate.reconstruction",
        "trainer.betas",
        "stages.segment.pred_iou_thresh",
        "stages.segment.stability_score_offset",
        "stages.segment.crop_overlap_ratio",
    ],
)
def test_non_finite_numbers_are_refused_in_every_float_field(tmp_path, field, bad):
    """A loss weight of .inf or .nan (or an lr of .nan) trained a NaN model that was then
    cached and scored as if it were fine; YAML writes them `.nan`, `.inf`, and a string
    'nan' would be read as one too."""
    section, *rest = field.split(".")
    value = [bad, 0.95] if rest == ["betas"] else bad
    data = {**BASE, "trainer": dict(RECON_ONLY)} if section == "trainer" else dict(BASE)
    if section == "stages":
        data["stages"] = {"segment": {rest[1]: value}}
    elif len(rest) == 2:
        data["trainer"][rest[0]] = {**data["trainer"].get(rest[0], {}), rest[1]: value}
    else:
        data["trainer"][rest[0]] = value
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ManifestError) as exc:
        load_manifest(path)
    msg = str(exc.value)
    assert f"m.yaml: {'.'.join([section, *rest][: 2 if section == 'trainer' else 3])}" in msg
    assert "\n" not in msg


def _load_err(tmp_path, text: str | bytes) -> str:
    path = tmp_path / "m.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ManifestError) as exc:
        load_manifest(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}") and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_deeply_nested_yaml_is_one_line(tmp_path, opening, closing):
    """A RecursionError traceback before."""
    depth = 50_000
    msg = _load_err(tmp_path, f"output_dir: out\nsources: {opening * depth}1{closing * depth}\n")
    assert "nested too deeply" in msg


def test_an_unhashable_yaml_key_is_one_line(tmp_path):
    """A TypeError traceback before (`? [a, b]` is a list used as a mapping key)."""
    msg = _load_err(tmp_path, "output_dir: out\nsources: []\n? [a, b]\n: 1\n")
    assert "not valid YAML" in msg and "unhashable key" in msg and "line 3" in msg


def _alias_bomb(levels: int) -> str:
    """The billion laughs: each level a list of ten references to the one below; the top one
    is the anchor `B`."""
    names = [f"b{i}" for i in range(levels - 1)] + ["B"]
    lines = [f'{names[0]}: &{names[0]} ["lol"]']
    lines += [f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]" for p, n in zip(names, names[1:])]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "field",
    [
        "version: *B",
        "shard_size: *B",
        "trainer: {lr: *B}",
        "trainer: {loss_weights: {depth: *B}}",
        "trainer: {uncond_rate: {depth: *B}}",
        "trainer: {adapter: *B}",
        "trainer: {output_subdir: *B}",
        "stages: {segment: {render: *B}}",
    ],
)
def test_an_alias_bomb_in_a_typed_field_is_a_short_line(tmp_path, field):
    """A few hundred bytes of YAML expand to 10**levels strings by reference: small in memory,
    but the error message's repr of it exhausted memory. Errors show a cut repr."""
    for levels in (6, 12):  # 10**6 strings: a 7 MB message before; 10**12: out of memory
        text = _alias_bomb(levels) + "output_dir: out\nsources: []\n" + field + "\n"
        msg = _load_err(tmp_path, text)
        assert len(msg) < 600, f"{len(msg)} characters"


def test_a_long_list_of_bad_items_is_a_short_line():
    msg = _err({**BASE, "trainer": {**RECON_ONLY, "trainable": list(range(100_000))}})
    assert msg.count("trainer.trainable.") == 10 and msg.endswith("... and 99990 more")


def test_a_manifest_that_is_not_utf8_names_the_file_and_line(tmp_path):
    """A UnicodeDecodeError that named no file (exit 1) before."""
    msg = _load_err(tmp_path, b"output_dir: out\nsources: []\n# caf\xe9\n")
    assert msg.startswith(f"{tmp_path / 'm.yaml'}:3: not UTF-8 text")
    bom = tmp_path / "bom.yaml"  # a byte-order mark is UTF-8 all the same
    bom.write_bytes(b"\xef\xbb\xbfoutput_dir: out\nsources: []\n")
    assert load_manifest(bom).output_dir == Path("out")


def test_the_source_name_check_is_linear():
    """names.count() per name: 60 000 sources took half a minute; a Counter takes milliseconds."""
    import time

    n = 60_000
    sources = [{"name": f"s{i}", "path": "imgs"} for i in range(n)]
    started = time.perf_counter()
    assert len(parse_manifest({**BASE, "sources": sources}).sources) == n
    assert time.perf_counter() - started < 10
    msg = _err({**BASE, "sources": [*sources, {"name": "s7", "path": "imgs"}]})
    assert "source names must be unique, repeated: ['s7']" in msg
