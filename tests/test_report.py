"""`snnet report`: the HTML page (in headless Chromium: the budget slider's choice is `snnet select`'s, hover and click
show a stitch and its route diagram), the route parser, the PNG's subtitle and front labels, and ``img_size`` in the
evaluator's records.

The browser tests need Chromium, its driver and the python package selenium (docs/report.md says how to install
them; `make test` tries to); without them they are skipped, naming what is missing.

The committed screenshot results/demo/report.png is taken by this file's own browser steps:
    .venv/bin/python tests/test_report.py --screenshot results/demo/report.png
"""
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import run_cli  # noqa: E402

from snnet.results.pareto import eval_subtitle, pareto_front, plot_series  # noqa: E402
from snnet.results.records import read_results  # noqa: E402
from snnet.results.report import parse_route, report_data  # noqa: E402
from snnet.stitching.plan import deit_plan, stagewise_plan, two_way_plan  # noqa: E402

DEMO = ROOT / "results" / "demo" / "stitches_res.txt"
DEMO_V2 = [ROOT / "results" / "demo_v2" / v / "stitches_res.txt" for v in ("v1", "v2")]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,920"]
SLIDER_STEPS = 1000  # the page's <input type=range> runs 0..1000


def ties_records():
    """Stitches whose ranking needs every tie-break: equal top-1 (fewer FLOPs wins), equal FLOPs (fewer params
    wins), identical costs (lower cfg_id wins); with a batch-1 latency for the latency axis."""
    a, b = "vit_a", "vit_b"
    rows = [  # cfg_id, flops, params, acc1, route
        (0, 100_000, 1_000, 50.0, a), (1, 10_000_000, 90_000, 90.0, b),
        (2, 1_000_000, 50_000, 70.0, f"{a}[..b0] -(0.0)-> {b}[b1..]"),
        (3, 500_000, 60_000, 70.0, f"{a}[..b1] -(0.1)-> {b}[b2..]"),
        (4, 500_000, 40_000, 70.0, f"{a}[..b2] -(0.2)-> {b}[b3..]"),
        (5, 500_000, 40_000, 70.0, f"{b}[..b0] -(1.0)-> {a}[b1..b1] -(0.1)-> {b}[b2..]"),
        (6, 3_000_000, 70_000, 80.0, f"{b}[..b1] -(1.1)-> {a}[b2..]"),
        (7, 250_000, 20_000, 60.0, f"{a}[..b0] -(0.0)-> {b}[b1..b2] -(1.2)-> {a}[b3..]")]
    return [{"cfg_id": c, "flops": f, "params": p, "acc1": acc, "acc5": 99.0, "route": route, "samples": 100,
             "img_size": [32, 32], "latency_ms_b1": round(0.05 + f / 4e6, 6)} for c, f, p, acc, route in rows]


cli_run = run_cli


def snnet_select(capsys, path, flag, budget):
    """`snnet select PATH <flag> BUDGET --json`'s cfg_id, or None when no stitch is within the budget (exit 2)."""
    rc, out, err = cli_run(capsys, "select", path, *flag.split(), budget, "--json")
    if rc == 2 and "no stitch" in err:
        return None
    assert rc == 0, err
    return json.loads(out)["cfg_id"]


# --------------------------------------------------------------------------------------------------- no browser
def test_parse_route_reads_every_route_the_plans_write():
    """Every route the enumerators make (plain, hierarchical, two-way), written by `Route.describe`, parses into
    its anchors in order, the stitching layers' addresses between them, and the first/last blocks."""
    names = ["small#0", "mid#1", "large#2"]
    plans = [(deit_plan(3, 4), False), (stagewise_plan([[2, 2, 6, 2], [2, 2, 18, 2]], [1, 2]), True),
             (two_way_plan(4, 8), False)]
    seen = 0
    for plan, hierarchical in plans:
        for route in plan.routes:
            text = route.describe(names, hierarchical)
            boxes = parse_route(text)
            assert boxes is not None, text
            segs = [b for b in boxes if b["kind"] == "anchor"]
            layers = [b["address"] for b in boxes if b["kind"] == "layer"]
            assert [b["kind"] for b in boxes] == ["anchor", "layer"] * len(route.stitches) + ["anchor"]
            if route.is_anchor:
                assert segs == [{"kind": "anchor", "name": names[route.anchors[0]], "first": "", "last": ""}]
                continue
            assert [s["name"] for s in segs] == [names[st.front] for st in route.stitches] + \
                [names[route.stitches[-1].end]]
            assert layers == [".".join(map(str, st.layer)) for st in route.stitches]
            where = (lambda st: f"s{st.stage}.") if hierarchical else (lambda st: "")
            assert segs[0]["first"] == "" and segs[-1]["last"] == ""
            for k, st in enumerate(route.stitches):
                assert segs[k]["last"] == f"{where(st)}b{st.j}" and segs[k + 1]["first"] == f"{where(st)}b{st.k}"
            seen += 1
    assert seen > 50
    for bad in ("a[..b1]", "a[..b1] -(0.0)->", "a b", "a[b1] -(0.0)-> b[b2..]", "a[..b1] => b[b2..]",
                "a[..b1] -(0.0)-> b[b2..] ->", None, 3):
        assert parse_route(bad) is None, bad


