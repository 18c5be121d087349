"""The project's own code stays within the style guide's line length (there is no separate linter step in CI)."""

from __future__ import annotations

import subprocess

from tests.conftest import REPO

MAX_LINE = 120


def test_no_line_of_the_projects_python_is_longer_than_120_characters():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    too_long = [f"{name}:{i}: {len(line)} characters"
                for name in files.stdout.split() if (REPO / name).is_file()
                for i, line in enumerate((REPO / name).read_text().splitlines(), start=1) if len(line) > MAX_LINE]
    assert not too_long, "\n".join(too_long)
