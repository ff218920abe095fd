"""mkdocs hook: links from the guides to repository files outside ``docs/`` keep working in the built site.

The guides are written to be read on a code host too, so they link to files next to the docs folder
(``../benchmarks/results/suite.md``, plots under ``../benchmarks/results/``). mkdocs only publishes ``docs/``, and
``--strict`` rightly fails on a link it cannot resolve. Rather than silencing that check (it is what catches a
really broken link), this hook publishes each repository file a page links to under ``repo/<its path>`` and points
the link there; markdown files reached that way are scanned the same way, so their own images come along.
A link to a file that does not exist is left alone, and the strict build reports it.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

# [text](target) and ![alt](target), target without a scheme, an anchor-only form or an absolute path
LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s#]+)((?:#[^)\s]*)?\))")
PREFIX = "repo"
_published: dict[str, str] = {}  # absolute source path -> src_uri in the site


def _repo_root(config: Any) -> str:
    return os.path.dirname(os.path.abspath(config["config_file_path"]))


def _outside_target(page_path: str, target: str, docs_dir: str, root: str) -> str | None:
    """The absolute path of a linked repository file outside ``docs_dir``, or None."""
    if "://" in target or target.startswith(("/", "mailto:")):
        return None
    resolved = os.path.normpath(os.path.join(os.path.dirname(page_path), target))
    inside_docs = resolved == docs_dir or resolved.startswith(docs_dir + os.sep)
    inside_repo = resolved.startswith(root + os.sep)
    if inside_docs or not inside_repo or not os.path.isfile(resolved):
        return None
    return resolved


def _publish(path: str, files: Files, config: Any, root: str) -> None:
    if path in _published:
        return
    uri = posixpath.join(PREFIX, *os.path.relpath(path, root).split(os.sep))
    _published[path] = uri
    # published on purpose outside the nav: reachable through the link, not a page of its own in the menu
    files.append(File.generated(config, uri, abs_src_path=path, inclusion=InclusionLevel.NOT_IN_NAV))
    if path.endswith(".md"):
        _scan(path, files, config, root, docs_dir=None)


def _scan(path: str, files: Files, config: Any, root: str, docs_dir: str | None) -> None:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    for match in LINK.finditer(text):
        target = match.group(2)
        if docs_dir is None:  # a published repository file: its links are relative to its own place
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), target))
            if os.path.isfile(resolved) and resolved.startswith(root + os.sep):
                _publish(resolved, files, config, root)
            continue
        outside = _outside_target(path, target, docs_dir, root)
        if outside is not None:
            _publish(outside, files, config, root)


def on_files(files: Files, config: Any) -> Files:
    _published.clear()
    root, docs_dir = _repo_root(config), os.path.abspath(config["docs_dir"])
    for file in list(files.documentation_pages()):
        _scan(file.abs_src_path, files, config, root, docs_dir)
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    root, docs_dir = _repo_root(config), os.path.abspath(config["docs_dir"])
    page_dir = posixpath.dirname(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        outside = _outside_target(page.file.abs_src_path, match.group(2), docs_dir, root)
        if outside is None or outside not in _published:
            return match.group(0)
        return match.group(1) + posixpath.relpath(_published[outside], page_dir or ".") + match.group(3)

    if page.file.src_uri.startswith(PREFIX + "/"):
        return markdown  # its links already point at its published neighbours
    return LINK.sub(rewrite, markdown)