def test_one_parser_reads_every_tools_routes():
    """The routes of `snnet search` (Composition.describe: cut stitches ' -> ', unit names) and of `snnet
    stitch-train` (layer types in the link) parse with the same function `snnet pareto` and `snnet select` use."""
    from snnet.results import pareto, report, select
    from snnet.stitching.plan import Composition, Segment
    assert report.parse_route is pareto.parse_route and select.route_of is pareto.route_of
    units = [["embed", "blocks.0", "blocks.1", "head"], ["stem", "layer1.0", "layer2.0", "head"]]
    comp = Composition((Segment(0, 0, 1), Segment(1, 2, 3), ))
    text = comp.describe(["deit", "rn18"], units)
    assert text == "deit[embed..blocks.0] -> rn18[layer2.0..head]"
    assert parse_route(text) == [{"kind": "anchor", "name": "deit", "first": "embed", "last": "blocks.0"},
                                 {"kind": "layer", "address": ""},
                                 {"kind": "anchor", "name": "rn18", "first": "layer2.0", "last": "head"}]
    trained = parse_route("v8[..b1] -(linear kd-t2-a1)-> v16[b2..]")
    assert [b.get("address") or b["name"] for b in trained] == ["v8", "linear kd-t2-a1", "v16"]
    sweep = [{"cfg_id": 0, "route": "v8[..b1] -(lowrank-rank2)-> v16[b2..]", "flops": 5, "acc1": 1.0},
             {"cfg_id": 1, "route": "v8", "flops": 3, "acc1": 1.0}, {"cfg_id": 2, "route": "v16", "flops": 9,
                                                                     "acc1": 2.0}]
    assert pareto.infer_anchors(sweep) == 2 and [pareto.is_anchor(r) for r in sweep] == [False, True, True]
    assert [pareto.anchor_name(r) for r in sweep[1:]] == ["v8", "v16"]  # what the PNG writes beside the stars


def test_budget_steps_are_snnet_selects_choice(tmp_path, capsys):
    """The page's table: at every step (and just below the next) the choice is `snnet select`'s, ties included."""
    path = tmp_path / "ties.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in ties_records()))
    data, _ = report_data([path])
    assert [c["key"] for c in data["costs"]] == ["flops", "params", "latency_ms_b1"]
    flops = data["costs"][0]
    steps = flops["steps"][0]
    assert steps["at"] == sorted({r["flops"] for r in ties_records()})
    assert dict(zip(steps["at"], steps["pick"]))[1_000_000] == 4  # 3, 4, 5 tie with 2 on top-1; 4 wins them all
    for k, at in enumerate(steps["at"]):
        below_next = steps["at"][k + 1] - 1 if k + 1 < len(steps["at"]) else at * 2
        for budget in (at, below_next):
            assert snnet_select(capsys, path, "--max-flops", budget) == steps["pick"][k], budget
    assert snnet_select(capsys, path, "--max-flops", steps["at"][0] - 1) is None
    assert flops["fronts"] == [[r["cfg_id"] for r in pareto_front(ties_records())]]


def test_report_cli_writes_one_self_contained_page(tmp_path, capsys):
    out = tmp_path / "new" / "report.html"
    rc, stdout, err = cli_run(capsys, "report", *DEMO_V2, DEMO, "--out", out, "--title", "a <b> & c")
    assert rc == 0, err
    page = out.read_text()
    assert stdout.startswith(f"wrote {out}")
    # nothing to fetch: no external script, style, image, font or link; the only URL is SVG's namespace name
    assert re.findall(r"https?://[^\s\"')]+", page) == ["http://www.w3.org/2000/svg"]
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|@import|url\((?!#)", page)  # url(#arrow): in the page
    assert "<title>a &lt;b&gt; &amp; c</title>" in page
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S)[1])
    assert [f["label"] for f in data["files"]] == ["v1", "v2", "demo"]
    assert [len(f["records"]) for f in data["files"]] == [12, 15, 23]
    assert data["subtitle"].endswith("360 validation images")
    assert [c["key"] for c in data["costs"]] == ["flops", "params"] and len(data["costs"][0]["combined"]) > 2
    assert not any("sha256" in k for f in data["files"] for r in f["records"] for k in r)


