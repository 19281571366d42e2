"""Results files and what reads them: the reader (validation, torn lines), Pareto fronts and tables, selection by
budget (`snnet select`, `stitch_for`) and their refusals of bad files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import IMG, ROOT, assert_refused, run_cli

from snnet import cli
from snnet.results.pareto import front_table, infer_anchors, pareto_front, pareto_report
from snnet.results.records import ResultsError, ResultsFile, read_results
from snnet.results.select import BudgetError, model_img_size, stitch_for
from snnet.stitching.build import build_snnet
from snnet.stitching.config import parse_stitch_config
from snnet.stitching.cost import cost_table

# The first five lines of each SN-Net results file, verbatim (docs/snnet_compat.md, C31-C34)
SNNET_FILES = {
    "deit": """\
{"cfg_id": 0, "flops": 1258411200, "params": 5717416, "acc1": 70.56400227203369}
{"cfg_id": 1, "flops": 4608338304, "params": 22050664, "acc1": 79.46400268066407}
{"cfg_id": 2, "flops": 17582740224, "params": 86567656, "acc1": 81.93400259002685}
{"cfg_id": 3, "flops": 4696010496, "params": 22345960, "acc1": 79.01800220336914}
{"cfg_id": 4, "flops": 4316862720, "params": 20571496, "acc1": 79.05200247711181}
""",
    "swin": """\
{"cfg_id": 0, "flops": 4509194496, "params": 28288354, "acc1": 79.46400002197265}
{"cfg_id": 1, "flops": 8768534784, "params": 49606258, "acc1": 83.17200001220704}
{"cfg_id": 2, "flops": 15467826176, "params": 87768224, "acc1": 84.21000001464844}
{"cfg_id": 3, "flops": 8797436160, "params": 49615570, "acc1": 83.10400001464843}
{"cfg_id": 4, "flops": 15220458496, "params": 87692407, "acc1": 84.18000001464844}
""",
    "levit": """\
{"loss": 0.8239520951762966, "acc1": 79.63800263183593, "acc5": 94.53000249023438, "cfg_id": 0, "flops": 661663808}
{"loss": 0.7729868526602613, "acc1": 81.22200236328125, "acc5": 95.21800245117187, "cfg_id": 1, "flops": 1133412864}
{"loss": 0.8509775411294794, "acc1": 79.35200238769531, "acc5": 94.2600024609375, "cfg_id": 2, "flops": 1020918272}
{"loss": 0.792813112937856, "acc1": 80.72600254882812, "acc5": 94.92400262695313, "cfg_id": 3, "flops": 977741824}
{"loss": 0.7968292268585428, "acc1": 80.46600247558594, "acc5": 94.94800263671875, "cfg_id": 4, "flops": 934565376}
""",
    "r18_r50": """\
{"cfg_id": 0, "acc1": 68.322, "acc5": 88.106, "flops": 1819065856}
{"cfg_id": 1, "acc1": 77.016, "acc5": 92.858, "flops": 4111512576}
{"cfg_id": 2, "acc1": 77.468, "acc5": 93.16, "flops": 3755463680}
{"cfg_id": 3, "acc1": 76.772, "acc5": 92.64, "flops": 3767505920}
{"cfg_id": 4, "acc1": 76.286, "acc5": 92.362, "flops": 3547935744}
""",
    "r18_swin_ti": """\
{"cfg_id": 0, "acc1": 68.674, "acc5": 88.394, "flops": 1819065856}
{"cfg_id": 1, "acc1": 81.25, "acc5": 95.502, "flops": 4509194496}
{"cfg_id": 2, "acc1": 80.07, "acc5": 94.918, "flops": 4095543552}
{"cfg_id": 3, "acc1": 79.002, "acc5": 94.318, "flops": 3730713856}
{"cfg_id": 4, "acc1": 78.618, "acc5": 94.106, "flops": 3375768832}
""",
}
# Pareto fronts of those five lines, by hand (FLOPs ascending, strictly rising top-1), and the anchor counts
FIRST5_FRONT = {"deit": [0, 4, 1, 2], "swin": [0, 1, 4, 2], "levit": [0, 4, 3, 1], "r18_r50": [0, 4, 2],
                "r18_swin_ti": [0, 4, 3, 2, 1]}
ANCHORS = {"deit": 3, "swin": 3, "levit": 2, "r18_r50": 2, "r18_swin_ti": 2}
# docs/snnet_compat.md, C25: the fronts of the full files; where every cfg_id a full front excludes among 0..4 is
# dominated within the first five lines too, the five-line front is the full front restricted to 0..4
SPEC_FRONT = {"levit": [0, 7, 6, 5, 4, 3, 1], "r18_r50": [0, 9, 8, 6, 5, 4, 2], "r18_swin_ti": [0, 7, 6, 5, 4, 3, 2, 1]}



@pytest.fixture
def snnet_files(tmp_path):
    paths = {}
    for name, text in SNNET_FILES.items():
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(text)
    return paths



def dominated_free(records, cost="flops"):
    """Brute force: the records no other record beats (cheaper or as cheap, and more accurate or as accurate)."""
    front = []
    for r in records:
        if not any(s is not r and s[cost] <= r[cost] and s["acc1"] >= r["acc1"] and
                   (s[cost] < r[cost] or s["acc1"] > r["acc1"]) for s in records):
            front.append(r["cfg_id"])
    return sorted(front)


# --------------------------------------------------------------------------------------------------- pareto
@pytest.mark.parametrize("family", list(SNNET_FILES))
def test_snnet_result_files_first_lines(snnet_files, family):
    records = read_results(snnet_files[family])
    assert [r["cfg_id"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["cfg_id"] for r in pareto_front(records)] == FIRST5_FRONT[family]
    assert infer_anchors(records) == ANCHORS[family]
    if family in SPEC_FRONT:
        assert FIRST5_FRONT[family] == [c for c in SPEC_FRONT[family] if c <= 4]


def test_front_matches_brute_force_on_demo_results(monkeypatch):
    path = Path(ROOT) / "results" / "demo" / "stitches_res.txt"
    if not path.exists():
        pytest.skip("run `make demo` first")
    records = read_results(path)
    assert sorted(r["cfg_id"] for r in pareto_front(records)) == dominated_free(records)
    assert infer_anchors(records) == 3
    shipped = Path(ROOT) / "results" / "demo" / "pareto_flops.md"
    if shipped.exists():  # the demo's table is `snnet pareto --baselines`'s, and the committed one is up to date
        monkeypatch.chdir(ROOT)  # the demo runs from the repository root and names the file relative to it
        assert pareto_report(["results/demo/stitches_res.txt"], baselines=True).markdown == shipped.read_text()


def test_pareto_cli_several_files(snnet_files, tiny, tmp_path, capsys):
    out = tmp_path / "report"
    rc, stdout, err = run_cli(capsys, "pareto", snnet_files["levit"], snnet_files["r18_r50"], tiny.results,
                              "--out", out)
    assert rc == 0, err
    # SN-Net files have no routes: the inferred anchors are announced, ours are read from the routes
    assert err.count("note:") == 2 and "cfg 0..1" in err
    report = json.loads((out / "pareto_flops.json").read_text())
    fronts = {f["label"]: f["front"] for f in report["files"]}
    assert fronts["levit"] == [0, 4, 3, 1] and fronts["r18_r50"] == [0, 4, 2]
    assert sorted(fronts[tiny.root.name]) == dominated_free(tiny.records)
    assert [f["anchors"] for f in report["files"]] == [2, 2, 2]
    combined = [(r["source"], r["cfg_id"]) for r in report["combined_front"]]
    everything = [r for f in (snnet_files["levit"], snnet_files["r18_r50"], tiny.results) for r in read_results(f)]
    assert len(combined) == len(pareto_front(everything)) == len(dominated_free(everything))
    assert combined[0] == (tiny.root.name, 0)  # the tiny ViTs are the cheapest networks, LeViT the most accurate
    assert combined[-1] == ("levit", 1)
    assert (out / "pareto_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "pareto_flops.md").read_text()
    assert "| 2 | stitch | 1.021 | 79.35 | 94.26 |  |" in md  # every row in the file, the dominated cfg 2 unmarked
    assert "## combined" in stdout and "| levit | 1 | anchor 1 |" in stdout
    assert "| 2 | stitch |" not in stdout.split("## r18_r50")[0]  # stdout shows only the front


def test_pareto_anchors_override_and_params(snnet_files, tmp_path, capsys):
    rc, stdout, err = run_cli(capsys, "pareto", snnet_files["deit"], "--anchors", "1", "--by", "params")
    assert rc == 0 and "note:" not in err
    assert "| 1 | stitch |" in stdout and "| 0 | anchor 0 |" in stdout
    rc, _, err = run_cli(capsys, "pareto", snnet_files["levit"], "--by", "params", "--out", tmp_path / "x")
    assert_refused(rc, err, "'params'", "--by flops")
    assert not (tmp_path / "x").exists()


def test_every_tools_routes_name_their_anchors(tmp_path, capsys):
    """A stitch-train sweep (layer types in the links, anchors after the runs) and a search file (cut stitches): their
    anchors are found from the routes, `snnet pareto` names them, `snnet select` prints the route."""
    files = {"sweep": [(0, 500, 75.0, "w16[..b1] -(linear)-> w32[b2..]"), (1, 600, 77.0, "w16[..b1] -(lowrank "
                       "rank4)-> w32[b1..]"), (2, 100, 50.0, "w16"), (3, 800, 78.0, "w32")],
             "search": [(0, 100, 50.0, "deit"), (1, 900, 80.0, "rn18"),
                        (2, 400, 70.0, "deit[embed..blocks.0] -> rn18[layer2.0..head]")]}
    for name, rows in files.items():
        path = tmp_path / f"{name}.txt"
        path.write_text("".join(json.dumps({"cfg_id": c, "flops": f, "acc1": a, "route": r}) + "\n"
                                for c, f, a, r in rows))
        report = pareto_report([path])
        assert report.notes == [] and report.series[0][3] == 2  # no 'an SN-Net file' guess: the routes say
        anchors = [r for c, f, a, r in rows if "[" not in r]
        assert f"anchors: cfg {', '.join(str(c) for c, f, a, r in rows if '[' not in r)}" in report.text
        assert all(a in report.markdown for a in anchors)
        rc, out, err = run_cli(capsys, "select", path, "--max-flops", 450)  # the best within 450: its route
        assert rc == 0 and {"sweep": "route   w16\n", "search": f"route   {rows[-1][3]}\n"}[name] in out, (out, err)


def test_front_table_columns():
    recs = [{"cfg_id": 0, "flops": 2e9, "acc1": 70.0}, {"cfg_id": 1, "flops": 1e9, "acc1": 71.0}]
    table = front_table(recs, n_anchors=1)
    assert table.splitlines()[0] == "| cfg_id | route | GFLOPs | top-1 |"  # no empty params/top-5 columns
    assert table.splitlines()[2] == "| 1 | stitch | 1.000 | 71.00 |" and len(table.splitlines()) == 3


BAD_FILES = {
    "empty": (b"", "is empty"),
    "csv": (b"cfg_id,flops,acc1\n0,100,70.0\n1,200,75.0\n", "line 1 is not a JSON object"),
    "json_list": (b'[{"cfg_id": 0, "flops": 1, "acc1": 70.0}]\n', "line 1 is a JSON list"),
    "pretty_json_list": (b'[\n  {"cfg_id": 0, "flops": 1, "acc1": 70.0}\n]\n', "line 1 is not a JSON object"),
    "no_acc1": (b'{"cfg_id": 0, "flops": 1, "top1": 70.0}\n', "without cfg_id/acc1"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("command", ["pareto", "select"])
def test_foreign_results_files_refused(tmp_path, capsys, kind, command):
    data, reason = BAD_FILES[kind]
    path = tmp_path / f"{kind}.txt"
    path.write_bytes(data)
    extra = ["--out", tmp_path / "out"] if command == "pareto" else ["--max-flops", "1G"]
    rc, stdout, err = run_cli(capsys, command, path, *extra)
    assert_refused(rc, err, str(path), reason)
    assert stdout == "" and not (tmp_path / "out").exists()


def test_missing_results_file(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "pareto", tmp_path / "nope.txt")
    assert_refused(rc, err, "nope.txt", "does not exist")


# --------------------------------------------------------------------------------------------------- reading
LINES = [json.dumps({"cfg_id": c, "flops": 100 * (c + 1), "params": 10 * (c + 1), "acc1": 70.0 + c}) for c in range(3)]


def test_reader_drops_a_torn_last_line_only(tmp_path):
    torn = tmp_path / "torn.txt"
    torn.write_text("\n".join(LINES) + "\n" + '{"cfg_id": 3, "fl')  # an evaluation cut short mid-line
    assert [r["cfg_id"] for r in read_results(torn)] == [0, 1, 2]
    assert torn.read_text().endswith('"fl')  # reading never rewrites the file
    middle = tmp_path / "middle.txt"
    middle.write_text("\n".join([LINES[0], '{"cfg_id": 1, "fl', LINES[2]]) + "\n")
    with pytest.raises(ResultsError, match=r"middle.txt' line 2 is not a JSON object"):
        read_results(middle)
    (tmp_path / "stitches_res.txt").write_text("\n\n".join(LINES) + "\n\n")  # blank lines are skipped
    assert [r["cfg_id"] for r in read_results(tmp_path)] == [0, 1, 2]  # a folder means its stitches_res.txt
    only = tmp_path / "only.txt"
    only.write_text("cfg_id flops acc1")
    with pytest.raises(ResultsError, match="line 1 is not a JSON object"):
        read_results(only)


def test_reader_refuses_a_repeated_cfg_id(tmp_path, capsys):
    path = tmp_path / "twice.txt"
    path.write_text("\n".join([*LINES, LINES[1].replace("71.0", "75.0")]) + "\n")
    rc, out, err = run_cli(capsys, "select", path, "--max-flops", "1G")
    assert_refused(rc, err, "twice.txt", "line 4", "cfg_id 1 is also on line 2", "keep one")
    assert out == ""


@pytest.mark.parametrize("key, value", [("flops", -1), ("flops", float("inf")), ("params", float("nan")),
                                        ("params", "12"), ("acc1", 100.5), ("acc1", -0.5), ("acc1", float("nan")),
                                        ("acc5", 101), ("cfg_id", -1), ("cfg_id", 1.5), ("cfg_id", True),
                                        ("latency_ms_b1", -0.1)])
@pytest.mark.parametrize("command", ["pareto", "select"])
def test_reader_refuses_impossible_values(tmp_path, capsys, key, value, command):
    path = tmp_path / "bad.txt"
    bad = {**json.loads(LINES[1]), key: value}
    path.write_text("\n".join([LINES[0], json.dumps(bad), LINES[2]]) + "\n")  # json writes Infinity / NaN
    extra = ["--out", tmp_path / "out"] if command == "pareto" else ["--max-flops", "1G"]
    rc, out, err = run_cli(capsys, command, path, *extra)
    assert_refused(rc, err, "bad.txt", "line 2", f"{key} {value!r}")
    assert out == "" and not (tmp_path / "out").exists()


def test_evaluator_resume_uses_the_same_reader(tmp_path, caplog):
    path = tmp_path / "stitches_res.txt"
    stamp = {"checkpoint_sha256": "c", "config_sha256": "k"}
    lines = [json.dumps({**json.loads(line), **stamp}) for line in LINES]
    path.write_text("\n".join(lines) + "\n" + lines[2][:25])  # crash mid-write of a later stitch
    results = ResultsFile(path, "c", "k")
    with caplog.at_level("WARNING", logger="snnet"):
        assert sorted(results.completed()) == [0, 1, 2]
    assert "line 4 is incomplete" in caplog.text
    assert path.read_text() == "\n".join(lines) + "\n"  # the torn line is gone before anything is appended
    results.extend([{**json.loads(LINES[1]), "acc1": 80.0}, {"cfg_id": 3, "acc1": 60.0}])  # 1 redone, 3 added
    assert [(r["cfg_id"], r["acc1"]) for r in read_results(path)] == [(0, 70.0), (1, 80.0), (2, 72.0), (3, 60.0)]
    with pytest.raises(ResultsError, match="another checkpoint or config"):
        ResultsFile(path, "other", "k").completed()
    path.write_text("\n".join([lines[0], "not json", lines[1]]) + "\n")
    with pytest.raises(ResultsError, match="line 2 is not a JSON object"):
        results.completed()


# --------------------------------------------------------------------------------------------------- select
@pytest.mark.parametrize("text, value", [("5G", 5e9), ("20M", 2e7), ("750k", 7.5e5), ("4.5e9", 4.5e9),
                                         ("1.5 G", 1.5e9), ("300", 300.0), (".5K", 500.0)])
def test_parse_amount(text, value):
    assert cli.parse_amount(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["5X", "", "-1G", "G", "1e400", "5GG", "nan"])
def test_unparseable_budget(tiny, capsys, text):
    rc, stdout, err = run_cli(capsys, "select", tiny.results, f"--max-flops={text}")
    assert_refused(rc, err, "--max-flops", repr(text), "5G", *(["is negative"] if text.startswith("-") else []))
    assert stdout == ""


def test_select_best_within_budget(tiny, capsys):
    recs = tiny.records
    budget = sorted(r["flops"] for r in recs)[6]
    rc, out, _ = run_cli(capsys, "select", tiny.results, "--max-flops", budget, "--json")
    best = max((r for r in recs if r["flops"] <= budget), key=lambda r: r["acc1"])
    assert rc == 0 and json.loads(out)["cfg_id"] == best["cfg_id"]
    rc, out, _ = run_cli(capsys, "select", tiny.results, "--max-params", "12K")
    best = max((r for r in recs if r["params"] <= 12000), key=lambda r: r["acc1"])
    assert rc == 0 and out.startswith(f"cfg_id {best['cfg_id']}: best top-1 with params <= 12K")
    assert f"route   {best['route']}" in out and f"({best['flops']:,})" in out and f"({best['params']:,})" in out
    target = sorted(r["acc1"] for r in recs)[8]
    rc, out, _ = run_cli(capsys, "select", tiny.results, "--min-acc", target, "--json")
    cheapest = min((r for r in recs if r["acc1"] >= target), key=lambda r: r["flops"])
    assert rc == 0 and json.loads(out)["cfg_id"] == cheapest["cfg_id"]


def test_select_snnet_file(snnet_files, capsys):
    rc, out, _ = run_cli(capsys, "select", snnet_files["r18_r50"], "--max-flops", "3.6G")
    assert rc == 0 and out.startswith("cfg_id 4:")  # 76.286 at 3.548 G; cfg 2 (77.468) needs 3.755 G
    rc, out, _ = run_cli(capsys, "select", snnet_files["deit"], "--min-acc", "79")
    assert rc == 0 and out.startswith("cfg_id 4:")  # 79.052 at 4.317 G beats cfg 3 and 1 on FLOPs


def test_budget_nobody_meets_names_the_closest(tiny, snnet_files, capsys):
    cheapest = min(tiny.records, key=lambda r: r["flops"])
    rc, out, err = run_cli(capsys, "select", tiny.results, "--max-flops", "1K")
    line = assert_refused(rc, err, "flops <= 1K", f"closest is cfg_id {cheapest['cfg_id']}", "raise --max-flops")
    assert out == "" and line.startswith("snnet select: error:")
    rc, _, err = run_cli(capsys, "select", snnet_files["levit"], "--min-acc", "90")
    assert_refused(rc, err, "top-1 90", "closest is cfg_id 1", "lower --min-acc to at most 81.22")
    rc, _, err = run_cli(capsys, "select", snnet_files["levit"], "--min-acc", "0.78")
    assert_refused(rc, err, "'0.78' reads as a fraction", "--min-acc 78 (or 0.78% if")
    rc, _, err = run_cli(capsys, "select", snnet_files["levit"], "--max-params", "5M")
    assert_refused(rc, err, "no 'params'", "--max-flops")
    rc, _, err = run_cli(capsys, "select", tiny.results, "--max-latency-ms", "3")
    assert_refused(rc, err, "latency_ms_b1", "snnet latency")


def test_console_script_refuses_in_one_line(tiny):
    script = Path(sys.executable).parent / "snnet"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "snnet.cli"]
    proc = subprocess.run(cmd + ["select", str(tiny.results), "--max-flops", "5X"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "'5X'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_cli_reads_results_without_torch(snnet_files, tmp_path):
    """`snnet --help`, `pareto` and `select` on a results file import neither torch nor timm (--help took
    6.9 s, nearly all of it importing torch and timm at the top of snnet.cli); the commands that run a network
    import them when they run."""
    code = ("import sys; from snnet.cli import main, build_parser; build_parser().format_help(); "
            f"assert main(['select', {str(snnet_files['deit'])!r}, '--min-acc', '79']) == 0; "
            f"assert main(['pareto', {str(snnet_files['deit'])!r}, '--out', {str(tmp_path / 'front')!r}]) == 0; "
            "heavy = sorted(m for m in ('torch', 'timm', 'fvcore') if m in sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.slow  # fresh interpreters
def test_a_mistyped_path_is_refused_before_torch_is_imported(tmp_path):
    """The commands that load a network or read images (export, latency, serve, quickstart, similarity, search,
    shards, convert, stitch-train) refuse a checkpoint, export folder, stitch config, sweep, results file or data
    folder that is not there, or not a file or a folder as asked, in one line before they import torch and timm
    (seconds); the loaders give the same lines. quickstart's and stitch-train's own flags, convert's missing
    --trust, a folder quickstart cannot train on (no images, one class), export folders the results did not
    measure (or of one stitch twice), results of another checkpoint than the one served and a search or sweep
    --out with another tool's results are refused as early."""
    demo = Path(ROOT) / "results" / "demo"
    ckpt, res, nope = demo / "snnet.pth.tar", demo / "stitches_res.txt", tmp_path / "nope"
    import zipfile

    from PIL import Image
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:
        z.writestr("a/0.png", b"")
    anchors = ["--anchors", "resnet18", "resnet34", "--out", tmp_path / "o"]
    photos = tmp_path / "photos"  # a folder of images: quickstart's own flags are refused before it is read
    for c in "ab":
        (photos / c).mkdir(parents=True)
    one = tmp_path / "one" / "cat"  # a folder of one class
    one.mkdir(parents=True)
    for i in range(2):
        Image.new("L", (8, 8)).save(one / f"{i}.png")
    record = json.loads(res.read_text().splitlines()[3])  # export folders of cfg_id 3 (their specs: the check)
    for name, sha in (("x1", record["checkpoint_sha256"]), ("x2", record["checkpoint_sha256"]), ("other", "0" * 64)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"")
        (tmp_path / name / "model.json").write_text(json.dumps(
            {"format": "snnet-stitch", "format_version": 1, "cfg_id": 3, "route": record["route"], "params": 1,
             "source": {"checkpoint_sha256": sha}}))
    other = tmp_path / "other.txt"  # the demo's results, as if of another checkpoint
    other.write_text(res.read_text().replace(record["checkpoint_sha256"], "0" * 64))
    cases = [
        (["export", nope, "--cfg-id", "1", "--out", tmp_path / "e"], f"checkpoint '{nope}' does not exist; give"),
        (["export", tmp_path, "--cfg-id", "1", "--out", tmp_path / "e"], f"checkpoint '{tmp_path}' is a folder, "
         f"not a checkpoint file"),
        (["latency", ckpt, "--stitch_config", nope], f"stitch config '{nope}' does not exist"),
        (["latency", ckpt, "--results", nope], f"results file '{nope}' does not exist"),
        (["serve", nope, "--results", res, "--port", "1"], f"checkpoint '{nope}' does not exist"),
        (["serve", ckpt, "--results", nope, "--port", "1"], f"results file '{nope}' does not exist"),
        (["serve", "--exported", tmp_path, "--results", res, "--port", "1"], f"'{tmp_path}' is not an export folder"),
        (["serve", "--exported", tmp_path / "other", "--results", res, "--port", "1"],
         f"the checkpoint export folder '{tmp_path / 'other'}' was exported from is 0000000000000000..."),
        (["serve", ckpt, "--results", other, "--port", "1"], "checkpoint_sha256 0000000000000000..., checkpoint"),
        (["latency", ckpt, "--results", other], "holds results of another checkpoint (cfg_id 0: checkpoint_sha256 0"),
        (["serve", "--exported", tmp_path / "x1", tmp_path / "x2", "--results", res, "--port", "1"],
         f"'{tmp_path / 'x2'}' both hold cfg_id 3; give each stitch once"),
        (["quickstart", nope, "--out", tmp_path / "q"], f"DATA '{nope}' does not exist; give a folder of images"),
        (["quickstart", tmp_path / "photos.zip", "--out", tmp_path / "q"], "is a zip archive; unpack it (unzip "),
        (["quickstart", res, "--out", tmp_path / "q"], f"DATA '{res}' is a file, not a folder"),
        (["similarity", "--data", nope, *anchors], f"data folder '{nope}' does not exist; give the dataset root"),
        (["search", "--data", res, *anchors], f"data folder '{res}' is a file, not a folder"),
        (["search", "--data", photos, "--anchors", "resnet18", "resnet34", "--out", demo],  # a training run's folder
         f"--out '{demo}' holds a stitches_res.txt that no snnet search wrote"),
        (["shards", nope, tmp_path / "s"], f"image folder '{nope}' does not exist"),
        (["convert", nope, tmp_path / "c.pth.tar"], f"SN-Net checkpoint '{nope}' does not exist"),
        (["convert", res, tmp_path / "c.pth.tar"], "is not a file torch.save wrote"),
        (["convert", ckpt, tmp_path / "c.pth.tar"], "is a pickled file: converting it means trusting"),
        (["quickstart", photos, "--out", tmp_path / "q", "--seed", "-1"], "--seed -1 is outside 0.."),
        (["quickstart", photos, "--out", tmp_path / "q", "--widths", "8", "4"], "--widths 8 4: give 2 or more"),
        (["quickstart", photos, "--out", tmp_path / "q", "--anchors", "resnet18"], "stitches at least 2 anchors"),
        (["quickstart", photos, "--out", tmp_path / "q", "--stitch-stages", "0"], "--stitch-stages 0: the CNN"),
        (["quickstart", photos, "--out", photos / "a"], "is inside DATA"),
        (["quickstart", photos, "--out", tmp_path / "q"], "has no class sub-folders with images"),
        (["quickstart", one.parent, "--out", tmp_path / "q"], "holds one class, 'cat': a classifier needs at least 2"),
        (["stitch-train", "--sweep", nope], f"sweep file '{nope}' does not exist"),
        (["stitch-train", nope, "--front", "resnet18", "--end", "resnet34", "--cut", "1", "--out", tmp_path / "st"],
         f"data folder '{nope}' does not exist"),
        (["stitch-train", photos, "--front", "resnet18", "--end", "resnet34", "--cut", "1", "--out", tmp_path / "st",
          "--max-parallel", "2"], "--sbatch and --max-parallel are options of --submit"),
        (["stitch-train", photos, "--front", "resnet18", "--end", "resnet34", "--cut", "1", "--out", demo],
         f"--out '{demo}' holds a stitches_res.txt that no stitch-train sweep wrote"),
    ]
    code = ("import contextlib, io, json, sys; from snnet.cli import main\n"
            "for argv, words in json.loads(sys.argv[1]):\n"
            "    with contextlib.redirect_stderr(io.StringIO()) as err:\n"
            "        code = main(argv)\n"
            "    lines = err.getvalue().splitlines()\n"
            "    assert code == 2 and len(lines) == 1 and words in lines[0], (argv, code, lines)\n"
            "heavy = sorted(m for m in ('torch', 'timm') if m in sys.modules)\n"
            "assert not heavy, heavy")
    cases_json = json.dumps([[[str(a) for a in argv], words] for argv, words in cases])
    proc = subprocess.run([sys.executable, "-c", code, cases_json], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("e", "q", "s", "st", "c.pth.tar")]


