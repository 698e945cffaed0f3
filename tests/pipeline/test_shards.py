"""Atomic folder builds (used for every tiny-random model)."""

from __future__ import annotations

import pytest

from pipeline.shards import atomic_build_dir


def test_a_failed_build_leaves_nothing_and_a_finished_one_is_not_rebuilt(tmp_path):
    final = tmp_path / "models" / "m"

    def broken(tmp):
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        atomic_build_dir(final, broken, marker="config.json")
    assert not final.exists()
    assert list((tmp_path / "models").iterdir()) == [], "the temporary folder is cleaned up"

    calls = []

    def build(tmp):
        calls.append(tmp)
        (tmp / "config.json").write_text("{}")

    assert atomic_build_dir(final, build, marker="config.json") == final
    assert (final / "config.json").read_text() == "{}"
    atomic_build_dir(final, build, marker="config.json")
    assert len(calls) == 1