def test_report_escapes_what_a_file_says(tmp_path, capsys):
    """A route or label that looks like markup stays data: it cannot close the script element."""
    recs = ties_records()
    recs[2]["route"] = "vit_a[..b0] -> </script><script>document.title='pwned'</script>"
    path = tmp_path / "evil.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    rc, _, err = cli_run(capsys, "report", path, "--out", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert rc == 0, err
    assert "</script><script>document" not in page and page.count("</script>") == 2
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page, re.S)[1])
    assert data["files"][0]["records"][2]["route"] == recs[2]["route"]
    assert data["files"][0]["records"][2]["boxes"] is None  # not a route: no diagram, said so on the page


def test_report_refusals(tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    levit = tmp_path / "levit.txt"
    levit.write_text('{"cfg_id": 0, "acc1": 79.6, "flops": 661663808}\n{"cfg_id": 1, "acc1": 81.2, "flops": 1e9}\n')
    cases = [(["report", DEMO, "--out", tmp_path / "dir"], ["is a folder", "report.html"]),
             (["report", tmp_path / "missing.txt", "--out", tmp_path / "a.html"], ["missing.txt", "does not exist"]),
             (["report", levit, "--by", "params", "--out", tmp_path / "b.html"], ["'params'", "--by flops"]),
             (["report", DEMO, "--by", "latency", "--out", tmp_path / "c.html"], ["latency_ms_b1", "snnet latency"]),
             (["report", DEMO, "--anchors", "0", "--out", tmp_path / "d.html"], ["--anchors 0", ">= 1"]),
             (["report", DEMO, "--out", levit / "e.html"], ["a file", "--out"]),
             # the results file itself as --out: it would be lost
             (["report", levit, "--out", levit], ["is not an .html file", "levit.html"]),
             (["report", DEMO, "--out", tmp_path / "r.png"], ["is not an .html file", "r.html", "snnet pareto"]),
             (["report", levit, "--out", tmp_path / "notes.html"], ["exists and is no HTML page", "report.html"])]
    (tmp_path / "notes.html").write_text("my notes")
    text = levit.read_text()
    for argv, needles in cases:
        rc, _, err = cli_run(capsys, *argv)
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (argv, err)
        assert all(n in lines[0] for n in needles), (needles, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "levit.txt", "notes.html"]  # no page written
    assert (tmp_path / "notes.html").read_text() == "my notes"
    assert levit.read_text() == text
    for _ in range(2):  # a page written before is replaced
        rc, _, err = cli_run(capsys, "report", levit, "--out", tmp_path / "r.html")
        assert rc == 0, err


def test_eval_subtitle():
    recs = ties_records()
    old = [{k: v for k, v in r.items() if k != "img_size"} for r in recs]
    assert eval_subtitle([("a", recs)]) == "32x32 images, 100 validation images"
    assert eval_subtitle([("a", old)]) == "100 validation images"  # older files: no size, no guess
    assert eval_subtitle([("a", old)], img_size=16) == "16x16 images, 100 validation images"
    assert eval_subtitle([("a", recs)], img_size=16) == "32x32 images, 100 validation images"  # the record wins
    assert eval_subtitle([("a", recs), ("b", old)]) == "a: 32x32 images, 100 validation images; b: 100 validation " \
                                                       "images"
    snnet = [{"cfg_id": 0, "acc1": 70.0, "flops": 1}]
    assert eval_subtitle([("a", snnet)]) == "" and eval_subtitle([("a", recs + snnet)]) == ""  # disagreeing: left out
    assert eval_subtitle([("a", [{**recs[0], "img_size": [16, 24]}])]) == "16x24 images, 100 validation images"


def test_pareto_png_has_subtitle_and_front_cfg_ids(tmp_path, monkeypatch):
    """The plot's texts: the subtitle, the anchors' names (their routes; 'anchor N' only for files without routes),
    the cfg_id of every other front stitch."""
    import snnet.results.pareto as pareto
    texts = {}

    def keep(fig, out_png):
        texts[str(out_png)] = [t.get_text() for t in fig.axes[0].texts] + [fig.axes[0].get_title()]
        import matplotlib.pyplot as plt
        plt.close(fig)

    monkeypatch.setattr(pareto, "save_figure", keep)
    recs = read_results(DEMO)
    plot_series([("demo", recs, 3)], tmp_path / "one.png", img_size=16)
    front = [r["cfg_id"] for r in pareto_front(recs)]
    got = texts[str(tmp_path / "one.png")]
    assert "16x16 images, 360 validation images" in got
    assert sorted(t for t in got if t.isdigit()) == sorted(str(c) for c in front if c > 2)
    names = [recs[a]["route"] for a in range(3)]  # one label per anchor, its route name (w16, w32, w64)
    assert sorted(t for t in got if t in names) == sorted(names) and len(set(names)) == 3
    assert not any(t.startswith("anchor ") for t in got)
    no_routes = [{k: v for k, v in r.items() if k != "route"} for r in recs]
    plot_series([("snnet", no_routes, 3)], tmp_path / "snnet.png")
    assert sorted(t for t in texts[str(tmp_path / "snnet.png")] if t.startswith("anchor ")) == \
        ["anchor 0", "anchor 1", "anchor 2"]
    plot_series([("v1", read_results(DEMO_V2[0]), 2), ("v2", read_results(DEMO_V2[1]), 2)], tmp_path / "two.png")
    assert "16x16 images, 360 validation images" in texts[str(tmp_path / "two.png")]  # both files' records say it
    # the two files' anchors (the same two checkpoints) are named apart, not drawn on one spot
    v1 = [r["route"] for r in read_results(DEMO_V2[0])[:2]]
    assert sorted(t for t in texts[str(tmp_path / "two.png")] if t.endswith(("(v1)", "(v2)"))) == \
        sorted(f"{n} ({v})" for v in ("v1", "v2") for n in v1)


@pytest.mark.slow
def test_evaluator_records_carry_the_image_size(tmp_path, digits_folder, tiny_config, capsys):
    """train.py --eval writes img_size; `snnet report` and the PNG's subtitle read it."""
    from helpers import FAST, run
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, "--eval", *FAST,
             "--output", tmp_path, "--experiment", "ev"])
    assert r.returncode == 0, r.stderr[-2000:]
    records = read_results(tmp_path / "ev" / "stitches_res.txt")
    assert {tuple(rec["img_size"]) for rec in records} == {(16, 16)} and len(records) == 12
    rc, _, err = cli_run(capsys, "report", tmp_path / "ev", "--out", tmp_path / "r.html")
    assert rc == 0, err
    assert "16x16 images, 60 validation images" in (tmp_path / "r.html").read_text()


