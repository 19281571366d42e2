"""The README and the documentation site: the README stays short, the site builds strictly (a broken link fails),
every number in a generated block is what the committed results give (tools/docs_blocks.py), and every example
marked runnable runs.

A runnable example is a fenced ``python`` block preceded by the line ``<!-- runnable -->``; with
``<!-- runnable, output checked -->`` what it prints must also be the ``text`` block that follows it (for output
that depends only on committed files). The blocks of one page run in order in one namespace (as a reader pastes
them), from a folder laid out like the repository after `make demo`: configs/ and results/ of this checkout (with
the demo's trained SN-Net, results/demo/snnet.pth.tar), output/demo/digits/ the demo's digits (snnet.demo writes
them: 1,437 training and 360 validation images), and output/deploy/cfg9 the export of the committed SN-Net's cfg 9
(the deployment guide's step 3), so no example needs the demo's minutes and the deployment guide's top-1 is the
committed one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

ROOT = Path(ROOT)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"^<!-- runnable(?P<checked>, output checked)? -->\n```python\n(?P<code>.*?)^```\n"
                      r"(?:```text\n(?P<output>.*?)^```\n)?", re.M | re.S)
sys.path.insert(0, str(ROOT / "tools"))
import docs_blocks  # noqa: E402  (tools/ is not a package)


def runnable(page: Path) -> list[re.Match]:
    return list(RUNNABLE.finditer(page.read_text()))


def test_readme_is_short_and_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 120
    assert "make demo" in text and "make test" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), "CI must run exactly the README's test command"


#: the most words README.md and docs/*.md may hold together (`cat README.md docs/*.md | wc -w`)
WORDS = 25_000
DATE = re.compile(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]")


def test_docs_are_read_in_minutes():
    """README + docs within WORDS words (counted as `wc -w` counts them); dated runs on one page at most (the
    results page), never in a guide."""
    words = sum(len(page.read_text().split()) for page in PAGES)
    assert words <= WORDS, f"README.md + docs/*.md hold {words:,} words, over {WORDS:,}: say less"
    dated = [page.name for page in PAGES if DATE.search(page.read_text())]
    assert len(dated) <= 1, f"dates on {dated}: keep dated runs on the results page only"
    assert set(dated) <= {"results.md"}, f"dates on {dated}: only docs/results.md may carry them"


@pytest.mark.slow
def test_generated_blocks_match_the_committed_results():
    """tools/docs_blocks.py --check: every generated console block is what its command prints on the committed
    results; a retyped or stale number fails here."""
    assert docs_blocks.REGION.search((ROOT / "docs" / "deploy.md").read_text()), "no generated block found"
    assert docs_blocks.main(["--check"]) == 0


def test_a_changed_number_is_caught(tmp_path):
    """The checker itself: a region whose number was edited by hand differs from what its command prints."""
    page = (ROOT / "README.md").read_text()
    m = docs_blocks.REGION.search(page)
    assert m is not None
    edited = page.replace(m["body"], m["body"].replace("top-1", "top-1 ", 1))
    assert docs_blocks.render(edited) != edited and docs_blocks.render(page) == page
    perf = (ROOT / "docs" / "results.md").read_text()  # a benchmark output quoted with `lines`
    assert "<!-- generated: lines results/bench_train_step.txt" in perf
    edited = perf.replace("| 0.9679 |", "| 0.9670 |", 1)
    assert edited != perf and docs_blocks.render(edited) == perf


@pytest.mark.slow
def test_a_changed_prose_number_is_caught(tmp_path):
    """Checked numbers in prose (``90.56<!-- = acc1("demo", 9) -->``): a number edited by hand is rewritten, and a
    changed result changes the number the page must quote, so --check fails until the page is regenerated."""
    page = (ROOT / "docs" / "deploy.md").read_text()
    records = [json.loads(ln) for ln in (ROOT / "results" / "demo" / "stitches_res.txt").read_text().splitlines()]
    value = f"{records[9]['acc1']:.2f}"  # what the page quotes for cfg 9, two decimals
    quoted = f'{value}<!-- = acc1("demo", 9) -->'
    assert quoted in page and docs_blocks.render(page) == page
    typo = f"{float(value) + 0.1:.2f}"
    edited = page.replace(quoted, quoted.replace(value, typo))
    assert docs_blocks.render(edited) == page
    assert (typo, value, 'acc1("demo", 9)') in docs_blocks.numbers(edited)
    # the same page against results where cfg 9 reached 50.00 %: the quoted value is now wrong
    demo = tmp_path / "results" / "demo"
    demo.mkdir(parents=True)
    shutil.copy(ROOT / "results" / "demo" / "stitches_pred.npz", demo)
    records[9]["acc1"] = 50.0
    (demo / "stitches_res.txt").write_text("".join(json.dumps(r) + "\n" for r in records))
    for other in (ROOT / "results").iterdir():  # the page may quote the other results too, unchanged
        if other.name != "demo":
            (tmp_path / "results" / other.name).symlink_to(other)
    assert (value, "50.00", 'acc1("demo", 9)') in docs_blocks.numbers(page, tmp_path)
    assert '50.00<!-- = acc1("demo", 9) -->' in docs_blocks.render(page, tmp_path)


def test_docs_site_builds_strictly(tmp_path):
    """mkdocs build --strict: a link to a missing page, anchor or repository file fails the build."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    assert (site / "python_api.html").is_file()
    assert (site / "repo" / "results" / "demo" / "pareto_flops.png").is_file()
    # the README and the family READMEs are pages of the site, rendered, their links to guides working
    readme = (site / "repo" / "index.html").read_text()  # mkdocs serves a README.md as its folder's index
    assert '<h1 id="snnet-stitchable-neural-networks-over-timm">' in readme and 'href="../own_data.html"' in readme
    assert 'href="stitching_deit/index.html"' in readme
    for family in ("stitching_deit", "stitching_swin", "stitching_resnet_swin", "stitching_levit"):
        assert "<h1" in (site / "repo" / family / "index.html").read_text(), family


