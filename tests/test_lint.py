"""`make lint` as part of `make test`: ruff (lint and format) over the package, the tests and the benchmarks;
mypy --strict (pyproject) over the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "argv",
    [
        ["ruff", "check", "builder", "tests", "bench"],
        ["ruff", "format", "--check", "builder", "tests", "bench"],
        ["mypy", "builder"],
    ],
    ids=["ruff", "ruff-format", "mypy"],
)
def test_lint_is_clean(argv: list[str]) -> None:
    tool = BIN / argv[0]
    if not tool.exists():
        pytest.skip(f"{argv[0]} is not installed in this environment (the dev extra)")
    r = subprocess.run([str(tool), *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