# --------------------------------------------------------------------------------------------------- switching
def test_stitch_for_switches_without_reallocating(tiny):
    net = tiny.net
    before = {n: (p.data_ptr(), p.shape) for n, p in net.named_parameters()}
    flops = [r["flops"] for r in tiny.records]
    budget = sorted(flops)[7]
    c = stitch_for(net, max_flops=budget)  # no results: the most expensive route that fits, at the net's 16x16
    assert flops[c] == max(f for f in flops if f <= budget)
    c = stitch_for(net, tiny.records, max_flops=budget)
    assert c == max((r for r in tiny.records if r["flops"] <= budget), key=lambda r: r["acc1"])["cfg_id"]
    c = stitch_for(net, tiny.records, max_params=12000)
    assert c == max((r for r in tiny.records if r["params"] <= 12000), key=lambda r: r["acc1"])["cfg_id"]
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        for budget in sorted(flops) + sorted(flops, reverse=True):
            net(x, stitch_for(net, tiny.records, max_flops=budget))
    assert {n: (p.data_ptr(), p.shape) for n, p in net.named_parameters()} == before
    with pytest.raises(BudgetError, match="closest is cfg_id 0.*raise max_flops"):
        stitch_for(net, max_flops=1)
    with pytest.raises(ResultsError, match="cfg_id 3"):
        stitch_for(net, [{**tiny.records[3], "route": "another SN-Net's route"}])
    with pytest.raises(ResultsError, match="cfg_id 99"):
        stitch_for(net, [{**tiny.records[3], "cfg_id": 99}])