# --------------------------------------------------------------------------------------------------- the browser
def browser_paths():
    """(chromium, chromedriver), or pytest.skip naming what is missing and how to install it."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("browser test skipped: the python package selenium is not installed (pip install -r "
                    "requirements-browser.txt; docs/report.md)")
    found = []
    for env, names in (("SNNET_CHROMIUM", ("chromium", "chromium-browser")), ("SNNET_CHROMEDRIVER", ("chromedriver",))):
        if os.environ.get(env):
            path = os.environ[env]
            if not os.access(path, os.X_OK):
                pytest.skip(f"browser test skipped: {env}={path} is not an executable file (docs/report.md)")
        else:
            path = next((shutil.which(n) for n in names if shutil.which(n)), None) or \
                next((f"/usr/bin/{n}" for n in names if os.access(f"/usr/bin/{n}", os.X_OK)), None)
        if not path:
            pytest.skip(f"browser test skipped: no {names[0]} found (apt-get install chromium chromium-driver, or "
                        f"set {env}; docs/report.md)")
        found.append(path)
    return found


def start_browser(chromium, chromedriver, profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's driver manager: never download anything
    return webdriver.Chrome(service=Service(chromedriver), options=options)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, chromedriver = browser_paths()
    driver = start_browser(chromium, chromedriver, tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def open_page(driver, path):
    from selenium.webdriver.support.ui import WebDriverWait
    driver.get(Path(path).resolve().as_uri())
    WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []  # no script error


def by_id(driver, name):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.ID, name)


def slide_to(driver, pos):
    """The slider to position `pos` with the keyboard, as a person would: Home or End, Page Up/Down (a tenth of the
    range), then the arrow keys."""
    from selenium.webdriver.common.keys import Keys
    slider = by_id(driver, "budget")
    back = SLIDER_STEPS - pos
    if pos // 100 + pos % 100 <= back // 100 + back % 100:
        slider.send_keys(Keys.HOME + Keys.PAGE_UP * (pos // 100) + Keys.ARROW_RIGHT * (pos % 100))
    else:
        slider.send_keys(Keys.END + Keys.PAGE_DOWN * (back // 100) + Keys.ARROW_LEFT * (back % 100))
    assert int(slider.get_attribute("value")) == pos


def drag_to(driver, fraction):
    """The slider's thumb dragged with the mouse to `fraction` of its width."""
    from selenium.webdriver.common.action_chains import ActionChains
    slider = by_id(driver, "budget")
    width = slider.size["width"]
    ActionChains(driver).click_and_hold(slider).move_to_element_with_offset(
        slider, int((fraction - 0.5) * width), 0).release().perform()


