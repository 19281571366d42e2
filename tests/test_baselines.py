"""Per-image predictions (the file beside stitches_res.txt) and the no-training baselines built from them: random
anchor mixing and a confidence cascade, beside the stitched front."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from helpers import FAST, ROOT, assert_refused, run, run_cli
from torch.utils.data import DataLoader, TensorDataset

from snnet.results.baselines import baselines, cascade_settings, mixing_line, score_setting, summary_table
from snnet.results.predictions import (
    Predictions,
    build_predictions,
    check_against,
    merge,
    predictions_path,
    read_predictions,
    record_sha256,
    write_predictions,
)
from snnet.results.quality import hypervolume, hypervolume_line, line_at, pareto_front
from snnet.results.records import ResultsError, write_results

STAMP = {"checkpoint_sha256": "c" * 64, "config_sha256": "f" * 64}


# ------------------------------------------------------------------------------------------------------ mixing
def test_mixing_line_is_the_upper_hull_of_the_anchors():
    # the middle anchor lies below the chord of the other two: mixing those two beats it, so it drops out
    assert mixing_line([(1, 50), (2, 60), (4, 90)]) == [(1, 50), (4, 90)]
    # above the chord it stays; an anchor more costly and less accurate than another is never mixed in
    assert mixing_line([(1, 50), (2, 80), (4, 90), (5, 85)]) == [(1, 50), (2, 80), (4, 90)]
    line = [(1, 50), (2, 80), (4, 90)]
    assert line_at(line, 0.5) == -math.inf
    assert line_at(line, 1.5) == pytest.approx(65)
    assert line_at(line, 3) == pytest.approx(85)
    assert line_at(line, 9) == 90


def test_line_hypervolume_is_the_limit_of_the_staircase_of_its_points():
    line = [(0.2, 50.0), (0.5, 80.0), (1.0, 90.0)]
    dense = [(x, line_at(line, x)) for x in np.linspace(0.2, 1.0, 20001)]
    exact = hypervolume_line(line)
    assert exact == pytest.approx(0.3 * 65 + 0.5 * 85 + 0.1 * 90)
    assert hypervolume(dense) == pytest.approx(exact, abs=2e-3)
    assert hypervolume(dense) < exact  # the staircase lies under the line
    assert hypervolume_line([(0.2, 50.0)]) == pytest.approx(hypervolume([(0.2, 50.0)]))


# ------------------------------------------------------------------------------------------------------ cascade
def _pred(probs, correct, flops_ids=(0, 1)):
    probs, correct = np.asarray(probs, np.float32), np.asarray(correct, bool)
    n = probs.shape[1]
    label = np.zeros(n, np.int16)
    top5 = np.where(correct[:, :, None], 0, 1).astype(np.int16).repeat(2, axis=2)
    return Predictions(np.arange(n), label, np.asarray(flops_ids, np.int32), top5, probs, correct,
                       {"record_sha256": {str(c): "" for c in flops_ids}})


def test_cascade_cost_counts_every_anchor_run_and_the_answer_is_the_last_one():
    # 4 images; the small anchor is sure of images 0 and 1 (right on 0, wrong on 1), the large one right on 1..3
    pred = _pred([[0.9, 0.8, 0.3, 0.2], [0.9, 0.9, 0.9, 0.9]], [[1, 0, 0, 0], [0, 1, 1, 1]])
    flops = {0: 10.0, 1: 40.0}
    by_t = {tuple(s["thresholds"]): s for s in cascade_settings(pred, [0, 1], flops)}
    s = next(v for k, v in by_t.items() if abs(k[0] - 0.8) < 1e-6)  # the small anchor answers images 0 and 1
    assert s["flops"] == pytest.approx(10 + 40 * 2 / 4)   # images 2 and 3 ran both anchors
    assert s["acc1"] == pytest.approx(100 * 3 / 4)        # 0 right (small), 1 wrong (small), 2, 3 right (large)
    never = by_t[(math.inf,)]
    assert never["flops"] == 50 and never["acc1"] == 75
    alone = cascade_settings(pred, [1], flops)
    assert alone == [{"chain": [1], "thresholds": [], "flops": 40.0, "acc1": 75.0}]
    front = pareto_front(cascade_settings(pred, [0], flops) + cascade_settings(pred, [0, 1], flops) + alone)
    # thresholds 0.3, 0.8, 0.9: 1, 2, 3 images go on to the large anchor; it is right on every image it sees
    assert [(f["flops"], f["acc1"]) for f in front] == [(10, 25), (20, 50), (30, 75), (40, 100)]


@pytest.fixture
def front_quality(monkeypatch):
    """benchmarks/front_quality.py: its held-out cascades and the SN-Net used as a cascade."""
    monkeypatch.syspath_prepend(f"{ROOT}/benchmarks")
    import front_quality
    return front_quality


def test_a_setting_chosen_on_some_images_is_scored_on_others(front_quality):
    pred = _pred([[0.9, 0.8, 0.3, 0.2], [0.9, 0.9, 0.9, 0.9]], [[1, 0, 0, 0], [0, 1, 1, 1]])
    flops = {0: 10.0, 1: 40.0}
    first = front_quality.on_images(pred, np.array([0, 1]))
    for s in cascade_settings(first, [0, 1], flops):  # on images 0 and 1, then scored on all four
        again = score_setting(first, s, flops)
        assert (again["flops"], again["acc1"]) == pytest.approx((s["flops"], s["acc1"]))
    s = next(s for s in cascade_settings(first, [0, 1], flops) if abs(s["thresholds"][0] - 0.8) < 1e-6)
    assert (s["flops"], s["acc1"]) == (10.0, 50.0)  # both images answered by the small anchor, image 0 right
    assert score_setting(pred, s, flops)["acc1"] == 75.0 and score_setting(pred, s, flops)["flops"] == 30.0


def test_network_cascade_may_hand_images_to_a_stitch(front_quality):
    # stitch 2 (20 FLOPs) is right on exactly the images the small anchor is unsure of: 0 > 2 is perfect at 15 FLOPs
    network_cascade = front_quality.network_cascade
    pred = _pred([[0.9, 0.9, 0.3, 0.2], [0.9] * 4, [0.9] * 4], [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]],
                 flops_ids=(0, 1, 2))
    recs = _records([50.0, 75.0, 50.0], [10, 40, 20])
    h = network_cascade(recs, pred, [0, 1])
    assert any(s["chain"] == [0, 2] and s["acc1"] == 100.0 and s["flops"] == 20.0 for s in h["cascade"])
    assert h["hypervolume"] > baselines(recs, [0, 1], pred)["hypervolume"]["cascade"]
    # the stitch begins with 5 FLOPs of the small anchor's: the images handed on pay only its other 15
    shared = lambda a, b: 5.0 if {a, b} == {0, 2} else 0.0
    h = network_cascade(recs, pred, [0, 1], shared=shared)
    assert any(s["chain"] == [0, 2] and s["acc1"] == 100.0 and s["flops"] == 17.5 for s in h["cascade"])
    s = next(s for s in h["cascade"] if s["chain"] == [0, 2] and s["acc1"] == 100.0)
    costs = front_quality.stage_costs([0, 2], {0: 10.0, 1: 40.0, 2: 20.0}, shared)
    assert costs == {0: 10.0, 2: 15.0} and score_setting(pred, s, costs)["flops"] == 17.5


def _records(accs, flops, anchors=2):
    recs = []
    for c, (a, f) in enumerate(zip(accs, flops)):
        route = f"net#{c}" if c < anchors else f"net#0[..b{c}] -(0.{c})-> net#1[b{c}..]"
        recs.append({"cfg_id": c, "flops": f, "params": 100 + c, "acc1": a, "acc5": 100.0, "loss": 1.0,
                     "route": route, "samples": 4, "img_size": [16, 16], **STAMP})
    return recs


def test_baselines_count_stitches_above_each_and_the_budgets_where_the_front_leads():
    pred = _pred([[0.9, 0.8, 0.3, 0.2], [0.9, 0.9, 0.9, 0.9]], [[1, 0, 0, 0], [0, 1, 1, 1]])
    # anchors: 25 % at 10 FLOPs, 75 % at 40; stitch 2: 50 % at 20 (the line gives 41.7 there, the cascade 50: not
    # above it) and stitch 3: 60 % at 35 (the line gives 66.7, the cascade 75 from 30 FLOPs on)
    recs = _records([25.0, 75.0, 50.0, 60.0], [10, 40, 20, 35])
    b = baselines(recs, [0, 1], pred)
    assert b["anchors"] == [0, 1] and b["stitches"] == 2
    assert b["above_mixing"] == 1 and b["above_cascade"] == 0
    assert b["mixing"] == [{"flops": 10.0, "acc1": 25.0}, {"flops": 40.0, "acc1": 75.0}]
    hv = b["hypervolume"]
    assert hv["mixing"] == pytest.approx(hypervolume_line([(0.25, 25), (1, 75)]))
    assert hv["cascade"] == pytest.approx(0.25 * 25 + 0.25 * 50 + 0.25 * 75 + 0.1 * 100)  # steps at 10/40 .. 40/40
    assert hv["cascade"] > hv["stitched"]
    assert 0 < b["ahead_of_mixing"] < 1


def test_intervals_over_resampled_images_show_which_stitches_clear_the_line_by_chance():
    # 200 images; right on: anchor 0 images 0-99, anchor 1 0-159; stitch 2 0-179 (above the line on every resample),
    # stitch 3 0-99 (never above: anchor 1 is right wherever anchor 0 is), stitch 4 0-129 at 25 FLOPs, the middle of
    # the line: (a0 + a1) / 2 exactly on these images, above it on about half the resamples
    n = 200
    right = [np.arange(n) < k for k in (100, 160, 180, 100, 130)]
    pred = _pred(np.full((5, n), 0.9), right, flops_ids=range(5))
    recs = _records([50.0, 80.0, 90.0, 50.0, 65.0], [10, 40, 20, 30, 25])
    b = baselines(recs, [0, 1], pred)
    assert b["above_mixing"] == 1 and b["interval"]["above_mixing"] == [1, 2]
    lo, hi = b["interval"]["ahead_of_mixing"]
    assert 0 < lo <= b["ahead_of_mixing"] <= hi <= 1
    assert baselines(recs, [0, 1], pred) == b  # seeded
    assert "| 1 of 3 (1-2) |" in summary_table([("x", b)])
    anchors_only = _pred(np.full((2, n), 0.9), right[:2])
    assert baselines(recs, [0, 1], anchors_only)["interval"] is None
    assert "| 1 of 3 |" in summary_table([("x", baselines(recs, [0, 1], anchors_only))])


# ------------------------------------------------------------------------------------------------------ the file
def _file(tmp_path, recs, pred_ids=(0, 1), probs=None, correct=None):
    res = tmp_path / "stitches_res.txt"
    write_results(res, recs)
    n = 4
    probs = probs if probs is not None else [[0.9, 0.8, 0.3, 0.2], [0.9, 0.9, 0.9, 0.9]]
    correct = correct if correct is not None else [[1, 0, 0, 0], [0, 1, 1, 1]]
    label = np.arange(n) % 3
    per = {}
    for k, c in enumerate(pred_ids):
        top = np.stack([np.where(np.asarray(correct[k], bool), label, (label + 1) % 3), (label + 2) % 3], 1)
        per[c] = (top, np.asarray(probs[k], np.float32))
    pred = build_predictions(np.arange(n), label, per, {r["cfg_id"]: r for r in recs}, 3)
    write_predictions(predictions_path(res), pred)
    return res


def test_predictions_file_round_trip_is_small_and_pickle_free(tmp_path):
    recs = _records([25.0, 75.0, 50.0, 60.0], [10, 40, 20, 35])
    res = _file(tmp_path, recs)
    path = predictions_path(res)
    assert path.name == "stitches_pred.npz"
    assert predictions_path(tmp_path / "stitches_res_ema.txt").name == "stitches_pred_ema.npz"
    with np.load(path, allow_pickle=False) as z:  # plain arrays only
        assert {k: z[k].dtype.kind for k in z.files} == {"sample_id": "i", "label": "i", "cfg_id": "i", "top5": "i",
                                                        "top_prob": "f", "correct": "b", "meta": "u"}
    pred = read_predictions(path)
    assert pred.top5.dtype == np.int16 and pred.correct.tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]
    assert pred.meta["checkpoint_sha256"] == STAMP["checkpoint_sha256"]
    check_against(pred, recs, "x")
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic writer leaves no temp file


def test_predictions_of_another_record_or_count_are_refused(tmp_path):
    recs = _records([25.0, 75.0, 50.0, 60.0], [10, 40, 20, 35])
    pred = read_predictions(predictions_path(_file(tmp_path, recs)))
    other = [dict(r) for r in recs]
    other[1]["checkpoint_sha256"] = "d" * 64  # another checkpoint's evaluation
    with pytest.raises(ResultsError, match="cfg_id 1.*another record"):
        check_against(pred, other, "x")
    with pytest.raises(ResultsError, match="lacks"):
        check_against(pred, recs[1:], "x")
    fake = {**pred.meta, "record_sha256": {**pred.meta["record_sha256"], "0": record_sha256({**recs[0], "acc1": 50.0})}}
    with pytest.raises(ResultsError, match="top-1 25.0000 on 4 images.*50.0000"):
        check_against(Predictions(**{**pred.__dict__, "meta": fake}), [{**recs[0], "acc1": 50.0}, *recs[1:]], "x")
    # a latency added to a record later keeps the tie
    check_against(pred, [{**r, "latency_ms_b1": 1.0} for r in recs], "x")


def test_merge_keeps_old_stitches_of_the_same_evaluation_only(tmp_path):
    recs = _records([25.0, 75.0, 50.0, 60.0], [10, 40, 20, 35])
    old = read_predictions(predictions_path(_file(tmp_path, recs)))
    new = old.subset([1])
    new = Predictions(**{**new.__dict__, "cfg_id": np.asarray([3], np.int32),
                         "meta": {**new.meta, "record_sha256": {"3": "x"}}})
    merged = merge(old.subset([0]), new)
    assert merged.cfg_id.tolist() == [0, 3] and merged.correct[0].tolist() == [1, 0, 0, 0]
    foreign = Predictions(**{**old.__dict__, "meta": {**old.meta, "checkpoint_sha256": "e" * 64}})
    assert merge(foreign, new).cfg_id.tolist() == [3]


# ------------------------------------------------------------------------------------------------------ the CLI
def test_pareto_baselines_prints_both_and_draws_them(tmp_path, capsys):
    recs = _records([25.0, 75.0, 50.0, 60.0], [10, 40, 20, 35])
    res = _file(tmp_path, recs)
    rc, out, err = run_cli(capsys, "pareto", res, "--baselines", "--out", tmp_path / "p")
    assert rc == 0, err
    assert "| random anchor mixing |" in out and "| confidence cascade |" in out
    assert "1 of 2 stitches above the mixing line" in out
    data = json.loads((tmp_path / "p" / "pareto_flops.json").read_text())
    b = data["files"][0]["baselines"]
    assert b["hypervolume"]["mixing"] == pytest.approx(hypervolume_line([(0.25, 25), (1, 75)]))
    assert "the cascade's front" in (tmp_path / "p" / "pareto_flops.md").read_text()
    rc, out, err = run_cli(capsys, "report", res, "--baselines", "--out", tmp_path / "r.html")
    assert rc == 0, err
    page = (tmp_path / "r.html").read_text()
    assert '"baselines":{"mixing"' in page and "baseline cascade" in page


def test_pareto_baselines_refusals(tmp_path, capsys):
    recs = _records([25.0, 75.0, 50.0, 60.0], [10, 40, 20, 35])
    res = tmp_path / "stitches_res.txt"
    write_results(res, recs)
    rc, out, err = run_cli(capsys, "pareto", res, "--baselines")
    assert_refused(rc, err, "stitches_pred.npz", "does not exist", "--save-predictions")
    _file(tmp_path, recs, pred_ids=(1,), probs=[[0.9] * 4], correct=[[0, 1, 1, 1]])
    rc, out, err = run_cli(capsys, "pareto", res, "--baselines")
    assert_refused(rc, err, "no anchor cfg_id [0]")
    rc, out, err = run_cli(capsys, "pareto", res, "--baselines", "--by", "params")
    assert_refused(rc, err, "--baselines", "FLOPs")
    predictions_path(res).write_bytes(b"not a zip")
    rc, out, err = run_cli(capsys, "pareto", res, "--baselines")
    assert_refused(rc, err, "is not a predictions file")


# ------------------------------------------------------------------------------------------------------ evaluation
def test_evaluation_records_the_chosen_stitches_per_image(digits_images):
    from helpers import vit

    from snnet import build_snnet, parse_stitch_config
    from snnet.train.evaluator import PerImage, evaluate_stitches
    torch.manual_seed(0)
    net = build_snnet(parse_stitch_config({"anchors": [vit(8), vit(16)]}), pretrained=False, num_classes=10,
                      img_size=16).eval()
    x, y = digits_images
    x = torch.nn.functional.interpolate(x[:70], size=16)
    ids = torch.arange(100, 170)
    loader = DataLoader(TensorDataset(x, y[:70], ids), batch_size=32)
    per = PerImage([0, 3])
    metrics = evaluate_stitches(net, loader, list(range(net.num_configs)), torch.device("cpu"), per_image=per)
    a = per.arrays
    assert a["sample_id"].tolist() == list(range(100, 170)) and a["label"].tolist() == y[:70].tolist()
    assert sorted(a["per_stitch"]) == [0, 3]
    for c in (0, 3):
        top, prob = a["per_stitch"][c]
        with torch.no_grad():
            logits = net(x, c).float()
        assert top.tolist() == logits.topk(5, dim=1).indices.tolist()
        assert np.allclose(prob, logits.softmax(1).max(1).values.numpy(), atol=1e-6)
        assert 100.0 * (top[:, 0] == a["label"]).mean() == pytest.approx(metrics[c]["acc1"])


@pytest.mark.slow
@pytest.mark.dist
def test_two_process_evaluation_writes_predictions_and_a_rerun_adds_stitches(digits_folder, tiny_config, tmp_path):
    base = [digits_folder, "--stitch_config", tiny_config, "--eval", *FAST, "--output", tmp_path, "--experiment", "e"]
    r = run(["./distributed_train.sh", "2", *base])
    assert r.returncode == 0, r.stderr[-2000:]
    from snnet.results.predictions import load_for
    from snnet.results.records import read_results
    out = tmp_path / "e"
    recs = read_results(out)
    pred = load_for(out / "stitches_res.txt", recs)
    assert pred.cfg_id.tolist() == [0, 1] and pred.sample_id.tolist() == list(range(60))  # both ranks' images
    # a rerun asking for one more stitch evaluates only that one, and keeps the anchors' predictions
    r = run([sys.executable, "train.py", *base, "--save-predictions", "anchors,5"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "evaluating 1 stitch(es)" in r.stdout + r.stderr
    pred2 = load_for(out / "stitches_res.txt", read_results(out))
    assert pred2.cfg_id.tolist() == [0, 1, 5]
    assert np.array_equal(pred2.top5[:2], pred.top5) and np.array_equal(pred2.top_prob[:2], pred.top_prob)
    r = run([sys.executable, "train.py", *base, "--save-predictions", "anchors,x"])
    assert r.returncode == 2 and "--save-predictions: 'anchors,x' is not anchors, all, none" in r.stderr \
        and len(r.stderr.strip().splitlines()) == 1
    r = run([sys.executable, "train.py", *base, "--save-predictions", "12", "--experiment", "f"])
    assert r.returncode == 2 and "cfg_id [12] out of range" in r.stderr and not (tmp_path / "f").exists()
