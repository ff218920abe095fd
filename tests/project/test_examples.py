"""The example scripts run (in their fast --tiny mode) and their checks hold."""

from __future__ import annotations

from tests.helpers import REPO_ROOT, load_script

EXAMPLES = REPO_ROOT / "examples"


def load(name: str):
    return load_script(EXAMPLES / f"{name}.py", name)


def test_quickstart_tiny(capsys) -> None:
    assert load("quickstart").main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "detach restores the backbone exactly: True" in out
    assert "attach restores the trained model exactly: True" in out
    assert "reloaded model equals the trained one: True" in out
