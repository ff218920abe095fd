"""The README's quick-start block runs as printed, on the real MiniLM, and does what its comments say."""

from __future__ import annotations

import re

import pytest
import torch


from tests.tolerances import assert_same_function

from tests.helpers import REPO_ROOT

README = REPO_ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.slow  # the real all-MiniLM-L6-v2
def test_readme_quick_start_runs_as_printed(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    block = python_blocks(README.read_text())[0]
    assert "LoraModel(backbone_model=model" in block and "from_finetuned" in block  # it is the quick start
    monkeypatch.chdir(tmp_path)  # the block writes out/sst2-lora relative to the working directory
    scope: dict = {}  # the block defines everything it uses (path included)
    exec(compile(block, str(README), "exec"), scope)  # noqa: S102 - our own README

    files = sorted(p.name for p in (tmp_path / "out" / "sst2-lora").iterdir())
    assert files == ["delta_config.json", "delta_model.safetensors"]
    model, fresh, delta = scope["model"], scope["fresh"], scope["delta"]
    assert delta.state == "merged"
    # The reloaded delta reproduces the saved model: same outputs as the merged original.
    model.eval()
    fresh.eval()
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert_same_function(fresh(input_ids=ids).logits, model(input_ids=ids).logits, model=model)