def test_home_links_every_page():
    """Home (docs/index.md) links the README and every page of the site's navigation."""
    import yaml

    def pages(node):
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for item in node for p in pages(item)]
        return [p for value in node.values() for p in pages(value)]
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    home = (ROOT / "docs" / "index.md").read_text()
    linked = {"repo/" + t[3:] if t.startswith("../") else t
              for t in re.findall(r"\]\(([^)#\s]+)", home)}
    missing = [p for p in pages(nav) if p != "index.md" and p not in linked]
    assert not missing, f"docs/index.md does not link {missing}"
    assert set(pages(nav)) >= {f"repo/{p}" for p in ("README.md", "snnet/README.md")} | {
        p.name for p in (ROOT / "docs").glob("*.md")}, "a guide or README missing from mkdocs.yml's nav"


def test_the_code_names_only_guides_that_exist():
    """A docstring or comment that sends the reader to docs/<page>.md names a page the repository has (the site's
    link check covers the pages themselves, not the code)."""
    files = []
    for folder, subs, names in os.walk(ROOT):  # not the hidden folders (.venv) nor what runs and builds write
        subs[:] = [d for d in subs if not d.startswith(".") and d not in ("output", "node_modules", "site")]
        files += [Path(folder, n) for n in names if n.endswith((".py", ".sh", ".sbatch")) or n == "Makefile"]
    named = {(f.relative_to(ROOT).as_posix(), page) for f in files
             for page in re.findall(r"\bdocs/([\w-]+\.md)", f.read_text())}
    assert named, "no code names a guide: the pattern is wrong"
    missing = sorted((f, page) for f, page in named if not (ROOT / "docs" / page).is_file() and "no_such" not in page)
    assert not missing, f"code names guides that do not exist: {missing}"


def test_docs_site_refuses_a_broken_link(tmp_path):
    site = tmp_path / "src"
    shutil.copytree(ROOT / "docs", site / "docs")
    shutil.copytree(ROOT / "tools", site / "tools")
    shutil.copy(ROOT / "mkdocs.yml", site / "mkdocs.yml")
    for readme in ["README.md", *[str(p.relative_to(ROOT)) for p in ROOT.glob("*/README.md")],
                   "results/stitch_anything/README.md"]:
        (site / readme).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / readme, site / readme)
    (site / "results" / "demo").symlink_to(ROOT / "results" / "demo")
    with open(site / "docs" / "gpu.md", "a") as f:
        f.write("\n[a missing page](no_such_page.md) and [a missing file](../results/no_such.png)\n")
    with open(site / "stitching_deit" / "README.md", "a") as f:  # a README's own links are checked too
        f.write("\n[a missing guide](../docs/no_such_guide.md)\n")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=site,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no_such_page.md" in done.stderr and "no_such.png" in done.stderr and "no_such_guide.md" in done.stderr


