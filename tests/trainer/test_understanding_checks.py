"""Understanding data that cannot be trained on is counted at indexing time under honest names,
with the file and line; a log line torn by a kill does not stop a resume."""

from __future__ import annotations

import json

import pytest

from pipeline.shards import Layout
from trainer.data import ImageIndex, load_understanding

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
    from trainer.loop import _last_logged, _truncate_log

    log = tmp_path / "log.jsonl"
    good = [json.dumps({"step": s, "loss": {"depth": s / 10}}) for s in (1, 2, 3)]
    log.write_text("\n".join(good) + '\n{"step": 4, "lo')
    assert _last_logged(tmp_path) == {"depth": 0.3}
    _truncate_log(log, 2)
    assert log.read_text() == "\n".join(good[:2]) + "\n"
    log.write_text(good[0] + "\n{broken\n" + good[1] + "\n")
    with pytest.raises(ValueError, match=r"log.jsonl:2: not a JSON record"):
        _truncate_log(log, 2)
