"""The app bundle (FAB) finlora submits and pins is byte for byte the one Flower's own builder makes from disk,
although finlora never walks a virtual environment or an ignored directory to build it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from finlora.common.config import PROJECT_ROOT
from finlora.common.flower_processes import app_fab, app_fab_hash, app_files, stage_app


def _small_app(root: Path) -> Path:
    """The project's pyproject.toml and .gitignore, two modules, and files Flower's build must drop: a virtual
    environment, a git directory, an ignored build directory, caches, a symlink."""
    root.mkdir()
    shutil.copyfile(PROJECT_ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / ".gitignore").write_text("*.pyc\n__pycache__/\n/build/\n/runs/\n")
    for rel, text in {"server/app.py": "A = 1\n", "client/app.py": "B = 2\n", "README.md": "# app\n",
                      "docs/notes.md": "notes\n", "conf/settings.json": "{}\n",
                      ".venv/lib/site.py": "x = 1\n", ".git/hooks/x.py": "y = 1\n", "build/lib/gen.py": "z = 1\n",
                      "runs/out/metrics.jsonl": "{}\n", "server/__pycache__/app.cpython-311.pyc": "",
                      "nested/build/kept.py": "# only the top-level build/ is ignored\n",
                      "nested/.venv/kept.py": "# only the top-level .venv is excluded\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "linked.py").symlink_to(root / "server" / "app.py")
    return root


def test_the_fab_equals_flowers_own_build_without_walking_ignored_directories(tmp_path):
    app = _small_app(tmp_path / "app")
    files = app_files(app)
    assert {"server/app.py", "nested/build/kept.py", "nested/.venv/kept.py", ".git/hooks/x.py"} <= set(files)
    assert not [f for f in files if f.startswith((".venv/", "build/", "runs/")) or "__pycache__" in f
                or f == "linked.py"], files
    assert app_fab(app) == build_fab_from_disk(app)

    staged = stage_app(app, tmp_path / "staged")
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)  # what 'flwr run staged' submits
    assert app_fab_hash(staged) == hashlib.sha256(build_fab_from_disk(app)).hexdigest()
    assert not (staged / ".venv").exists() and not (staged / "build").exists()
