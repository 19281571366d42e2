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
unfenced (the Markdown tables benchmarks print render as tables), ``fenced FILE FIRST LAST``: the same in a code
block, ``recorded FILE: COMMAND``: a console block of COMMAND with the committed FILE as its output (a recorded
measurement), or ``options``: train.py's option reference, a table derived from the option declarations.
``--write`` regenerates every region of README.md and docs/*.md in place (idempotent: a second run changes
nothing), ``--check`` exits 1 naming each region that differs from what the committed results produce
(tests/test_docs.py runs it).

    python tools/docs_blocks.py --write     # after the results changed (make docs-blocks)
    python tools/docs_blocks.py --check

Numbers in prose are checked the same way: a number followed at once by ``<!-- = EXPR -->`` (invisible on GitHub
and in the site) is what EXPR computes from the committed results, written with as many decimals as the page
writes (a leading ``+`` keeps the sign, a thousands comma keeps commas):

    the one below it is cfg 3<!-- = below_mixing("demo")[0] --> (91.7<!-- = acc1("demo", 3) --> % ...)

EXPR is a Python expression over the functions of `Numbers` (results files by short name: demo, v1, v2, or a path
relative to the repository) and min, max, len, sum, sorted, abs, round, set. ``--write`` rewrites the number,
``--check`` names every number that differs ("quoted 91.7, the results give 91.6").
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: the library of this checkout
    sys.path.insert(0, str(ROOT))

from snnet import cli  # noqa: E402  (after the path is set)
from snnet.results.baselines import file_baselines, staircase_at  # noqa: E402
from snnet.results.pareto import infer_anchors, is_anchor  # noqa: E402
from snnet.results.quality import in_anchor_range, line_at, pareto_front  # noqa: E402
from snnet.results.records import read_results  # noqa: E402

REGION = re.compile(r"^<!-- generated: (?P<cmd>.+?) -->\n(?P<body>.*?)^<!-- /generated -->\n", re.M | re.S)
#: a checked number: the number (a sign only after a space or bracket), then its expression
NUMBER = re.compile(r"(?P<num>(?:(?<=[\s(])[+-])?(?<![\w.])\d[\d,]*(?:\.\d+)?)<!-- = (?P<expr>.+?) -->")
#: results files by short name, for the expressions of checked numbers
FILES = {"demo": "results/demo/stitches_res.txt", "v1": "results/demo_v2/v1/stitches_res.txt",
         "v2": "results/demo_v2/v2/stitches_res.txt", "latency": "results/demo_latency/stitches_res.txt",
         "search": "results/stitch_anything/demo_search/stitches_res.txt",
         "search_ls": "results/stitch_anything/demo_search/ls/stitches_res.txt",
         "search_kl": "results/stitch_anything/demo_search/kl/stitches_res.txt"}


class Numbers:
    """What a checked number's expression can compute, from the results under `root` (read once each)."""

    def __init__(self, root: Path = ROOT):
        self.root = Path(root)
        self._cache: dict[tuple[str, str], Any] = {}

    def _once(self, kind: str, f: str, make) -> Any:
        if (kind, f) not in self._cache:
            self._cache[kind, f] = make()
        return self._cache[kind, f]

    def path(self, f: str) -> Path:
        return self.root / FILES.get(f, f)

    def records(self, f: str) -> dict[int, dict[str, Any]]:
        """The records of results file `f` by cfg_id."""
        return self._once("records", f, lambda: {r["cfg_id"]: r for r in read_results(self.path(f))})

    def anchors(self, f: str) -> list[int]:
        recs = list(self.records(f).values())
        n = infer_anchors(recs)
        return [r["cfg_id"] for r in recs if is_anchor(r, n)]

    def acc1(self, f: str, cfg: int) -> float:
        return float(self.records(f)[cfg]["acc1"])

    def mflops(self, f: str, cfg: int) -> float:
        return self.records(f)[cfg]["flops"] / 1e6

    def params(self, f: str, cfg: int) -> int:
        return int(self.records(f)[cfg]["params"])

    def front(self, f: str, cost: str = "flops") -> list[int]:
        """The cfg_ids on the Pareto front by `cost` (a record key: flops, latency_ms_b1, ...), cheapest first (snnet
        pareto's)."""
        return [r["cfg_id"] for r in pareto_front(list(self.records(f).values()), cost)]

    def ms(self, f: str, cfg: int, batch: int = 1) -> float:
        """The measured latency of stitch `cfg` at `batch` (snnet latency --results)."""
        return float(self.records(f)[cfg][f"latency_ms_b{batch}"])

    def blocks(self, f: str, cfg: int, depth: int = 4) -> int:
        """How many transformer blocks route `cfg` runs (the demo's anchors have `depth` blocks each)."""
        n = 0
        for seg in self.records(f)[cfg]["route"].split("->"):
            m = re.search(r"\[(?:b(\d+))?\.\.(?:b(\d+))?\]", seg)
            n += depth if m is None else (int(m[2]) if m[2] else depth - 1) - (int(m[1]) if m[1] else 0) + 1
        return n

    def ms_by_blocks(self, f: str, n: int, batch: int = 1) -> list[float]:
        """The latencies at `batch` of the routes that run `n` blocks."""
        return [self.ms(f, c, batch) for c in self.records(f) if self.blocks(f, c) == n]

    def median(self, values: list[float]) -> float:
        return float(statistics.median(values))

    def in_range(self, f: str, margin: float = 3.0) -> int:
        """How many stitches lie within the anchors' top-1 range +- `margin` points (the demo's summary line)."""
        return in_anchor_range(list(self.records(f).values()), self.anchors(f), margin)[0]

    def cheapest(self, f: str, min_acc: float) -> int:
        """The cfg_id `snnet select --min-acc` picks: the cheapest by FLOPs reaching top-1 `min_acc`."""
        return min((c for c in self.records(f) if self.acc1(f, c) >= min_acc),
                   key=lambda c: (self.records(f)[c]["flops"], c))

    def between(self, f: str, a: str, b: str) -> list[int]:
        """The stitches from anchor label `a` into anchor label `b` (routes ``a[..] -(..)-> b[..]``)."""
        return [c for c, r in self.records(f).items()
                if re.fullmatch(rf"{re.escape(a)}\[[^\]]*\] -\([^)]*\)-> {re.escape(b)}\[[^\]]*\]", r["route"])]

    def base(self, f: str) -> dict[str, Any]:
        """`snnet pareto --baselines`' numbers of results file `f` (snnet.results.baselines.baselines)."""
        return self._once("base", f, lambda: file_baselines(self.path(f), list(self.records(f).values()),
                                                            self.anchors(f)))

    def mixing(self, f: str, cfg: int) -> float:
        """Random anchor mixing's top-1 at the FLOPs of stitch `cfg`."""
        line = [(p["flops"], p["acc1"]) for p in self.base(f)["mixing"]]
        return line_at(line, self.records(f)[cfg]["flops"])

    def below_mixing(self, f: str) -> list[int]:
        """The stitches (not anchors) at or below the mixing line."""
        anchors = set(self.anchors(f))
        return [c for c in self.records(f) if c not in anchors and self.acc1(f, c) <= self.mixing(f, c)]

    def cascade_at(self, f: str, mflops: float) -> float:
        """The confidence cascade's best top-1 at a mean cost <= `mflops`."""
        return staircase_at([(s["flops"], s["acc1"]) for s in self.base(f)["cascade"]], mflops * 1e6)

    def cascade_best(self, f: str) -> dict[str, Any]:
        """The cascade setting of the highest top-1 (the cheapest of those): flops, acc1, chain, thresholds."""
        return max(self.base(f)["cascade"], key=lambda s: (s["acc1"], -s["flops"]))

    def above_cascade(self, f: str) -> list[int]:
        """The stitches above the cascade's front at their FLOPs, cheapest first."""
        anchors = set(self.anchors(f))
        return sorted((c for c in self.records(f) if c not in anchors and
                       self.acc1(f, c) > self.cascade_at(f, self.mflops(f, c))), key=lambda c: self.mflops(f, c))

    def hv(self, f: str, front: str = "stitched") -> float:
        """Hypervolume of the stitched front, the mixing line or the cascade (as snnet pareto --baselines)."""
        return float(self.base(f)["hypervolume"][front])

    def sim(self, name: str, front: str, end: str, score: str, tokens: bool = True) -> list[float]:
        """The values of one map (cka, ls_residual, kl) of `snnet similarity`'s similarity.json for the anchor pair
        labelled `front` -> `end`, over the pairs of token units (the head left out) unless `tokens` is False."""
        pair = next(p for p in self.json(name, "pairs") if (p["front_label"], p["end_label"]) == (front, end))
        rows = pair[score][:-1] if tokens else pair[score]
        return [v for row in rows for v in (row[:-1] if tokens else row) if v is not None]

    def sim_at(self, name: str, front: str, end: str, score: str, i: int, j: int) -> float:
        """One cell of a map of similarity.json: front unit `i`, end unit `j` of the pair `front` -> `end`."""
        pair = next(p for p in self.json(name, "pairs") if (p["front_label"], p["end_label"]) == (front, end))
        return float(pair[score][i][j])

    def networks(self, f: str) -> list[dict[str, Any]]:
        """The networks `snnet search` found (records of more than one segment)."""
        return [r for r in self.records(f).values() if len(r.get("segments") or []) > 1]

    def spearman(self, f: str, x: str = "score", y: str = "acc1") -> float:
        """Spearman's rank correlation of two record keys over the networks a search found (ties: mean ranks)."""
        recs = self.networks(f)

        def ranks(values: list[float]) -> list[float]:
            order = sorted(range(len(values)), key=lambda i: values[i])
            out = [0.0] * len(values)
            i = 0
            while i < len(order):
                j = i
                while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                    j += 1
                for k in range(i, j + 1):
                    out[order[k]] = (i + j) / 2
                i = j + 1
            return out
        a, b = ranks([r[x] for r in recs]), ranks([r[y] for r in recs])
        ma, mb = statistics.fmean(a), statistics.fmean(b)
        cov = sum((u - ma) * (v - mb) for u, v in zip(a, b))
        return cov / (sum((u - ma) ** 2 for u in a) * sum((v - mb) ** 2 for v in b)) ** 0.5

    def grab(self, name: str, pattern: str, group: int = 1) -> float:
        """A number in a committed text file: group `group` of the first match of regex `pattern`."""
        m = re.search(pattern, (self.root / name).read_text(), re.M)
        if m is None:
            raise SystemExit(f"docs_blocks: {name} has no match of {pattern!r}; fix the checked number's expression")
        return float(m[group].replace(",", ""))

    def cell(self, name: str, row: str, column: str, n: int = 0, table: str = "") -> float:
        """A number in a Markdown table of a committed text file: the row whose cells, joined by " | ", start with
        `row` (e.g. "w16-w64 | 20 | kl"), the
        column headed `column`, its `n`-th number ('86%' -> 86, '91.26 ± 0.45' -> 91.26 and with n=1 0.45, '1,097' ->
        1097); with `table`, the first table from the line starting with `table` on."""
        lines = (self.root / name).read_text().splitlines()
        cells = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]
        try:
            start = next(i for i, ln in enumerate(lines) if ln.startswith(table)) if table else 0
            i = next(i for i, ln in enumerate(lines) if i >= start and ln.startswith("|") and
                     " | ".join(cells(ln)).startswith(row))
            head = i
            while head > 0 and lines[head - 1].startswith("|"):
                head -= 1
            value = cells(lines[i])[cells(lines[head]).index(column)]
            return float(re.findall(r"[+-]?[\d,]*\.?\d+", value.replace("*", ""))[n].replace(",", ""))
        except (StopIteration, ValueError, TypeError, IndexError):
            raise SystemExit(f"docs_blocks: {name} has no table row {row!r} with a number in column {column!r}; "
                             f"fix the checked number's expression") from None

    def json(self, name: str, *keys: Any) -> Any:
        """A value of a committed JSON file, by keys/indices."""
        value = json.loads((self.root / name).read_text())
        for k in keys:
            value = value[k]
        return value

    def namespace(self) -> dict[str, Any]:
        ns: dict[str, Any] = {name: getattr(self, name) for name in dir(self) if not name.startswith("_")
                              and name not in ("root", "namespace", "path")}
        ns.update(min=min, max=max, len=len, sum=sum, sorted=sorted, abs=abs, round=round, set=set)
        return ns


def quote(value: Any, like: str) -> str:
    """`value` written as the page writes `like`: its decimals, a leading + and thousands commas kept."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SystemExit(f"docs_blocks: a checked number's expression gave {value!r}, not a number")
    decimals = len(like.split(".")[1]) if "." in like else 0
    return f"{value:{'+' if like.startswith('+') else ''}{',' if ',' in like else ''}.{decimals}f}"


def numbers(text: str, root: Path = ROOT) -> list[tuple[str, str, str]]:
    """Every checked number of `text`: (quoted, what the results give, expression)."""
    ns = Numbers(root).namespace()
    out = []
    for m in NUMBER.finditer(text):
        try:
            # the docs' own expressions (trusted as their runnable examples are); globals, so that a generator
            # expression inside sees the functions too
            value = eval(m["expr"], {"__builtins__": {}, **ns})
        except Exception as e:
            raise SystemExit(f"docs_blocks: checked number {m['num']} <!-- = {m['expr']} --> fails: "
                             f"{type(e).__name__}: {e}") from None
        out.append((m["num"], quote(value, m["num"]), m["expr"]))
    return out


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


def recorded(command: str) -> str:
    """``recorded FILE: COMMAND``: a console block of COMMAND and, as its output, the committed FILE verbatim (a
    measurement that depends on the machine, kept as it was recorded: the block cannot drift from the file)."""
    name, shown = command[len("recorded "):].split(": ", 1)
    return f"```console\n$ {shown}\n{(ROOT / name).read_text().rstrip()}\n```\n"


def options_table() -> str:
    """``options``: train.py's option reference, one list item per option, derived from the option declarations
    (`snnet.train.options.FLAG_OPTIONS`, the same fields the parser is derived from)."""
    from snnet.train.options import FLAG_OPTIONS
    from snnet.utils.options import GROUPS, flag_fields
    text = lambda t: str(t).replace("<", "&lt;").replace("*", "\\*")
    rows = []
    for _cls, field, flag in sorted(flag_fields(FLAG_OPTIONS), key=lambda x: GROUPS.index(x[2].group)):
        default = None if field.default is field.default_factory is dataclasses.MISSING else (
            field.default_factory() if field.default is dataclasses.MISSING else field.default)
        values = ", ".join(repr(c) for c in flag.choices) if flag.choices else (flag.rule or "").replace("_", "-")
        names = ", ".join(f"`{n}`" for n in flag.names) or f"`{flag.metavar}` (positional)"
        rows.append(f"* {names} (`{default!r}`{'; ' + text(values) if values else ''}): {text(flag.help)}")
    return "\n".join(rows) + "\n"


def render(text: str, root: Path = ROOT) -> str:
    """`text` with every generated region's block replaced by what its command prints now and every checked number
    by what its expression gives on the results under `root` (the blocks always read this checkout's)."""
    def block(m: re.Match) -> str:
        if m["cmd"].startswith("lines "):
            return f"<!-- generated: {m['cmd']} -->\n{lines(m['cmd'])}<!-- /generated -->\n"
        if m["cmd"].startswith("fenced "):  # ``fenced FILE FIRST LAST``: `lines`, in a plain code block
            return f"<!-- generated: {m['cmd']} -->\n```\n{lines(m['cmd'])}```\n<!-- /generated -->\n"
        if m["cmd"].startswith("recorded "):
            return f"<!-- generated: {m['cmd']} -->\n{recorded(m['cmd'])}<!-- /generated -->\n"
        if m["cmd"] == "options":  # train.py's option reference, from the declarations
            return f"<!-- generated: options -->\n{options_table()}<!-- /generated -->\n"
        return f"<!-- generated: {m['cmd']} -->\n```console\n{run(m['cmd'])}```\n<!-- /generated -->\n"
    text = REGION.sub(block, text)
    fixed = iter(numbers(text, root))
    return NUMBER.sub(lambda m: f"{next(fixed)[1]}<!-- = {m['expr']} -->", text)


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
            stale += [f"{page.relative_to(ROOT)}: quoted {q}, the results give {v}: {e}"
                      for q, v, e in numbers(text) if q != v]
    if stale:
        print("docs_blocks: these generated blocks and checked numbers differ from what the committed results give; "
              "run `python tools/docs_blocks.py --write` (make docs-blocks):\n  " + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
