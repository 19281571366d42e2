"""mkdocs hooks (mkdocs.yml): links from docs/ to repository files outside it.

The pages link to files of the repository as they read on a checkout (``../results/demo/pareto_flops.png``,
``../stitching_deit/README.md``). mkdocs only knows docs/, so such a link would be a build warning (an error under
--strict) even when the file exists. Here every such link is checked against the repository: a file that exists is
copied into the site under ``repo/`` (images, HTML pages and data) or, for Markdown outside docs/, shown as its
repository path; a link to a file that does not exist is a warning, so `mkdocs build --strict` fails on it.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.snnet")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(\.\./([^)#\s]+)(#[^)\s]*)?\)")


def _root(config) -> Path:
    return Path(config["docs_dir"]).resolve().parent


def _targets(text: str) -> list[str]:
    return [m[3] for m in LINK.finditer(text)]


def on_files(files: Files, config) -> Files:
    """Copy each non-Markdown repository file a page links to into the site (under repo/)."""
    root = _root(config)
    wanted: set[str] = set()
    for f in files.documentation_pages():
        wanted.update(t for t in _targets(Path(f.abs_src_path).read_text()) if not t.endswith(".md"))
    for target in sorted(wanted):
        if (root / target).is_file():
            files.append(File.generated(config, f"repo/{target}", abs_src_path=str(root / target)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = _root(config)

    def link(m: re.Match) -> str:
        bang, text, target, anchor = m[1], m[2], m[3], m[4] or ""
        if not (root / target).is_file():
            log.warning(f"{page.file.src_uri}: link to '../{target}', which is not a file of the repository")
            return m[0]
        if target.endswith(".md"):  # another README of the repository: named, not rendered here
            return f"{text} (`{target}` in the repository)" if text and text != target else f"`{target}`"
        return f"{bang}[{text}](repo/{target}{anchor})"
    return LINK.sub(link, markdown)
