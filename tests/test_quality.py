"""Front-quality metrics (snnet/results/quality.py) on hand-made fronts whose values are worked out by hand."""
import json
import sys

import pytest
from helpers import FAST, run

from snnet.results.quality import area_under_front, front_quality, hypervolume, mean_gap
from snnet.results.records import ResultsError

# a staircase: three front points and one dominated point (cost normalised, top-1 %)
STAIRS = [(0.25, 50.0), (0.5, 70.0), (0.6, 60.0), (1.0, 80.0)]


def test_hypervolume_of_a_known_staircase():
    # widths to the next front point (the last to the reference cost 1.1) times heights above top-1 0
    assert hypervolume(STAIRS) == pytest.approx(0.25 * 50 + 0.5 * 70 + 0.1 * 80)  # 55.5
    assert hypervolume(STAIRS, ref=(1.0, 40.0)) == pytest.approx(0.25 * 10 + 0.5 * 30)
    assert hypervolume([(0.2, 90.0)]) == pytest.approx(0.9 * 90)
    assert hypervolume([(1.2, 99.0)]) == 0.0  # beyond the reference cost: dominates nothing inside the box
    assert hypervolume([]) == 0.0
    # adding a dominated point changes nothing; improving a front point raises it by width x gain
    assert hypervolume(STAIRS + [(0.9, 65.0)]) == pytest.approx(55.5)
    assert hypervolume([(0.25, 50.0), (0.5, 72.0), (1.0, 80.0)]) == pytest.approx(55.5 + 0.5 * 2)


def test_area_under_front_and_mean_gap():
    # trapezoids 0.25..0.5 (50 -> 70) and 0.5..1.0 (70 -> 80), divided by the width 0.75
    assert area_under_front(STAIRS, 0.25, 1.0) == pytest.approx((0.25 * 60 + 0.5 * 75) / 0.75)  # 70
    assert area_under_front([(0.5, 60.0)], 0.0, 1.0) == pytest.approx(30.0)  # nothing affordable below 0.5
    # only (0.6, 60) is off the front, 10 points below the best at its cost
    assert mean_gap(STAIRS) == pytest.approx(10 / 4)
    assert mean_gap([(0.1, 10.0), (0.2, 20.0)]) == 0.0


def records(accs, flops=(25, 50, 60, 100)):
    return [{"cfg_id": i, "flops": f * 1e7, "acc1": a} for i, (f, a) in enumerate(zip(flops, accs))]


def test_front_quality_normalises_by_the_largest_anchor_and_measures_drift():
    after = records([50, 70, 60, 80])
    before = records([52, 0, 0, 79])  # only the anchors' lines matter
    q = front_quality(after, anchors=[0, 3], before=before)
    assert q["ref_cost"] == 1e9 and q["stitches"] == 4 and q["front"] == 3
    assert q["hypervolume"] == pytest.approx(55.5) and q["area"] == pytest.approx(70.0)
    assert q["drift_per_anchor"] == {0: -2.0, 3: 1.0} and q["anchor_drift"] == pytest.approx(-0.5)
    with pytest.raises(ResultsError, match="no line for anchor cfg_id \\[3\\]"):
        front_quality(after, anchors=[0, 3], before=before[:1])


@pytest.mark.slow
def test_snnet_pareto_prints_front_quality(tmp_path):
    def write(name, accs):
        recs = [{**r, "route": "a" if r["cfg_id"] in (0, 3) else "a -> b"} for r in records(accs)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
        return tmp_path / name
    a, b, pre = write("a.txt", [50, 70, 60, 80]), write("b.txt", [50, 72, 60, 78]), write("pre.txt", [52, 0, 0, 79])
    r = run([sys.executable, "-m", "snnet.cli", "pareto", a, b, "--before", pre, "--out", tmp_path / "o"])
    assert r.returncode == 0, r.stderr
    section = r.stdout.split("## front quality")[1].split("\n\n")[1]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines()[2:]}
    assert "| 55.500 |" in rows["a"] and "-0.500" in rows["a"]
    assert f"| {55.5 + 0.5 * 2 - 0.1 * 2:.3f} |" in rows["b"] and "-1.500" in rows["b"]
    data = json.loads((tmp_path / "o" / "pareto_flops.json").read_text())
    assert data["files"][0]["quality"]["hypervolume"] == pytest.approx(55.5)


@pytest.mark.slow
def test_val_stitches_all_logs_front_hypervolume_per_epoch(digits_folder, tiny_config, tmp_path):
    """--val-stitches all: every stitch validated after each epoch; summary.csv gets front_hv, and it is the
    hypervolume of the per-stitch top-1 it lists (with the FLOPs of the final results file)."""
    import csv

    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, "--epochs", "2",
             "--val-stitches", "all", "--output", tmp_path, "--experiment", "q"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "q" / "summary.csv")))
    final = [json.loads(line) for line in (tmp_path / "q" / "stitches_res.txt").read_text().splitlines()]
    assert len(rows) == 2 and all(f"eval_top1@{c}" in rows[0] for c in range(len(final)))
    last = [{"cfg_id": c["cfg_id"], "flops": c["flops"], "acc1": float(rows[-1][f"eval_top1@{c['cfg_id']}"])}
            for c in final]
    assert float(rows[-1]["eval_front_hv"]) == pytest.approx(front_quality(last, [0, 1])["hypervolume"], rel=1e-6)
    assert [rec["acc1"] for rec in final] == pytest.approx([float(rows[-1][f"eval_top1@{c}"]) for c in
                                                            range(len(final))])
