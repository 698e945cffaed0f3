"""The file-hash memo behind every fingerprint: one entry per file, whatever its history."""

from __future__ import annotations

import json
import os

from pipeline.fingerprint import cache_dir, cached_file_hash


def test_the_memo_keeps_one_entry_per_file_as_it_changes(tmp_path, monkeypatch):
    """Before, every version of a file (a new size or mtime) added an entry and none left: a
    shard rewritten on every ingest, or a checkpoint saved every few hundred steps, grew the
    memo that every process reads whole and rewrites on each miss."""
    monkeypatch.setenv("UNIMRG_CACHE", str(tmp_path / "cache"))
    f, other = tmp_path / "shard.parquet", tmp_path / "other.bin"
    other.write_bytes(b"stays")
    hashes = [cached_file_hash(other)]
    for i in range(5):
        f.write_bytes(b"version %d" % i)
        os.utime(f, ns=(10**9 * (i + 1), 10**9 * (i + 1)))
        hashes.append(cached_file_hash(f))
    memo = json.loads((cache_dir() / "file-hashes.json").read_text())
    assert sorted(k.rsplit("|", 2)[0] for k in memo) == sorted([str(f), str(other)])
    assert set(memo.values()) == {hashes[0], hashes[-1]}
    assert len(set(hashes)) == 6  # every version was hashed anew, none served stale
