"""The design's import layering, checked on every import statement (module level and inside functions), so it
cannot regress: ``common`` imports neither side nor ``zk``; the two sides do not import each other; ``zk`` is
plain Python + crypto (no torch, no Flower), which is also checked by importing all of it in a fresh process.
The folders are installed as ``finlora.<folder>``: no module may import a bare ``common``/``client``/... (that
would load a second copy of a module, or someone else's package of the same name)."""

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
ZK_MAY_USE_FROM_COMMON = {"finlora.common.io"}
"""Atomic file writes only: plain Python, no torch or Flower behind it."""


def _layer(module: str) -> str:
    """The design layer an import names: ``finlora.common.io`` -> ``common``; third-party names stay as they are."""
    parts = module.split(".")
    return parts[1] if parts[0] == "finlora" and len(parts) > 1 else parts[0]


def imports_of(package: str) -> list[tuple[str, int, str]]:
    """(file, line, imported module) for every absolute import in ``package`` (a folder under the repo root)."""
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
           if _layer(module) in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_zk_uses_only_the_plain_parts_of_common():
    bad = [f"{file}:{line} imports {module}" for file, line, module in imports_of("zk")
           if _layer(module) == "common" and module not in ZK_MAY_USE_FROM_COMMON]
    assert not bad, "\n".join(bad)


def test_importing_all_of_zk_loads_no_torch_and_no_flower():
    modules = sorted(f"finlora.zk.{p.stem}" for p in (REPO / "zk").glob("*.py") if p.stem != "__init__")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"print(','.join(sorted(h for h in {HEAVY!r} if h in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"zk pulled in: {out.stdout.strip()}"


@pytest.mark.parametrize("package", [*PROJECT, "tests", "bench"])
def test_project_modules_are_imported_only_as_finlora_subpackages(package):
    bad = [f"{file}:{line} imports {module} (write finlora.{module})" for file, line, module in imports_of(package)
           if module.split(".")[0] in PROJECT]
    assert not bad, "\n".join(bad)


def test_installed_names_do_not_clash_with_other_projects(tmp_path):
    """Outside the checkout, only ``finlora`` is importable: a bare ``common``/``client``/``eval`` stays free for other
    projects, and finlora's modules come from the one installed distribution."""
    code = ("import importlib.util as u, finlora.common.io, finlora.client.app, finlora.server.app, "
            "finlora.eval.runner\n"
            f"print(sorted(n for n in {PROJECT!r} if u.find_spec(n) is not None))\n"
            "print(finlora.common.io.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    bare, io_file = out.stdout.split("\n")[:2]
    assert bare == "[]", f"top-level names installed: {bare}"
    installed_as = Path(io_file).resolve()
    assert installed_as == (REPO / "common" / "io.py").resolve() or installed_as.parts[-3:] == ("finlora", "common",
                                                                                              "io.py"), installed_as
