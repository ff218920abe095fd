"""The documentation site builds offline with warnings as errors, and a broken reference fails it (`make docs`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        check=False, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def text_of(page: Path) -> str:
    """The page's text, tags dropped and whitespace removed (highlighted code splits every token into a tag)."""
    return re.sub(r"\s+", "", re.sub(r"<[^>]+>", " ", page.read_text(encoding="utf-8")))


@pytest.mark.slow  # two site builds, about 5 s each on 2 cores
def test_docs_build_strict_with_api_reference(tmp_path: Path) -> None:
    run = build(REPO_ROOT / "mkdocs.yml", tmp_path / "site")
    assert run.returncode == 0, run.stdout + run.stderr
    site = tmp_path / "site"
    for page in ("index.html", "migration/index.html", "api/deltakit/index.html", "api/methods/index.html",
                 "api/checkpoint/index.html", "api/serving/index.html", "api/integrations/index.html",
                 "api/structures/index.html", "api/site/index.html"):
        assert (site / page).is_file(), page
    methods = text_of(site / "api/methods/index.html")
    # The method classes' keyword constructors are generated at import time; the reference shows the real ones,
    # not DeltaBase's (backbone_model, config, *, name).
    assert "LoraModel(backbone_model:nn.Module,lora_r:int=8,lora_alpha:float=16," in methods
    assert "Rankoftheupdate." in methods  # the parameters' docs, from the config's docstring
    assert ":class:" not in methods and ":meth:" not in methods  # Sphinx roles rendered as code
    assert "freeze_module" in text_of(site / "api/deltakit/index.html")
    # Links from the guides to repository files outside docs/ are published with the site.
    assert list((site / "repo" / "benchmarks" / "results").glob("*.png"))

    # The same site with one reference to a method DeltaBase does not have: the strict build refuses it.
    docs = tmp_path / "docs"
    shutil.copytree(REPO_ROOT / "docs", docs)
    with open(docs / "api" / "index.md", "a", encoding="utf-8") as page:
        page.write("\nSee [`DeltaBase.no_such_method`][deltakit.base.DeltaBase.no_such_method].\n")
    config = (REPO_ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    config = config.replace("docs_dir: docs", f"docs_dir: {docs}").replace("paths: [.]", f"paths: [{REPO_ROOT}]")
    config = config.replace("- docs/hooks/", f"- {docs}/hooks/")
    (tmp_path / "mkdocs.yml").write_text(config, encoding="utf-8")
    (tmp_path / "benchmarks").symlink_to(REPO_ROOT / "benchmarks")  # what the guides link to outside docs/
    broken = build(tmp_path / "mkdocs.yml", tmp_path / "broken-site")
    assert broken.returncode != 0
    warnings = [line for line in (broken.stdout + broken.stderr).splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "deltakit.base.DeltaBase.no_such_method" in warnings[0], warnings