@pytest.fixture
def demo_layout(tmp_path_factory):
    """A folder laid out like the repository after `make demo` (see the module docstring)."""
    import snnet
    from snnet.demo import write_digits
    root = tmp_path_factory.mktemp("readme")
    (root / "configs").symlink_to(ROOT / "configs")
    (root / "results").symlink_to(ROOT / "results")
    write_digits(root / "output" / "demo")  # the demo's own split, so the committed SN-Net's top-1 is reproduced
    snnet.export(ROOT / "results" / "demo" / "snnet.pth.tar", 9, root / "output" / "deploy" / "cfg9",
                 ROOT / "configs" / "demo_digits.json", formats=["onnx"])
    return root


RUNNABLE_PAGES = [p for p in PAGES if runnable(p)]


@pytest.mark.slow  # the demo layout: ~10-20 s (an SN-Net, its checkpoint and an ONNX export), built once here
def test_runnable_examples(demo_layout, capsys):
    """Every block marked runnable runs, page by page (blocks of a page in order, one namespace), from the demo
    layout. One test for all pages, so that the layout is built once whatever the pytest-xdist split."""
    assert [p.name for p in RUNNABLE_PAGES][:1] == ["README.md"] and len(RUNNABLE_PAGES) >= 3
    cwd = os.getcwd()
    os.chdir(demo_layout)
    try:
        for page in RUNNABLE_PAGES:
            namespace: dict = {"__name__": f"example_{page.stem}"}
            for i, block in enumerate(runnable(page)):
                capsys.readouterr()
                exec(compile(block["code"], f"{page.name} runnable block {i + 1}", "exec"), namespace)
                printed = capsys.readouterr().out
                if block["checked"]:
                    assert block["output"] is not None, f"{page.name} block {i + 1}: no text block to check"
                    assert printed == block["output"], f"{page.name} block {i + 1} printed:\n{printed}"
    finally:
        os.chdir(cwd)


#: pages whose every result number in prose is a checked number (docs_blocks' NUMBER markers)
AUDITED = ["deploy.md", "front_quality.md", "performance.md", "results.md", "serving.md", "stitch_anything.md"]


def unmarked_numbers(text: str) -> list[str]:
    """Numbers that look like results (2+ decimals, or a percentage) in the prose of `text`: outside code, generated
    regions and inline code, and not followed by a checked-number marker."""
    text = docs_blocks.REGION.sub("", text)
    text = re.sub(r"^```.*?^```\n", "", text, flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"<!-- = .*? -->", "\x00", text, flags=re.S)
    return re.findall(r"(?<![\w.\-])(\d+\.\d{2,}|\d+(?:\.\d+)? ?%)(?![\x00\w])", text)


@pytest.mark.parametrize("name", AUDITED)
def test_audited_pages_quote_only_checked_numbers(name):
    """On the audited pages a result number typed by hand (not generated, not a checked number) fails."""
    assert unmarked_numbers((ROOT / "docs" / name).read_text()) == []


def test_an_unchecked_number_is_found():
    assert (unmarked_numbers("the w16 anchor reaches 83.06 % and cfg 9 0.68 MFLOPs, 95 % of budgets")
            == ["83.06", "0.68", "95 %"])
    assert unmarked_numbers('83.06<!-- = acc1("demo", 0) --> % at 0.68<!-- = mflops("demo", 9) --> MFLOPs') == []


EXAMPLE = re.compile(r"^<!-- example (?:not run: (?P<why>.{10,})|runs in: (?P<file>tests/\w+\.py)::(?P<test>\w+)) -->$")