def test_stitch_for_and_select_agree(tiny, tmp_path, capsys):
    """The same records and budget give the same cfg_id, ties included (accuracies rounded into ties here)."""
    records = [{**r, "acc1": float(50 + r["cfg_id"] % 3)} for r in tiny.records]
    path = tmp_path / "ties.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    for flag, key, kwarg in (("--max-flops", "flops", "max_flops"), ("--max-params", "params", "max_params")):
        for budget in sorted({r[key] for r in records}):
            rc, out, err = run_cli(capsys, "select", path, flag, budget, "--json")
            assert rc == 0, err
            chosen = json.loads(out)["cfg_id"]
            assert stitch_for(tiny.net, records, **{kwarg: budget}) == chosen, (flag, budget)
            fit = [r for r in records if r[key] <= budget]
            best = max(r["acc1"] for r in fit)  # the rule: top-1, then fewer FLOPs, params, lower cfg_id
            expect = min((r for r in fit if r["acc1"] == best), key=lambda r: (r["flops"], r["params"], r["cfg_id"]))
            assert chosen == expect["cfg_id"], (flag, budget)


def test_stitch_for_defaults_to_the_models_image_size():
    raw = {"anchors": [{"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 8, "depth": 2,
                                                                         "embed_dim": w, "num_heads": 2}}
                       for w in (8, 16)]}
    torch.manual_seed(0)
    net = build_snnet(parse_stitch_config(raw), pretrained=False, num_classes=10, img_size=32).eval()
    assert model_img_size(net) == (32, 32)
    flops = [cost_table(net, 32).route_flops(r) for r in net.routes]
    for budget in sorted(flops):  # FLOPs at 32x32 (this ViT cannot even run at timm's default 224)
        c = stitch_for(net, max_flops=budget)
        assert c == stitch_for(net, max_flops=budget, img_size=32)
        assert flops[c] == max(f for f in flops if f <= budget)