def shown(driver):
    """(budget as the page states it, cost key, {file index: highlighted cfg_id or None}, detailed cfg_id)."""
    value = by_id(driver, "budget-value")
    picks = driver.execute_script(
        "return Array.from(document.querySelectorAll('#picks tbody tr')).map(t => [+t.dataset.file, t.dataset.cfgId])")
    rings = driver.execute_script(
        "return Array.from(document.querySelectorAll('#rings .pick-ring')).map(c => [+c.dataset.file, "
        "+c.dataset.cfgId])")
    table = {f: (int(c) if c != "" else None) for f, c in picks}
    assert {f: c for f, c in rings} == {f: c for f, c in table.items() if c is not None}  # the plot marks them
    return value.get_attribute("data-budget"), value.get_attribute("data-cost"), table, \
        by_id(driver, "details").get_attribute("data-cfg-id")


def check_budgets(driver, capsys, files, flag, positions):
    """At each slider position, each file's highlighted stitch is `snnet select FILE <flag> BUDGET`'s."""
    seen = set()
    for pos in positions:
        if isinstance(pos, float):
            drag_to(driver, pos)
        else:
            slide_to(driver, pos)
        budget, _, picks, detailed = shown(driver)
        for i, path in enumerate(files):
            assert picks[i] == snnet_select(capsys, path, flag, budget), (pos, budget, path)
        if picks[0] is not None:
            assert detailed == str(picks[0])  # the details and the route follow the first file's choice
        seen.add(tuple(picks.values()))
    return seen


@pytest.mark.browser
def test_slider_choice_is_snnet_select(browser, tmp_path, capsys):
    """The demo's page and the v1/v2 overlay: at budgets all along the slider (keyboard and mouse), the stitch each
    file highlights is the one `snnet select --max-flops BUDGET` returns for that file."""
    page = tmp_path / "demo.html"
    assert cli_run(capsys, "report", DEMO, "--out", page)[0] == 0
    open_page(browser, page)
    positions = [0, 1, *above_front([DEMO]), 250, 700, 999, 1000, 0.3, 0.55, 0.8]
    seen = check_budgets(browser, capsys, [DEMO], "--max-flops", positions)
    assert seen == {(r["cfg_id"],) for r in pareto_front(read_results(DEMO))}  # each front stitch in turn
    overlay = tmp_path / "v1v2.html"
    assert cli_run(capsys, "report", *DEMO_V2, "--out", overlay)[0] == 0
    open_page(browser, overlay)
    seen = check_budgets(browser, capsys, DEMO_V2, "--max-flops", [0, *above_front(DEMO_V2), 500, 1000])
    for i, path in enumerate(DEMO_V2):
        assert {s[i] for s in seen} == {r["cfg_id"] for r in pareto_front(read_results(path))}


def above_front(paths):
    """Slider positions just above the FLOPs of each front stitch of the files (the slider is logarithmic between
    the cheapest and the most expensive stitch of all files)."""
    every = [read_results(p) for p in paths]
    low, high = min(r["flops"] for rs in every for r in rs), max(r["flops"] for rs in every for r in rs)
    return sorted({min(SLIDER_STEPS, math.ceil(SLIDER_STEPS * math.log(r["flops"] / low) / math.log(high / low)) + 1)
                   for rs in every for r in pareto_front(rs)})


@pytest.mark.browser
def test_slider_ties_and_other_costs(browser, tmp_path, capsys):
    """Every tie-break, and the params and latency axes (`--max-params`, `--max-latency-ms` budgets)."""
    from selenium.webdriver.support.ui import Select
    path = tmp_path / "ties.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in ties_records()))
    page = tmp_path / "ties.html"
    assert cli_run(capsys, "report", path, "--out", page)[0] == 0
    open_page(browser, page)
    positions = list(range(0, 1001, 50)) + [999]
    seen = check_budgets(browser, capsys, [path], "--max-flops", positions)
    assert (4,) in seen and (3,) not in seen and (5,) not in seen  # ties: fewer FLOPs, fewer params, lower cfg_id
    for name, flag, key in (("params", "--max-params", "params"),
                            ("latency @ b1 (ms)", "--latency-batch 1 --max-latency-ms", "latency_ms_b1")):
        Select(by_id(browser, "cost")).select_by_visible_text(name)
        check_budgets(browser, capsys, [path], flag, positions)
        assert shown(browser)[1] == key
        assert flag in by_id(browser, "command").text