def test_every_shell_example_runs_or_says_why():
    """Every shell, console or plain code block of the README and the docs that is not generated (generated ones run
    in test_generated_blocks_match_the_committed_results) is preceded by ``<!-- example runs in: TEST -->``, naming
    a test that exists, or ``<!-- example not run: REASON -->``."""
    unmarked = []
    for page in PAGES:
        text = docs_blocks.REGION.sub("", page.read_text())
        lines, inside = text.split("\n"), False
        for i, line in enumerate(lines):
            fence = re.match(r"^```(\w*)\s*$", line)
            if not fence:
                continue
            if not inside and fence[1] in ("", "bash", "console", "sh", "shell"):
                m = EXAMPLE.match(lines[i - 1]) if i else None
                if m is None:
                    unmarked.append(f"{page.name}:{lines[i + 1][:60]}")
                elif m["file"]:
                    assert f"def {m['test']}(" in (ROOT / m["file"]).read_text(), (
                        f"{page.name}: no {m['file']}::{m['test']}")
            inside = not inside
    assert not unmarked, "shell examples neither run nor saying why:\n" + "\n".join(unmarked)


def test_every_page_with_python_marks_it_runnable_or_says_why():
    """Every Python block of the README and the docs is marked runnable (so it runs above), but the listed ones."""
    not_runnable = {"own_data.md": 1}  # runs in test_own_data_guide_runs, on the export that guide's commands make
    for page in PAGES:
        text = page.read_text()
        blocks = len(re.findall(r"^```python\n", text, re.M))
        marked = len(runnable(page))
        allowed = not_runnable.get(page.name, 0)
        assert blocks - marked <= allowed, f"{page.name}: {blocks - marked} Python blocks not marked runnable"