# --------------------------------------------------------------------------------------------------- never trust input
@pytest.mark.parametrize("command", ["pareto", "select"])
def test_top1_of_250_refused(tmp_path, capsys, command):
    path = tmp_path / "bad.txt"
    path.write_text("\n".join([LINES[0], json.dumps({**json.loads(LINES[1]), "acc1": 250}), LINES[2]]) + "\n")
    extra = ["--out", tmp_path / "out"] if command == "pareto" else ["--max-flops", "1G"]
    rc, out, err = run_cli(capsys, command, path, *extra)
    assert_refused(rc, err, "bad.txt", "line 2", "acc1 250", "percent")
    assert out == "" and not (tmp_path / "out").exists()


def test_a_later_duplicate_never_removes_an_anchor(snnet_files, tmp_path, capsys):
    path = tmp_path / "dup.txt"
    text = SNNET_FILES["deit"] + '{"cfg_id": 0, "flops": 1258411200, "params": 5717416, "acc1": 10.0}\n'
    path.write_text(text)
    for argv in (["pareto", path, "--out", tmp_path / "out"], ["select", path, "--max-flops", "2G"]):
        rc, out, err = run_cli(capsys, *argv)
        assert_refused(rc, err, "dup.txt", "line 6", "cfg_id 0 is also on line 1", "keep one")
        assert out == "" and not (tmp_path / "out").exists()
    assert path.read_text() == text


