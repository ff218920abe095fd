"""Static checks over the repository: names every module exports exist, and the lint gate holds.

``from deltakit.config import *`` raised AttributeError for a name listed in ``__all__`` that lived in another
module; pyflakes-class errors (undefined names, unused imports) are what the ruff gate catches.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import shutil
import subprocess
import sys

import pytest

import deltakit
from tests.helpers import REPO_ROOT


def _modules() -> list[str]:
    # ``__main__`` modules are scripts: importing one runs it.
    found = pkgutil.walk_packages(deltakit.__path__, prefix="deltakit.")
    return sorted(m.name for m in found if not m.name.endswith(".__main__"))


@pytest.mark.parametrize("name", _modules())
def test_every_name_in_a_modules_all_exists(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:  # an optional extra not installed here
        if error.name and error.name.split(".")[0] != "deltakit":
            pytest.skip(f"{name} needs {error.name}")
        raise
    missing = [n for n in getattr(module, "__all__", []) if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names the module does not define: {missing}"


def test_ruff_finds_no_errors() -> None:
    # Run as a module so that the venv's ruff is used whether or not its scripts directory is on PATH.
    # A ruff found only on PATH (pipx, a system package) is run as that executable: ``-m ruff`` would fail there.
    if importlib.util.find_spec("ruff") is not None:
        ruff = [sys.executable, "-m", "ruff"]
    elif shutil.which("ruff") is not None:
        ruff = [shutil.which("ruff")]
    else:
        pytest.skip("ruff is not installed (the dev extra installs it)")
    result = subprocess.run(
        [*ruff, "check", "--no-cache", "deltakit", "tests", "benchmarks", "examples"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