def quick_tour() -> list[str]:
    """The commands of the README's quick tour (its first bash block after '## A quick tour'), comments removed."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^## A quick tour\n.*?^```bash\n(?P<body>.*?)^```\n", text, re.M | re.S)
    assert block is not None, "README.md has no bash block under '## A quick tour'"
    return [re.sub(r"\s+#.*$", "", ln).strip() for ln in block["body"].splitlines() if ln.strip()]


@pytest.mark.slow  # ~8-10 s CPU: one SN-Net trained for an epoch, evaluated, exported, timed, reported
def test_readme_quick_tour_runs(digits_folder, tiny_config, tmp_path):
    """The README's quick tour, command by command, on a tiny stand-in. What the test substitutes, and only that:

    * the data, /data/imagenet -> a folder of 220 real digits (16x16; no ImageNet here);
    * the config, configs/deit_ti_s_b.json -> two tiny DeiTs of widths 8 and 16 (12 networks; DeiT-Ti/S/B take
      minutes per step on a CPU), with train.py's flags of a quick CPU run (helpers.FAST: --no-pretrained (no
      weights can be downloaded), 16 px, batch 16, one seed) and --epochs 1;
    * the launcher, ./distributed_train.sh N -> train.py's entry point in one process (helpers.shared_cli; torchrun
      of N processes is tested in test_train/test_ddp);
    * the placeholders: <experiment> -> the run's --experiment name, <ckpt> -> its last.pth.tar; --cfg-id 42 ->
      --cfg-id 5 (the tiny SN-Net has 12 networks); snnet latency gets --warmup 1 --repeats 2 (timing is not tested
      here).
    Every command must exit 0 and leave what the README says it does."""
    from helpers import FAST, shared_cli
    commands = quick_tour()
    assert [c.split()[0] for c in commands] == ["./distributed_train.sh"] * 3 + ["snnet"] * 5, commands
    experiment = "tour"
    subs = {"/data/imagenet": str(digits_folder), "configs/deit_ti_s_b.json": str(tiny_config),
            "<experiment>": experiment, "<ckpt>": f"output/train/{experiment}/last.pth.tar",
            "--cfg-id 42": "--cfg-id 5"}
    cli = shared_cli()
    for command in commands:
        for old, new in subs.items():
            command = command.replace(old, new)
        argv = command.split()
        if argv[0] == "./distributed_train.sh":
            entry, argv = "train", [*argv[2:], *FAST, "--epochs", "1", "--experiment", experiment]
        else:
            entry, argv = "snnet", argv[1:] + (["--warmup", "1", "--repeats", "2"] if argv[1] == "latency" else [])
        code, out, err = cli.call(entry, argv, cwd=tmp_path)
        assert code == 0, f"{command}\n{out}\n{err}"
        if "--dry-run" in argv:
            assert not (tmp_path / "output" / "train" / experiment / "last.pth.tar").exists(), "the dry run trained"
        elif argv[0] == "select":
            assert re.match(r"cfg_id \d+: best top-1 with flops <= 2G", out), out
    run = tmp_path / "output" / "train" / experiment
    records = [json.loads(ln) for ln in (run / "stitches_res.txt").read_text().splitlines()]
    assert len(records) == 12 and all("latency_ms_b1" in r for r in records)  # evaluated, then timed
    assert (tmp_path / "output" / "front" / "pareto_flops.png").is_file()
    assert json.loads((tmp_path / "output" / "cfg42" / "model.json").read_text())["cfg_id"] == 5
    assert (tmp_path / "output" / "report.html").stat().st_size > 0
    assert not (tmp_path / "report.html").exists()  # the tour's outputs go under output/, none beside the sources


def test_recorded_latency_matches_its_results_file():
    """The deployment guide's latency run is recorded (its times depend on the machine): its table must be the
    committed results file it updated (route and both medians of every cfg_id), and that file the committed demo
    results plus latencies (nothing else changed), measured on the committed SN-Net."""
    table = (ROOT / "results" / "demo_latency" / "latency.txt").read_text()
    assert re.match(r"latency on cpu: .+, 1 thread, 16x16 images, median of \d+ after \d+ warm-up calls\n", table)
    rows = re.findall(r"^\| (\d+) \| (.+?) \| ([\d.]+) \| ([\d.]+) \| [\d,]+ \|$", table, re.M)
    timed = {r["cfg_id"]: r for r in map(json.loads, (ROOT / "results" / "demo_latency" / "stitches_res.txt")
                                         .read_text().splitlines())}
    demo = {r["cfg_id"]: r for r in map(json.loads, (ROOT / "results" / "demo" / "stitches_res.txt")
                                        .read_text().splitlines())}
    assert [int(c) for c, *_ in rows] == sorted(timed) == sorted(demo)
    for c, route, b1, b32 in rows:
        rec = timed[int(c)]
        assert (route, b1, b32) == (rec["route"], f"{rec['latency_ms_b1']:.3f}", f"{rec['latency_ms_b32']:.3f}")
        assert {k: v for k, v in rec.items() if not k.startswith("latency_")} == demo[int(c)]
    assert f"updated {len(rows)} records of output/deploy/stitches_res.txt" in table


GUIDE_MARK = "<!-- example runs in: tests/test_docs.py::test_own_data_guide_runs -->"
PETS = ["cat", "dog", "fox"]


def guide_blocks(page: str = "own_data.md") -> dict[str, list[str]]:
    """docs/own_data.md's commands (the bash blocks marked as run by test_own_data_guide_runs, comments removed, in
    order), its stitch config (the json block) and its Python block."""
    text = (ROOT / "docs" / page).read_text()
    commands = []
    for m in re.finditer(re.escape(GUIDE_MARK) + r"\n```bash\n(?P<body>.*?)^```\n", text, re.M | re.S):
        commands += [re.sub(r"\s+#.*$", "", ln).strip() for ln in m["body"].splitlines() if ln.strip()]
    config = re.search(r"^```json\n(?P<body>.*?)^```\n", text, re.M | re.S)
    python = re.search(r"^```python\n(?P<body>.*?)^```\n", text, re.M | re.S)
    assert config is not None and python is not None
    return {"commands": commands, "config": [config["body"]], "python": [python["body"]]}


def _pets(root: Path) -> None:
    """3 classes of 16x16 PNGs (a colour per class, noise on top): 12 training and 4 validation images each."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(PETS):
        for split, n in (("train", 12), ("val", 4)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                px = np.clip(rng.normal(60 + 70 * c, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(folder / f"{k}.png")


@pytest.mark.slow  # ~15-25 s: an SN-Net trained for an epoch, evaluated twice, its front, one export
def test_own_data_guide_runs(tmp_path, capsys):
    """docs/own_data.md, command by command, on a generated dataset. What the test substitutes, and only that:

    * the data, data/pets -> 3 generated classes (cat, dog, fox) of 16x16 PNGs, 12 training and 4 validation each;
    * the stitch config: the guide's JSON is parsed by the config parser (so every field it shows is valid) and its
      anchors must be timm models; it is then written with the anchors two tiny DeiTs (widths 8 and 16; DeiT-Ti/S
      take minutes per step on a CPU) and the rest as the guide has it;
    * train.py gets helpers.FAST (--no-pretrained: nothing can be downloaded here; 16 px, batch 16, one seed),
      --epochs 1 and --stitch-init-bs 16 (36 training images); the launcher ./distributed_train.sh N -> train.py's
      entry point in one process (torchrun is tested in test_train/test_ddp);
    * snnet export gets --no-onnx (the ONNX check costs seconds; the quick tour's export writes it).
    The section 7 Python block then runs on the export: the class names of the folders come back as labels."""
    import timm
    from helpers import FAST, shared_cli

    from snnet.stitching.config import parse_stitch_config
    from snnet.utils.checkpoint import json_field, load_checkpoint
    guide = guide_blocks()
    commands = guide["commands"]
    assert [c.split()[:2] for c in commands] == [["snnet", "shards"], *[["./distributed_train.sh"] * 1 + [n] for n in
                                                                       ("2", "2", "1")],
                                                 ["snnet", "pareto"], ["snnet", "select"], ["snnet", "export"]]
    raw = json.loads(guide["config"][0])
    parse_stitch_config(raw, "docs/own_data.md's stitch config")
    assert all(timm.is_model(a) for a in raw["anchors"]), raw["anchors"]
    from helpers import TINY
    (tmp_path / "pets_stitch.json").write_text(json.dumps({**raw, "anchors": TINY}))
    _pets(tmp_path / "data" / "pets")
    cli = shared_cli()
    for command in commands:
        argv = command.split()
        if argv[0] == "./distributed_train.sh":
            entry, argv = "train", [*argv[2:], *FAST, "--epochs", "1", "--stitch-init-bs", "16"]
        else:
            entry, argv = "snnet", argv[1:] + (["--no-onnx"] if argv[1] == "export" else [])
        code, out, err = cli.call(entry, argv, cwd=tmp_path)
        assert code == 0, f"{command}\n{out}\n{err}"
        if "--dry-run" in argv:
            assert not (tmp_path / "output" / "train" / "pets").exists(), "the dry run trained"
    run = tmp_path / "output" / "train" / "pets"
    assert json_field(load_checkpoint(run / "last.pth.tar"), "args")["class_names"] == PETS
    assert json.loads((run / "stitches_res.classes.json").read_text())["class_names"] == PETS
    assert (tmp_path / "output" / "train" / "pets_eval" / "stitches_res.txt").is_file()
    assert (tmp_path / "output" / "pets_front" / "pareto_flops.png").is_file()
    assert json.loads((tmp_path / "output" / "pets_cfg3" / "model.json").read_text())["class_names"] == PETS
    assert (tmp_path / "data" / "pets_shards" / "pets" / "_info.json").is_file()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {"__name__": "example_own_data"}
        capsys.readouterr()
        exec(compile(guide["python"][0], "own_data.md python block", "exec"), namespace)
    finally:
        os.chdir(cwd)
    answer = namespace["answer"]
    assert answer["label"] == PETS[answer["class"]] and capsys.readouterr().out.startswith(f"{answer['class']} ")


def test_the_stitch_config_reference_is_current(monkeypatch):
    """docs/stitch_config.md is generated from snnet/stitching/config.py's field table: a field added, removed or
    reworded there without `python tools/config_reference.py --write` fails here."""
    import config_reference

    from snnet.stitching.config import ANCHOR_FIELDS, FIELDS, Field
    assert config_reference.main(["--check"]) == 0
    page = (ROOT / "docs" / "stitch_config.md").read_text()
    assert all(f"| `{name}` |" in page for name in [*FIELDS, *ANCHOR_FIELDS])
    monkeypatch.setattr(config_reference, "FIELDS", {**FIELDS, "new_field": Field((int,), 1, "a new field")})
    assert config_reference.main(["--check"]) == 1  # the parser learnt a field the page does not show