def _partial(tmp_path, key, missing):
    path = tmp_path / "partial.txt"
    recs = [json.loads(line) for line in LINES] + [{"cfg_id": 3, "flops": 50, "params": 5, "acc1": 99.0}]
    for r in recs:
        r["latency_ms_b1"] = 1.0 + r["cfg_id"]
        if r["cfg_id"] in missing:
            del r[key]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.parametrize("key, by, select_flag", [("flops", "flops", ["--max-flops", "1G"]),
                                                  ("flops", "flops", ["--min-acc", "50"]),
                                                  ("params", "params", ["--max-params", "1G"]),
                                                  ("latency_ms_b1", "latency", ["--max-latency-ms", "100"])])
def test_records_without_the_ranked_cost_refused(tmp_path, capsys, key, by, select_flag):
    # cfg 3 (the cheapest and best) lacks the cost: ranking the others would silently drop it from the front
    path = _partial(tmp_path, key, {1, 3})
    text = path.read_text()
    rc, out, err = run_cli(capsys, "pareto", path, "--by", by, "--out", tmp_path / "out")
    line = assert_refused(rc, err, "partial.txt", f"no '{key}' for cfg_id 1, 3", "2 of 4")
    assert out == "" and not (tmp_path / "out").exists()
    if by == "latency":
        assert "snnet latency" in line
    rc, out, err = run_cli(capsys, "select", path, *select_flag)
    assert_refused(rc, err, "partial.txt", f"no '{key}' for cfg_id 1, 3")
    assert out == "" and path.read_text() == text