@pytest.mark.browser
def test_hover_and_click_show_the_stitch_and_its_route(browser, tmp_path, capsys):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    page = tmp_path / "demo.html"
    assert cli_run(capsys, "report", DEMO, "--out", page)[0] == 0
    open_page(browser, page)
    recs = {r["cfg_id"]: r for r in read_results(DEMO)}
    names = [recs[a]["route"] for a in range(3)]
    tip = by_id(browser, "tip")
    assert not tip.is_displayed()
    for cfg in (9, 14, 0):
        point = browser.find_element(By.CSS_SELECTOR, f'#plot .pt[data-file="0"][data-cfg-id="{cfg}"]')
        ActionChains(browser).move_to_element(point).perform()
        assert tip.is_displayed() and tip.get_attribute("data-cfg-id") == str(cfg)
        text = tip.text
        r = recs[cfg]
        for needle in (f"cfg_id {cfg}", r["route"], f"{r['flops']:,}", f"{r['params']:,}", f"top-1: {r['acc1']:.2f}%",
                       f"top-5 {r['acc5']:.2f}%", "360 images"):
            assert needle in text, (needle, text)
        ActionChains(browser).click(point).perform()
        details = by_id(browser, "details")
        assert details.get_attribute("data-cfg-id") == str(cfg) and details.get_attribute("data-how") == "clicked"
        assert f"cfg_id {cfg} of demo" in details.text and r["route"] in details.text
        diagram = by_id(browser, "route")
        assert diagram.get_attribute("data-route") == r["route"]
        segs = diagram.find_elements(By.CSS_SELECTOR, "g.seg")
        layers = diagram.find_elements(By.CSS_SELECTOR, "g.layer")
        boxes = parse_route(r["route"])
        assert [s.get_attribute("data-name") for s in segs] == [b["name"] for b in boxes if b["kind"] == "anchor"]
        assert [int(s.get_attribute("data-anchor")) for s in segs] == [names.index(b["name"]) for b in boxes
                                                                       if b["kind"] == "anchor"]
        assert [x.get_attribute("data-address") for x in layers] == [b["address"] for b in boxes
                                                                     if b["kind"] == "layer"]
        fills = {s.get_attribute("data-anchor"): s.find_element(By.TAG_NAME, "rect").get_attribute("fill")
                 for s in segs}
        assert len(set(fills.values())) == len(fills)  # one colour per anchor
    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()  # off the points
    assert not tip.is_displayed()
    slide_to(browser, 863)  # a budget again: the details and the diagram follow its choice
    budget, _, picks, detailed = shown(browser)
    assert detailed == str(picks[0]) == str(snnet_select(capsys, DEMO, "--max-flops", budget))
    assert by_id(browser, "route").get_attribute("data-route") == recs[picks[0]]["route"]
    assert by_id(browser, "details").get_attribute("data-how") == "best within the budget"


