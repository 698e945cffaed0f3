"""The layers stay one-way: pipeline/ knows neither trainer nor flows; trainer/ knows no flows;
neither imports Prefect (DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "pipeline": {"trainer", "flows", "prefect", "prefect_dask"},
    "trainer": {"flows", "prefect", "prefect_dask"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports anywhere in it (lazy imports included)."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_sees_lazy_imports(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("import os\ndef f():\n    from trainer.loop import x\n    import flows.cli\n")
    assert imported_roots(mod) == {"os", "trainer", "flows"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package):
    bad = {
        f"{p.relative_to(ROOT)} imports {sorted(imported_roots(p) & FORBIDDEN[package])}"
        for p in sorted((ROOT / package).rglob("*.py"))
        if imported_roots(p) & FORBIDDEN[package]
    }
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_every_module_loads_no_upper_layer(package):
    """Import every module of the package in a fresh interpreter and look at sys.modules."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in (ROOT / package).rglob("*.py")
        if p.name != "__main__.py"
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(sorted({{n.split('.')[0] for n in sys.modules}} & set({sorted(FORBIDDEN[package])!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