def test_results_folder_without_results_file(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    for argv in (["pareto", tmp_path / "run", "--out", tmp_path / "out"], ["select", tmp_path / "run", "--max-flops",
                                                                            "1G"]):
        rc, out, err = run_cli(capsys, *argv)
        assert_refused(rc, err, str(tmp_path / "run" / "stitches_res.txt"), "does not exist", "train.py --eval")
        assert out == "" and not (tmp_path / "out").exists()


def test_pareto_unwritable_out(tiny, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    for out in (blocker, blocker / "sub"):
        rc, stdout, err = run_cli(capsys, "pareto", tiny.results, "--out", out)
        assert_refused(rc, err, str(blocker), "--out")
        assert stdout == ""
    assert blocker.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]




def _stamped(ckpt="a" * 64, cfg="c" * 64, samples=360, size=(16, 16), ids=(0, 1, 2)):
    return [{**json.loads(LINES[i]), "checkpoint_sha256": ckpt, "config_sha256": cfg, "samples": samples,
             "img_size": list(size)} for i in ids]


@pytest.mark.parametrize("key, other, what", [("checkpoint_sha256", "b" * 64, "mixes checkpoints"),
                                              ("config_sha256", "d" * 64, "mixes stitch configs"),
                                              ("samples", 200, "mixes numbers of evaluated images"),
                                              ("checkpoint_sha256", None, "mixes checkpoints")])
@pytest.mark.parametrize("command", ["pareto", "select", "report"])
def test_one_file_of_two_evaluations_refused(tmp_path, capsys, key, other, what, command):
    """Two evaluations concatenated into one file (disjoint cfg_ids, so the repeat check cannot see it): its front
    would rank numbers never measured together."""
    records = _stamped()
    records[2] = {**records[2], key: other}
    path = tmp_path / "mixed.txt"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    extra = {"pareto": ["--out", tmp_path / "out"], "select": ["--max-flops", "1G"],
             "report": ["--out", tmp_path / "out" / "r.html"]}[command]
    rc, out, err = run_cli(capsys, command, path, *extra)
    assert_refused(rc, err, "mixed.txt", what, "cfg_id 0", "cfg_id 2", "one front needs one evaluation")
    assert out == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["pareto", "report"])
