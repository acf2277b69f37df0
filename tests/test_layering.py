"""The dependency direction of DESIGN.md: fedsim → actors → aggregation, never upward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "aggregation": {"ray", "actors", "fedsim", "transformers", "peft", "deepspeed"},
    "actors": {"fedsim", "transformers", "peft"},
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_never_imports_upward(package: str) -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_roots(p) & FORBIDDEN[package])
        for p in (ROOT / package).rglob("*.py")
        if _imported_roots(p) & FORBIDDEN[package]
    }
    assert offenders == {}
