"""The example scripts run (in their fast --tiny mode) and their checks hold."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

from tests.helpers import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as a normal import would (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_quickstart_tiny(capsys) -> None:
    assert load("quickstart").main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "detach restores the backbone exactly: True" in out
    assert "attach restores the trained model exactly: True" in out
    assert "reloaded model equals the trained one: True" in out