def test_files_of_different_evaluation_sets_not_combined(tmp_path, capsys, command):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(json.dumps(r) + "\n" for r in _stamped()))
    b.write_text("".join(json.dumps(r) + "\n" for r in _stamped(ckpt="b" * 64, samples=500)))
    out_flag = ["--out", tmp_path / "out"] if command == "pareto" else ["--out", tmp_path / "out" / "r.html"]
    rc, out, err = run_cli(capsys, command, a, b, *out_flag)
    assert_refused(rc, err, "different numbers of images", "'a': 360", "'b': 500", "same validation split")
    assert not (tmp_path / "out").exists()


def test_files_at_different_image_sizes_combined_with_a_note(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(json.dumps(r) + "\n" for r in _stamped()))
    b.write_text("".join(json.dumps(r) + "\n" for r in _stamped(ckpt="b" * 64, size=(24, 24))))
    rc, out, err = run_cli(capsys, "pareto", a, b, "--out", tmp_path / "out")
    assert rc == 0, err
    assert "combined front mixes image sizes ('a': 16x16, 'b': 24x24)" in err
    assert "## combined" in out


def test_a_files_sha256_is_read_once_per_version(tmp_path, monkeypatch):
    """A command's early check and its loader ask for the same checkpoint's sha256: the second is the first's; a
    file replaced (a rename, as the project writes) or rewritten is hashed again."""
    import hashlib

    from snnet.results import records
    path = tmp_path / "ckpt"
    path.write_bytes(b"one")
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    first = records.file_sha256(path)
    assert records.file_sha256(str(path)) == first == hashlib.sha256(b"one").hexdigest()
    assert opened.count(str(path)) == 1
    (tmp_path / "new").write_bytes(b"two")
    (tmp_path / "new").replace(path)
    assert records.file_sha256(path) == hashlib.sha256(b"two").hexdigest()
    path.write_bytes(b"three, longer")
    assert records.file_sha256(path) == hashlib.sha256(b"three, longer").hexdigest()
