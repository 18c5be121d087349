"""The design's import layering, checked on every import statement (module level and inside functions), so it
cannot regress: ``common`` imports neither side nor ``zk``; the two sides do not import each other; ``zk`` is
plain Python + crypto (no torch, no Flower), which is also checked by importing all of it in a fresh process."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROJECT = ("common", "client", "server", "simulation", "eval", "zk")
HEAVY = ("torch", "flwr", "transformers", "peft", "opacus", "bitsandbytes", "accelerate", "datasets", "ray")

FORBIDDEN = {
    "common": {"client", "server", "simulation", "zk"},
    "eval": {"client", "server", "simulation", "zk"},
    "client": {"server", "simulation"},
    "server": {"client", "simulation"},
    "zk": {"client", "server", "simulation", "eval", *HEAVY},
}
ZK_MAY_USE_FROM_COMMON = {"common.io"}
"""Atomic file writes only: plain Python, no torch or Flower behind it."""


def imports_of(package: str) -> list[tuple[str, int, str]]:
    """(file, line, imported module) for every absolute import in ``package``."""
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found += [(str(path.relative_to(REPO)), node.lineno, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.append((str(path.relative_to(REPO)), node.lineno, node.module))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_what_its_layer_forbids(package):
    bad = [f"{file}:{line} imports {module}" for file, line, module in imports_of(package)
           if module.split(".")[0] in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_zk_uses_only_the_plain_parts_of_common():
    bad = [f"{file}:{line} imports {module}" for file, line, module in imports_of("zk")
           if module.split(".")[0] == "common" and module not in ZK_MAY_USE_FROM_COMMON]
    assert not bad, "\n".join(bad)


def test_importing_all_of_zk_loads_no_torch_and_no_flower():
    modules = sorted(f"zk.{p.stem}" for p in (REPO / "zk").glob("*.py") if p.stem != "__init__")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(','.join(sorted(h for h in {HEAVY!r} if h in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"zk pulled in: {out.stdout.strip()}"
