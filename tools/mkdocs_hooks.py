"""mkdocs hooks (mkdocs.yml): the repository's own Markdown files as pages, and links from docs/ to files outside it.

The pages link to files of the repository as they read on a checkout (``../results/demo/pareto_flops.png``,
``../stitching_deit/README.md``). mkdocs only knows docs/, so such a link would be a build warning (an error under
--strict) even when the file exists. Here every such link is checked against the repository:

* the README and every Markdown file outside docs/ that a page links to (the family READMEs, snnet/README.md, ...;
  followed from page to page) become pages of the site under ``repo/``, rendered as the guides are (the
  family READMEs showed as plain text, the README was not in the site); their own links, relative to where they
  sit in the repository, are rewritten to the site's pages (``docs/<page>.md`` -> the guide ``<page>.md``) and files;
* any other file a page links to (images, HTML pages, data) is copied into the site under ``repo/``;
* a link to a file that does not exist is a warning, so `mkdocs build --strict` fails on it.
"""
from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.snnet")
#: a Markdown link or image whose target is relative (no scheme, not an anchor of the page itself)
LINK = re.compile(r"(!?)\[([^\]]*)\]\((?![a-z][a-z0-9+.-]*:|#|/)([^)#\s]+)(#[^)\s]*)?\)")
#: the repository's Markdown files that are pages of the site whether or not a guide links to them
ALWAYS = ("README.md",)
PREFIX = "repo/"


def _root(config) -> Path:
    return Path(config["docs_dir"]).resolve().parent


def _repo_path(page_uri: str, target: str) -> str:
    """The repository path a link on the page `page_uri` (a site path) points to."""
    if page_uri.startswith(PREFIX):  # one of the repository's files: links are relative to where it sits there
        base = posixpath.dirname(page_uri[len(PREFIX):])
    else:  # a guide: docs/<page>
        base = posixpath.join("docs", posixpath.dirname(page_uri))
    return posixpath.normpath(posixpath.join(base, target))


def _site_path(repo_path: str) -> str:
    """Where a repository file is in the site: a guide where it is, anything else under repo/."""
    return repo_path[len("docs/"):] if repo_path.startswith("docs/") else PREFIX + repo_path


def _outside_code(text: str) -> list[tuple[bool, str]]:
    """`text` cut at its fenced code blocks: (is prose, part) in order (a link in code is code, not a link)."""
    parts = re.split(r"(^```.*?^```[^\n]*$)", text, flags=re.MULTILINE | re.DOTALL)
    return [(i % 2 == 0, part) for i, part in enumerate(parts)]


def _ours(page_uri: str, target: str) -> bool:
    """Whether this hook handles the link: every relative link of a repository page; a guide's links out of docs/
    (guide-to-guide links are mkdocs' own)."""
    return page_uri.startswith(PREFIX) or target.startswith("../")


def _links(page_uri: str, text: str) -> list[str]:
    return [_repo_path(page_uri, m[3]) for prose, part in _outside_code(text) if prose
            for m in LINK.finditer(part) if _ours(page_uri, m[3])]


def on_files(files: Files, config) -> Files:
    """The repository's Markdown pages (README.md and those the pages link to, transitively) and each other
    repository file a page links to, added to the site under repo/."""
    root = _root(config)
    pages = [(f.src_uri, Path(f.abs_src_path).read_text()) for f in files.documentation_pages()]
    pages += [(PREFIX + p, (root / p).read_text()) for p in ALWAYS]
    seen = {uri for uri, _ in pages}
    wanted: set[str] = set(ALWAYS)
    while pages:
        uri, text = pages.pop()
        for target in _links(uri, text):
            if target.startswith("docs/") or target.startswith("..") or not (root / target).is_file():
                continue  # a guide (mkdocs has it), or a missing file (on_page_markdown warns)
            wanted.add(target)
            if target.endswith(".md") and PREFIX + target not in seen:
                seen.add(PREFIX + target)
                pages.append((PREFIX + target, (root / target).read_text()))
    for target in sorted(wanted):
        files.append(File.generated(config, PREFIX + target, abs_src_path=str(root / target)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    root = _root(config)
    uri = page.file.src_uri
    here = posixpath.dirname(uri)

    def link(m: re.Match) -> str:
        bang, text, target, anchor = m[1], m[2], m[3], m[4] or ""
        if not _ours(uri, target):
            return m[0]  # guide to guide: mkdocs resolves and checks it
        path = _repo_path(uri, target)
        if path.startswith("..") or not (root / path).is_file():
            log.warning(f"{uri}: link to {target!r}, which is not a file of the repository")
            return m[0]
        return f"{bang}[{text}]({posixpath.relpath(_site_path(path), here or '.')}{anchor})"
    return "".join(LINK.sub(link, part) if prose else part for prose, part in _outside_code(markdown))
