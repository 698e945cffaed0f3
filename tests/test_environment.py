"""The environment is the same on every machine: installs take constraints.txt's pins, and a
tiny-random model cached by other code or another library release is never reused."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

from pipeline import fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, ver = line.partition("==")
            assert ver, f"constraints.txt: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = ver
    return pins


def test_every_install_takes_the_pins():
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
    pins = _pins()
    for lib in ("torch", "transformers", "prefect", "pyarrow", "datasets", "segment-anything"):
        assert lib in pins, f"{lib} is not pinned"


def test_the_installed_environment_is_the_pinned_one():
    pins = _pins()
    for lib in ("transformers", "tokenizers", "prefect", "pyarrow", "numpy", "dask"):
        assert version(lib) == pins[lib], f"{lib} {version(lib)} installed, {pins[lib]} pinned"


def test_tiny_random_cache_is_keyed_by_what_built_it(monkeypatch):
    first = fingerprint.tiny_random_cache("janus", "v2", ("torch", "transformers"))
    assert first == fingerprint.tiny_random_cache("janus", "v2", ("torch", "transformers"))
    assert first != fingerprint.tiny_random_cache("janus", "v3", ("torch", "transformers"))

    import importlib.metadata as md

    real = md.version
    monkeypatch.setattr(md, "version", lambda lib: "0.0.1" if lib == "transformers" else real(lib))
    newer = fingerprint.tiny_random_cache("janus", "v2", ("torch", "transformers"))
    assert newer != first and newer.parent == first.parent
