"""Understanding data that cannot be trained on is counted at indexing time under honest names,
with the file and line; a log line torn by a kill does not stop a resume."""

from __future__ import annotations

import json

import pytest

from pipeline.shards import Layout
from trainer.image_index import ImageIndex
from trainer.understanding_data import load_understanding

TURNS = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A disc."}]


def test_bad_conversations_are_counted_with_file_and_line(train_manifest, tmp_path):
    m = train_manifest()
    conv = tmp_path / "data" / "conv.jsonl"
    rows = [
        {"image": "img0.png", "conversations": TURNS},  # used
        {"image": "img1.png", "conversations": ["What is this?", "A disc."]},  # not objects
        {"image": "img2.png", "conversations": [{"from": "human", "value": 5}]},
        {"image": "img3.png", "conversations": TURNS[:1]},  # no gpt turn
        {"image": "../conv.jsonl", "conversations": TURNS},  # escapes image_root
    ]
    conv.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    layout = Layout(m.out)
    und = load_understanding(m, layout, ImageIndex.build(layout))
    assert und.report == {
        "conversations": 5,
        "used": 1,
        "malformed_turns": 2,
        "no_gpt_turn": 1,
        "outside_image_root": 1,
    }
    assert und.examples["malformed_turns"] == [f"{conv}:2", f"{conv}:3"]
    assert und.examples["outside_image_root"] == [f"{conv}:5"]


def test_a_missing_understanding_file_names_it(train_manifest, tmp_path):
    m = train_manifest()
    (tmp_path / "data" / "conv.jsonl").unlink()
    layout = Layout(m.out)
    with pytest.raises(FileNotFoundError, match=r"understanding\[0\].path: no such file") as info:
        load_understanding(m, layout, ImageIndex.build(layout))
    assert info.value.filename == str(tmp_path / "data" / "conv.jsonl")


def test_a_torn_last_log_line_is_dropped_not_fatal(tmp_path):
    from trainer.run_folder import last_logged, truncate_log

    log = tmp_path / "log.jsonl"
    good = [json.dumps({"step": s, "loss": {"depth": s / 10}}) for s in (1, 2, 3)]
    log.write_text("\n".join(good) + '\n{"step": 4, "lo')
    assert last_logged(tmp_path) == {"depth": 0.3}
    truncate_log(log, 2)
    assert log.read_text() == "\n".join(good[:2]) + "\n"
    log.write_text(good[0] + "\n{broken\n" + good[1] + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON record"):
        truncate_log(log, 2)


def test_line_and_paragraph_separators_inside_jsonl_strings_are_valid(train_manifest, tmp_path):
    """JSON allows U+2028 / U+2029 (and U+0085) unescaped inside strings; str.splitlines cut
    such a line in two and the valid file was refused."""
    m = train_manifest()
    conv = tmp_path / "data" / "conv.jsonl"
    turns = [TURNS[0], {"from": "gpt", "value": "A disc.\u2028Round.\u2029Flat.\x85End."}]
    row = {"image": "img0.png", "conversations": turns}
    conv.write_text(json.dumps(row, ensure_ascii=False) + "\r\n", encoding="utf-8")
    layout = Layout(m.out)
    und = load_understanding(m, layout, ImageIndex.build(layout))
    assert und.report == {"conversations": 1, "used": 1}
    assert und.conversations[0][1]["value"] == turns[1]["value"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_nested_or_undecodable_understanding_data_is_one_line_naming_the_file(
    train_manifest, tmp_path, suffix
):
    """A RecursionError traceback (deep nesting) and a UnicodeDecodeError naming no file
    before; now InputError (the command line's exit 2) naming the file and line."""
    from pipeline.input_files import InputError
    from pipeline.manifest import ManifestError

    assert issubclass(InputError, ManifestError)  # the command line's exit 2

    conv = tmp_path / "data" / f"conv{suffix}"
    m = train_manifest(
        extra={"understanding": [{"path": f"data/{conv.name}", "image_root": "data/images"}]}
    )
    layout = Layout(m.out)
    deep = "[" * 100_000 + "]" * 100_000
    ok = json.dumps({"image": "img0.png", "conversations": TURNS})
    conv.write_text(f"{ok}\n{deep}\n" if suffix == ".jsonl" else f"[{ok}, {deep}]")
    where = f"{conv}:2" if suffix == ".jsonl" else f"{conv}"
    with pytest.raises(InputError) as info:
        load_understanding(m, layout, ImageIndex.build(layout))
    assert str(info.value).startswith(f"{where}: JSON nested too deeply")
    conv.write_bytes(ok.encode() + b"\n" + b'{"image": "caf\xe9.png"}\n')
    with pytest.raises(InputError, match=rf"^{conv}:2: not UTF-8 text"):
        load_understanding(m, layout, ImageIndex.build(layout))
