"""Numbers in the README and docs are generated, never retyped.

A generated region is a marker line, the block the command prints, and a closing marker:

    <!-- generated: snnet select results/demo/stitches_res.txt --max-flops 1M -->
    ```console
    $ snnet select results/demo/stitches_res.txt --max-flops 1M
    ...what the command prints...
    ```
    <!-- /generated -->

The command is a `snnet` command, run in-process on the committed results (from a scratch folder that links the
repository's results/ and configs/, so what it writes stays out of the checkout) (stdout; when it
fails, its stderr and ``# exit code N`` too, as a user sees them), or ``lines FILE FIRST LAST``: the lines of a
committed benchmark output from the first that starts with FIRST to the next that starts with LAST, verbatim and
unfenced (the Markdown tables benchmarks print render as tables). ``--write`` regenerates every region of
README.md and docs/*.md in place (idempotent: a second run changes nothing), ``--check`` exits 1 naming each region
that differs from what the committed results produce (tests/test_docs.py runs it).

    python tools/docs_blocks.py --write     # after the results changed (make docs-blocks)
    python tools/docs_blocks.py --check
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the library of this checkout
    sys.path.insert(0, str(ROOT))

from snnet import cli  # noqa: E402  (after the path is set)

REGION = re.compile(r"^<!-- generated: (?P<cmd>.+?) -->\n(?P<body>.*?)^<!-- /generated -->\n", re.M | re.S)


def pages(root: Path = ROOT) -> list[Path]:
    """The files whose regions are generated: the README and every page of the docs site."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def run(command: str) -> str:
    """What `command` (``snnet ARGS``) prints, as a console block's lines (without the fences)."""
    argv = shlex.split(command)
    if argv[0] != "snnet":
        raise SystemExit(f"docs_blocks: generated command {command!r} is not a snnet command; write 'snnet ...'")
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        # the repository's results and configs, read where the command names them; what it writes (--out
        # output/...) lands in the scratch folder, never in the checkout
        for name in ("results", "configs"):
            os.symlink(ROOT / name, Path(scratch) / name)
        os.chdir(scratch)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = cli.main(argv[1:])
                except SystemExit as e:
                    rc = e.code if isinstance(e.code, int) else 1
        finally:
            os.chdir(cwd)
    text = f"$ {command}\n" + out.getvalue()
    if rc:
        text += err.getvalue() + f"# exit code {rc}\n"
    return text.rstrip("\n") + "\n"


def lines(command: str) -> str:
    """``lines FILE FIRST LAST``: the lines of FILE (relative to the repository) from the first starting with FIRST
    through the next starting with LAST."""
    _, name, first, last = shlex.split(command)
    text = (ROOT / name).read_text().splitlines()
    try:
        a = next(i for i, ln in enumerate(text) if ln.startswith(first))
        b = next(i for i in range(a, len(text)) if text[i].startswith(last))
    except StopIteration:
        raise SystemExit(f"docs_blocks: {name} has no line starting with {first!r} followed by one starting with "
                         f"{last!r}; fix the region '{command}'") from None
    return "\n".join(text[a:b + 1]) + "\n"


def render(text: str) -> str:
    """`text` with every generated region's block replaced by what its command prints now."""
    def block(m: re.Match) -> str:
        if m["cmd"].startswith("lines "):
            return f"<!-- generated: {m['cmd']} -->\n{lines(m['cmd'])}<!-- /generated -->\n"
        return f"<!-- generated: {m['cmd']} -->\n```console\n{run(m['cmd'])}```\n<!-- /generated -->\n"
    return REGION.sub(block, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="regenerate every region in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a region differs from what its command prints")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text)
        if new == text:
            continue
        if args.write:
            tmp = page.with_name(page.name + ".tmp")
            tmp.write_text(new)
            os.replace(tmp, page)  # atomic: a page is never half written
            print(f"docs_blocks: rewrote {page.relative_to(ROOT)}")
        else:
            old = {m["cmd"]: m["body"] for m in REGION.finditer(text)}
            stale += [f"{page.relative_to(ROOT)}: {m['cmd']}" for m in REGION.finditer(new)
                      if old.get(m["cmd"]) != m["body"]]
    if stale:
        print("docs_blocks: these generated blocks differ from what the committed results give; run "
              "`python tools/docs_blocks.py --write` (make docs-blocks):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