@pytest.mark.browser
def test_snnet_file_overlaid(browser, tmp_path, capsys):
    """An SN-Net file (no routes, anchors inferred) beside ours: its choices are `snnet select`'s too, its anchors
    get a diagram, its stitches say they have no route."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    snnet = tmp_path / "deit.txt"
    snnet.write_text("".join(json.dumps({"cfg_id": c, "flops": f, "params": f // 20, "acc1": a}) + "\n" for c, f, a in
                             ((0, 120_000, 55.0), (1, 9_000_000, 88.0), (2, 700_000, 75.0), (3, 2_000_000, 81.0))))
    ties = tmp_path / "ties.txt"
    ties.write_text("".join(json.dumps(r) + "\n" for r in ties_records()))
    page = tmp_path / "both.html"
    rc, _, err = cli_run(capsys, "report", ties, snnet, "--out", page)
    assert rc == 0 and "cfg 0..1 are taken as the anchors" in err, err
    open_page(browser, page)
    check_budgets(browser, capsys, [ties, snnet], "--max-flops", [0, 100, 333, 600, 900, 1000])
    for cfg, expect in ((2, "records no route"), (1, "anchor 1")):
        point = browser.find_element(By.CSS_SELECTOR, f'#plot .pt[data-file="1"][data-cfg-id="{cfg}"]')
        ActionChains(browser).click(point).perform()
        assert by_id(browser, "details").get_attribute("data-cfg-id") == str(cfg)
        assert expect in by_id(browser, "route").text


def many_records(n=160):
    """A crowded file: `n` stitches between two anchors, many of them on a dense front (labels must give way)."""
    import random
    rng = random.Random(0)
    rows = [{"cfg_id": 0, "flops": 1_000_000, "params": 1000, "acc1": 60.0, "route": "small"},
            {"cfg_id": 1, "flops": 50_000_000, "params": 9000, "acc1": 90.0, "route": "large"}]
    for c in range(2, n):
        f = int(1_000_000 * 50 ** rng.random())
        acc = 60 + 30 * math.log(f / 1e6) / math.log(50) - rng.random() * (8 if c % 3 else 0.3)
        rows.append({"cfg_id": c, "flops": f, "params": 1000 + f // 10_000, "acc1": round(acc, 3),
                     "route": f"small[..b{c % 12}] -({c % 12}.{c % 5})-> large[b{c % 12 + 1}..]"})
    return rows


def label_boxes(driver):
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#labels text')).map(t => {const b = t.getBBox(); "
        "return [b.x, b.y, b.width, b.height, t.textContent];})")


def no_overlap(boxes):
    for k, (x, y, w, h, _) in enumerate(boxes):
        for (x2, y2, w2, h2, _) in boxes[k + 1:]:
            if x < x2 + w2 and x2 < x + w and y < y2 + h2 and y2 < y + h:
                return False
    return True


@pytest.mark.browser
def test_crowded_plot_labels_zoom_and_table(browser, tmp_path, capsys):
    """Many stitches: the labels that are drawn never overlap (bounding boxes), the anchors are labelled by name and
    drawn above the stitches; the wheel zooms (the x axis changes, more labels fit), the log/linear switch changes
    the ticks, reset returns; a click on a table row selects that point, a click on a point selects that row."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    path = tmp_path / "crowded.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in many_records()))
    page = tmp_path / "crowded.html"
    assert cli_run(capsys, "report", path, "--out", page)[0] == 0
    open_page(browser, page)
    boxes = label_boxes(browser)
    texts = [b[4] for b in boxes]
    assert "small" in texts and "large" in texts and no_overlap(boxes)
    front = [r for r in pareto_front(many_records()) if r["route"] not in ("small", "large")]
    assert 0 < len(texts) - 2 < len(front)  # only as many as fit
    order = browser.execute_script("return Array.from(document.querySelectorAll('#plot .pt')).map(p => p.tagName)")
    first_star = order.index("path")
    assert all(t == "path" for t in order[first_star:]) and order.count("path") == 2  # stars after every dot
    plot = by_id(browser, "plot")
    assert plot.get_attribute("data-scale") == "log"  # costs span decades
    before = (float(plot.get_attribute("data-x0")), float(plot.get_attribute("data-x1")))
    ticks_before = browser.execute_script("return Array.from(document.querySelectorAll('#plot .xtick')).map(t => "
                                          "t.textContent)")
    browser.execute_script("const p = document.getElementById('plot'), b = p.getBoundingClientRect(); "
                           "for (let k = 0; k < 3; k++) p.dispatchEvent(new WheelEvent('wheel', {deltaY: -100, "
                           "clientX: b.left + b.width / 2, clientY: b.top + b.height / 2, bubbles: true, "
                           "cancelable: true}));")
    after = (float(plot.get_attribute("data-x0")), float(plot.get_attribute("data-x1")))
    assert before[0] < after[0] < after[1] < before[1]
    assert browser.execute_script("return Array.from(document.querySelectorAll('#plot .xtick')).map(t => "
                                  "t.textContent)") != ticks_before
    assert no_overlap(label_boxes(browser))
    by_id(browser, "reset").click()
    assert (float(plot.get_attribute("data-x0")), float(plot.get_attribute("data-x1"))) == before
    Select(by_id(browser, "xscale")).select_by_visible_text("linear")
    assert plot.get_attribute("data-scale") == "linear" and no_overlap(label_boxes(browser))
    # the table and the plot select the same stitch, both ways
    row = browser.find_element(By.CSS_SELECTOR, '#stitches tbody tr[data-cfg-id="37"]')
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", row)  # out of the sticky header's way
    row.click()
    details = by_id(browser, "details")
    assert details.get_attribute("data-cfg-id") == "37" and details.get_attribute("data-how") == "table"
    ring = browser.execute_script("const r = document.querySelector('#rings .sel-ring'); "
                                  "return [+r.getAttribute('cx'), +r.getAttribute('cy')]")
    point = browser.execute_script("const p = document.querySelector('#plot .pt[data-cfg-id=\"37\"]'); "
                                   "return [+p.getAttribute('cx'), +p.getAttribute('cy')]")
    assert ring == pytest.approx(point)
    assert "--cfg-id 37" in by_id(browser, "sel-command").text
    assert row.get_attribute("title") == many_records()[37]["route"]  # the route on the row's hover
    header = browser.find_element(By.CSS_SELECTOR, '#stitches th[data-key="acc1"]')
    header.click()
    accs = [float(x) for x in browser.execute_script(
        "return Array.from(document.querySelectorAll('#stitches tbody tr')).map(t => t.children[3].textContent)")]
    assert accs == sorted(accs)
    header.click()
    top = browser.find_element(By.CSS_SELECTOR, "#stitches tbody tr")
    assert top.get_attribute("data-cfg-id") == "1"  # descending: the large anchor first
    browser.execute_script("document.querySelector('#plot .pt[data-cfg-id=\"5\"]')"
                           ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
    selected = browser.find_elements(By.CSS_SELECTOR, "#stitches tbody tr.sel")
    assert [s.get_attribute("data-cfg-id") for s in selected] == ["5"] and details.get_attribute("data-cfg-id") == "5"


@pytest.mark.browser
def test_search_and_stitch_train_files_draw_their_routes(browser, tmp_path, capsys):
    """A search file (cut stitches between unit names) and a stitch-train sweep file (a layer type in the link),
    overlaid: each stitch's diagram has its anchors and links; the command lines name the chosen stitch's own file;
    two anchors at one point are both named on hover."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    search = [{"cfg_id": 0, "flops": 100, "acc1": 50.0, "route": "deit"},
              {"cfg_id": 1, "flops": 900, "acc1": 80.0, "route": "rn18"},
              {"cfg_id": 2, "flops": 400, "acc1": 70.0, "route": "deit[embed..blocks.0] -> rn18[layer2.0..head]"}]
    sweep = [{"cfg_id": 0, "flops": 500, "acc1": 75.0, "route": "v8[..b1] -(lowrank rank4)-> v16[b2..]"},
             {"cfg_id": 1, "flops": 100, "acc1": 50.0, "route": "v8"},
             {"cfg_id": 2, "flops": 800, "acc1": 78.0, "route": "v16"}]
    paths = []
    for name, rows in (("search", search), ("sweep", sweep)):
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name / "stitches_res.txt")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = tmp_path / "both.html"
    rc, _, err = cli_run(capsys, "report", *paths, "--out", page)
    assert rc == 0 and "no routes" not in err, err
    open_page(browser, page)
    for f, names, layers in ((0, ["deit", "rn18"], [""]), (1, ["v8", "v16"], ["lowrank rank4"])):
        cfg = 2 if f == 0 else 0
        browser.execute_script(f"document.querySelector('#plot .pt[data-file=\"{f}\"][data-cfg-id=\"{cfg}\"]')"
                               ".dispatchEvent(new MouseEvent('click', {bubbles: true}))")
        diagram = by_id(browser, "route")
        assert "records no route" not in diagram.text
        assert [s.get_attribute("data-name") for s in diagram.find_elements(By.CSS_SELECTOR, "g.seg")] == names
        assert [x.get_attribute("data-address") for x in diagram.find_elements(By.CSS_SELECTOR, "g.layer")] == layers
        assert str(paths[f]) in by_id(browser, "sel-command").text and str(paths[f]) in by_id(browser, "command").text
        assert str(paths[1 - f]) not in by_id(browser, "command").text
    browser.find_element(By.CSS_SELECTOR, '#picks tbody tr[data-file="0"]').click()
    assert str(paths[0]) in by_id(browser, "command").text  # the row's own file
    star = browser.find_element(By.CSS_SELECTOR, '#plot .pt[data-file="1"][data-cfg-id="1"]')
    ActionChains(browser).move_to_element(star).perform()
    tip = by_id(browser, "tip")
    assert "also here: search cfg_id 0 (deit)" in tip.text
    tb, pb = tip.rect, by_id(browser, "plot").rect
    assert pb["x"] <= tb["x"] and tb["x"] + tb["width"] <= pb["x"] + pb["width"] + 1  # inside the plot


# --------------------------------------------------------------------------------------------------- screenshot
def screenshot(out, page=ROOT / "results" / "demo" / "report.html", budget_pos=863, hover=(0, 9)):
    """The committed results/demo/report.png: the demo's page, the slider at ~2.8 MFLOPs (its choice, details and
    route shown), the mouse over a stitch (its tooltip shown)."""
    chromium, chromedriver = browser_paths()  # first: says what is missing
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    from snnet.utils.fileio import atomic_path
    with tempfile.TemporaryDirectory() as profile:
        driver = start_browser(chromium, chromedriver, profile)
        try:
            open_page(driver, page)
            slide_to(driver, budget_pos)
            point = driver.find_element(By.CSS_SELECTOR, f'#plot .pt[data-file="{hover[0]}"][data-cfg-id="{hover[1]}"]')
            ActionChains(driver).move_to_element(point).perform()
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
    with atomic_path(out) as tmp:
        Path(tmp).write_bytes(png)
    return Path(out)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="take the report screenshot with this file's browser steps")
    p.add_argument("--screenshot", required=True, metavar="PNG", help="e.g. results/demo/report.png")
    p.add_argument("--page", default=str(ROOT / "results" / "demo" / "report.html"), help="the report to open")
    args = p.parse_args()
    try:
        print(f"wrote {screenshot(args.screenshot, args.page)}")
    except pytest.skip.Exception as e:
        sys.exit(str(e))
