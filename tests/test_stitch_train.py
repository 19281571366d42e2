"""`snnet stitch-train`: one stitching layer between two frozen anchors, sweeps, resume, torchrun;
on the core's one cut mechanism (stitching/cut.py: class-token ViT <-> CNN pairs, the fit's error of the held map), the
one anchor syntax on the command line, and reproducible random anchors (seeded, hashed by their weights).

Tiny random anchors (saved as checkpoints) on the conftest's small digits folder, one epoch per run, so the whole file
stays fast; the digits demo's own 3x3 sweep is configs/sweeps/digits_3x3.yaml.
"""
import io
import json
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
import yaml
from helpers import run as run_cmd

VIT = {"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 3, "num_heads": 2}}
# a ViT without class token: its 16 tokens lay out as the 4x4 map the tiny ResNet's first stage runs at
VIT_NOCLS = {"name": "deit_tiny_patch16_224",
             "model_kwargs": {"patch_size": 4, "depth": 3, "embed_dim": 8, "num_heads": 2, "class_token": False,
                              "global_pool": "avg"}}
RESNET = {"name": "resnet18", "model_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}}
TRAIN = {"img_size": 16, "batch_size": 32, "epochs": 1, "workers": 0, "hflip": 0, "log_interval": 1000,
         "scale": [0.7, 1.0]}


@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
    """label -> anchor mapping of a sweep file; each anchor's random weights saved as its checkpoint."""
    from snnet.stitching.build import create_anchor
    from snnet.stitching.config import AnchorSpec
    from snnet.utils.checkpoint import save_checkpoint
    folder = tmp_path_factory.mktemp("anchors")
    specs = {"v8": {**VIT, "model_kwargs": {**VIT["model_kwargs"], "embed_dim": 8}},
             "v16": {**VIT, "model_kwargs": {**VIT["model_kwargs"], "embed_dim": 16}},
             "vn": VIT_NOCLS, "rn": RESNET}
    out = {}
    for i, (label, spec) in enumerate(specs.items()):
        torch.manual_seed(i)
        model = create_anchor(AnchorSpec(spec["name"], None, spec["model_kwargs"]), pretrained=False, num_classes=10,
                              img_size=16)
        path = folder / f"{label}.pth.tar"
        save_checkpoint(path, {"state_dict": model.state_dict()})
        out[label] = {**spec, "checkpoint": str(path)}
    return out


def write_sweep(path, anchors, data, out, grid=None, runs=None, run=None, train=None, **keys):
    """A sweep file; `keys` are further top-level keys (pretrained, seed)."""
    sweep = {"data": str(data), "out": str(out), "anchors": anchors, "train": {**TRAIN, **(train or {})},
             "run": {"ls_images": 32, **(run or {})}, **keys}
    if grid:
        sweep["grid"] = grid
    if runs:
        sweep["runs"] = runs
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def cli(*argv):
    from snnet.cli import main
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["stitch-train", *map(str, argv)])
    return rc, out.getvalue(), err.getvalue()


def results(out):
    from snnet.results.records import read_results
    return {r["cfg_id"]: r for r in read_results(out / "stitches_res.txt")}


def run_result(out, rec):
    return json.loads((out / "runs" / rec["run"] / "result.json").read_text())


# ---------------------------------------------------------------------------------------------------- layers
def test_lowrank_layer_keeps_the_best_rank_r_map_and_counts_its_own_parameters():
    from snnet.stitching.layers import create_stitch_layer, stitch_layer_from_spec
    torch.manual_seed(0)
    W, b = torch.randn(6, 10), torch.randn(6)
    layer = create_stitch_layer({"type": "lowrank", "rank": 3}, 10, 6, "nchw", "tokens")
    layer.set_affine(W, b)
    U, S, Vh = torch.linalg.svd(W.double())
    best = (U[:, :3] * S[:3]) @ Vh[:3]
    with torch.no_grad():
        merged = layer.transform[1].weight.double() @ layer.transform[0].weight.double()
        assert torch.allclose(merged, best, atol=1e-5)
        x = torch.randn(2, 10, 3, 3)  # NCHW in, tokens out: a 1x1 conv per pixel, then the layout bridge
        rows = x.permute(0, 2, 3, 1).reshape(2, 9, 10).double()
        assert torch.allclose(layer(x).double(), rows @ best.T.float().double() + b.double(), atol=1e-4)
    assert sum(p.numel() for p in layer.parameters()) == 3 * (10 + 6) + 6
    full = create_stitch_layer({"type": "lowrank", "rank": 6}, 10, 6)
    full.set_affine(W, b)
    assert torch.allclose(full.transform[1].weight @ full.transform[0].weight, W, atol=1e-5)
    assert stitch_layer_from_spec(layer.spec()).spec() == layer.spec()
    with pytest.raises(ValueError, match="rank 7 must be an integer in 1..6"):
        create_stitch_layer({"type": "lowrank", "rank": 7}, 10, 6)


# ---------------------------------------------------------------------------------------------------- one sweep
@pytest.mark.slow
def test_cross_family_runs_train_only_the_layer_and_leave_the_anchors_bit_identical(anchors, digits_folder,
                                                                                      tmp_path):
    """ViT -> ResNet (entering block 0 reads the 64-channel stem output, not the stage's 8 channels) and ResNet ->
    ViT through the layout bridges; both anchors frozen and in eval mode: weights and BatchNorm statistics exactly
    the checkpoints' after training."""
    from snnet.explore.stitch_train.jobs import run_sweep
    from snnet.explore.stitch_train.sweep import load_sweep
    from snnet.utils.checkpoint import load_checkpoint
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path / "x.yaml", {"vn": anchors["vn"], "rn": anchors["rn"]}, digits_folder, out,
                       runs=[{"pair": ["vn", "rn"], "cut": 1, "end_block": 0},
                             {"pair": ["rn", "vn"], "cut": 0, "end_block": 2, "layer": {"type": "lowrank", "rank": 4}}])
    summary = run_sweep(load_sweep(path))
    assert summary.trained == [0, 1]
    for label, model in summary.anchors.items():
        saved = load_checkpoint(anchors[label]["checkpoint"])["state_dict"]
        state = model.state_dict()
        assert state.keys() == saved.keys()
        changed = [k for k in saved if not torch.equal(state[k], saved[k])]
        assert not changed, f"{label}: {changed[:3]} changed during training"
    rn = summary.anchors["rn"]
    assert any("running_mean" in k for k in rn.state_dict())
    probe = {k: v.clone() for k, v in rn.state_dict().items() if "running" in k}
    rn.train()(torch.randn(4, 3, 16, 16))  # the control: a forward in train mode would have moved them
    rn.eval()
    assert any(not torch.equal(v, rn.state_dict()[k]) for k, v in probe.items())

    recs = results(out)
    assert sorted(recs) == [0, 1, 2, 3] and recs[2]["route"] == "vn" and recs[3]["route"] == "rn"
    vit_to_rn, rn_to_vit = run_result(out, recs[0]), run_result(out, recs[1])
    assert vit_to_rn["layer"] == {"type": "linear", "in_channels": 8, "out_channels": 64, "in_layout": "tokens",
                                  "out_layout": "nchw"}
    assert vit_to_rn["stitch_layer_params"] == 8 * 64 + 64
    assert rn_to_vit["layer"]["in_layout"] == "nchw" and rn_to_vit["stitch_layer_params"] == 4 * (8 + 8) + 8
    assert recs[0]["route"] == "vn[..b1] -(linear)-> rn[b0..]"
    for rec, res in ((recs[0], vit_to_rn), (recs[1], rn_to_vit)):
        assert rec["flops"] == res["flops"] > res["stitch_layer_flops"] > 0
        steps = [json.loads(l) for l in (out / "runs" / rec["run"] / "trajectory.jsonl").read_text().splitlines()]
        assert [s["kind"] for s in steps] == ["init"] + ["step"] * 5 + ["epoch"]
        assert steps[-1]["val_acc1"] == res["acc1"] and steps[0]["val_acc1"] == res["init_acc1"]
    ckpt = load_checkpoint(out / "runs" / recs[0]["run"] / "stitch_layer.pth.tar")
    assert set(ckpt["state_dict"]) == {"transform.weight", "transform.bias"}


@pytest.mark.slow
def test_sweep_resumes_only_the_missing_run_and_plots(anchors, digits_folder, tmp_path):
    """A grid over cuts and gaps plus single runs (other direction, lowrank from random init, KD): rerun after
    deleting one run's result.json trains that run only; the results file is what `snnet pareto` plots."""
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path / "s.yaml", {"v8": anchors["v8"], "v16": anchors["v16"]}, digits_folder, out,
                       grid={"pair": [["v8", "v16"]], "cut": [0, 1], "gap": [0, 1]},
                       runs=[{"pair": ["v16", "v8"], "cut": 1, "end_block": 1, "layer": {"type": "lora", "rank": 2}},
                             {"pair": ["v8", "v16"], "cut": 2, "gap": -1, "layer": {"type": "lowrank", "rank": 2},
                              "ls_init": False},
                             {"pair": ["v8", "v16"], "cut": 1, "gap": 0, "loss": "kd", "temperature": 2.0}])
    rc, stdout, err = cli("--sweep", path)
    assert rc == 0, err
    assert "7 runs: 7 trained now" in stdout
    recs = results(out)
    assert sorted(recs) == list(range(9))  # 7 runs, then the anchors v8, v16
    assert [recs[c]["end_block"] for c in range(4)] == [1, 2, 2, 3]  # aligned block i+1, plus the gap
    assert recs[3]["route"] == "v8[..b1] -(linear)-> v16[b3..]" and recs[7]["route"] == "v8"
    assert recs[4]["route"] == "v16[..b1] -(lora-rank2)-> v8[b1..]"
    lowrank, kd = run_result(out, recs[5]), run_result(out, recs[6])
    assert lowrank["ls_init"] is False and lowrank["ls_rel_error"] is None and lowrank["end_block"] == 2
    assert kd["loss"] == "kd" and kd["temperature"] == 2.0 and recs[6]["run"] != recs[2]["run"]
    before = {c: (out / "runs" / recs[c]["run"] / "result.json").read_text() for c in range(7)}

    (out / "runs" / recs[2]["run"] / "result.json").unlink()
    rc, stdout, err = cli("--sweep", path)
    assert rc == 0, err
    assert "7 runs: 1 trained now by this process, 6 finished before" in stdout
    after = {c: (out / "runs" / recs[c]["run"] / "result.json").read_text() for c in range(7)}
    assert [c for c in range(7) if after[c] != before[c]] == [2]
    assert json.loads(after[2])["started"] >= json.loads(before[2])["finished"]

    rc, stdout, err = cli("--sweep", path, "--dry-run")
    assert rc == 0 and "7 runs, 7 finished" in stdout
    from snnet.cli import main
    plot = io.StringIO()
    with redirect_stdout(plot):
        assert main(["pareto", str(out / "stitches_res.txt"), "--out", str(tmp_path / "plot")]) == 0
    table = (tmp_path / "plot" / "pareto_flops.md").read_text()  # every record, the front marked
    assert all(recs[c]["route"] in table for c in range(9))
    assert (tmp_path / "plot" / "pareto_flops.png").stat().st_size > 0
    front = json.loads((tmp_path / "plot" / "pareto_flops.json").read_text())
    assert front["files"][0]["anchors"] == 2  # the anchors are found from their routes

    # the sweep's pictures: one map panel per (pair, layer type) and a curve per run; the report embeds both
    from PIL import Image
    for name in ("sweep.png", "curves.png"):
        with Image.open(out / name) as im:
            assert im.size[0] > 400 and len(set(im.convert("L").getdata())) > 10, name
    page = tmp_path / "report.html"
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as notes:
        assert main(["report", str(out / "stitches_res.txt"), "--out", str(page)]) == 0
    assert "no routes" not in notes.getvalue()
    html = page.read_text()
    assert html.count('"name":"sweep.png"') == 1 and html.count('"name":"curves.png"') == 1
    assert "data:image/png;base64," in html


@pytest.mark.dist
@pytest.mark.slow  # ~25 s on 2 cores: two processes, then the same sweep in one
def test_torchrun_splits_the_runs_and_matches_one_process(anchors, digits_folder, tmp_path):
    """Two processes take tasks 0, 2, 4 and 1, 3, 5 (runs 0..2, then the evaluations of v8, v16 and r16); each run is
    trained in one process, so the results equal a one-process sweep's. r16 has no checkpoint (random weights):
    every process builds the same r16 from the sweep's seed, so run 2 (trained by rank 0) and r16's evaluation (by
    rank 1) match the one-process sweep too."""
    grid = {"pair": [["v8", "v16"]], "cut": [0, 1]}
    both = {"v8": anchors["v8"], "v16": anchors["v16"],
            "r16": {**VIT, "model_kwargs": {**VIT["model_kwargs"], "embed_dim": 16}}}
    random_run = [{"pair": ["v8", "r16"], "cut": 1}]
    local = write_sweep(tmp_path / "local.yaml", both, digits_folder, tmp_path / "local", grid=grid, runs=random_run,
                        pretrained=False)
    dist = write_sweep(tmp_path / "dist.yaml", both, digits_folder, tmp_path / "dist", grid=grid, runs=random_run,
                       pretrained=False)
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "snnet.cli", "stitch-train", "--sweep", dist], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 runs: 2 trained now by this process" in proc.stdout  # rank 0's table and summary
    rc, _, err = cli("--sweep", local)
    assert rc == 0, err
    one, two = results(tmp_path / "local"), results(tmp_path / "dist")
    assert sorted(two) == [0, 1, 2, 3, 4, 5]
    assert [run_result(tmp_path / "dist", two[c])["rank"] for c in (0, 1, 2)] == [0, 1, 0]
    assert [two[c]["route"] for c in (3, 4, 5)] == ["v8", "v16", "r16"]
    for c in range(6):
        assert two[c]["acc1"] == one[c]["acc1"] and two[c]["flops"] == one[c]["flops"]
        assert two[c]["loss"] == pytest.approx(one[c]["loss"], rel=1e-5)
        assert two[c].get("run") == one[c].get("run")  # the same run folder name: the same experiment


# ---------------------------------------------------------------------------------------------------- the core's cut
@pytest.mark.slow
def test_class_token_vit_and_cnn_stitch_both_ways(anchors, digits_folder, tmp_path):
    """A ViT with a class token and a ResNet, through the core's `CutStitch`: ViT -> CNN drops the class token, CNN
    -> ViT predicts it from the position-averaged features (a second linear map, fitted by least squares and trained
    with the layer)."""
    from snnet.explore.stitch_train.jobs import run_sweep
    from snnet.explore.stitch_train.sweep import load_sweep
    from snnet.utils.checkpoint import load_checkpoint
    out = tmp_path / "sweep"
    path = write_sweep(tmp_path / "x.yaml", {"v8": anchors["v8"], "rn": anchors["rn"]}, digits_folder, out,
                       runs=[{"pair": ["v8", "rn"], "cut": 1, "end_block": 1},
                             {"pair": ["rn", "v8"], "cut": 0, "end_block": 1}])
    summary = run_sweep(load_sweep(path))
    assert summary.trained == [0, 1]
    recs = results(out)
    assert recs[0]["route"] == "v8[..b1] -(linear)-> rn[b1..]" and recs[1]["route"] == "rn[..b0] -(linear)-> v8[b1..]"
    to_cnn, to_vit = run_result(out, recs[0]), run_result(out, recs[1])
    assert to_cnn["cut_points"]["front"]["prefix_tokens"] == 1 and to_cnn["prefix_tokens"] == 0
    assert to_cnn["layer"] == {"type": "linear", "in_channels": 8, "out_channels": 8, "in_layout": "tokens",
                               "out_layout": "nchw"}
    assert to_cnn["stitch_layer_params"] == 8 * 8 + 8
    assert to_vit["cut_points"]["end"]["prefix_tokens"] == 1 and to_vit["prefix_tokens"] == 1
    assert to_vit["stitch_layer_params"] == to_vit["stitch_layer_trainable_params"] == 2 * (8 * 8 + 8)
    for rec, res in ((recs[0], to_cnn), (recs[1], to_vit)):
        assert 0 < res["ls_rel_error"] <= 1
        assert rec["flops"] == res["flops"] > res["stitch_layer_flops"] > 0
        steps = [json.loads(l) for l in (out / "runs" / rec["run"] / "trajectory.jsonl").read_text().splitlines()]
        assert [s["kind"] for s in steps] == ["init"] + ["step"] * 5 + ["epoch"]
        assert steps[-1]["val_acc1"] == res["acc1"] and steps[0]["ls_rel_error"] == res["ls_rel_error"]
    ckpt = load_checkpoint(out / "runs" / recs[1]["run"] / "stitch_layer.pth.tar")
    assert set(ckpt["state_dict"]) == {"transform.weight", "transform.bias", "prefix.weight", "prefix.bias"}


@pytest.mark.slow
def test_front_and_end_take_the_one_anchor_syntax(anchors, digits_folder, tmp_path):
    """--front as a JSON anchor object and --end as NAME:CHECKPOINT (timm's test_resnet, its weights saved here),
    labelled by their timm names or by LABEL=ANCHOR; a class-token ViT front and a CNN end train."""
    from snnet.results.records import file_sha256
    from snnet.stitching.build import create_anchor
    from snnet.stitching.config import AnchorSpec
    from snnet.utils.checkpoint import save_checkpoint
    torch.manual_seed(5)
    ckpt = tmp_path / "test_resnet.pth.tar"
    save_checkpoint(ckpt, {"state_dict": create_anchor(AnchorSpec("test_resnet"), pretrained=False,
                                                       num_classes=10).state_dict()})
    front = json.dumps(anchors["v8"])
    flags = ["--cut", "1", "--end-block", "1", "--ls-images", "32", "--train", *[f"{k}={v}" for k, v in TRAIN.items()]]
    rc, stdout, err = cli(digits_folder, "--front", front, "--end", f"test_resnet:{ckpt}", "--out", tmp_path / "one",
                          *flags)
    assert rc == 0, err
    rec = results(tmp_path / "one")[0]
    assert rec["route"] == "deit_tiny_patch16_224[..b1] -(linear)-> test_resnet[b1..]"
    res = run_result(tmp_path / "one", rec)
    assert res["front"]["checkpoint"] == anchors["v8"]["checkpoint"]
    assert res["front"]["model_kwargs"] == anchors["v8"]["model_kwargs"]
    assert res["end"]["name"] == "test_resnet" and res["end"]["checkpoint_sha256"] == file_sha256(ckpt)
    assert res["layer"]["in_layout"] == "tokens" and res["layer"]["out_layout"] == "nchw"
    rc, stdout, err = cli(digits_folder, "--front", f"v={front}", "--end", f"r=test_resnet:{ckpt}", "--out",
                          tmp_path / "two", "--dry-run", *flags)
    assert rc == 0, err
    assert "v[..b1] -(linear)-> r[b1..]" in stdout and not (tmp_path / "two").exists()
    rc, stdout, err = cli(digits_folder, "--front", front, "--end", f"test_resnet:{tmp_path / 'gone.pth'}", "--out",
                          tmp_path / "three", "--dry-run", *flags)
    assert rc == 2 and "gone.pth" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_lowrank_reports_the_error_of_its_own_rank_r_map(anchors, digits_folder, tmp_path):
    """The least-squares fit reports the relative error of the map the layer holds: a rank-1 or rank-2 layer keeps
    a truncated SVD of the least-squares map, so its error is its own and above the full-rank linear layer's; the
    number equals the error measured by running the fitted stitch, and is what result.json and the trajectory
    record."""
    from snnet.data.ls_images import clean_images
    from snnet.explore.stitch_train.jobs import run_sweep
    from snnet.explore.stitch_train.network import fit_stitch
    from snnet.explore.stitch_train.runner import prepare
    from snnet.explore.stitch_train.sweep import load_sweep
    out = tmp_path / "sweep"
    layers = ["linear", {"type": "lowrank", "rank": 1}, {"type": "lowrank", "rank": 2}]
    path = write_sweep(tmp_path / "s.yaml", {"v8": anchors["v8"], "v16": anchors["v16"]}, digits_folder, out,
                       grid={"pair": [["v8", "v16"]], "cut": [1], "layer": layers})
    prep = prepare(load_sweep(path))
    errors = []
    for run, plan in zip(prep.sweep.runs, prep.plans):
        st = prep.build(run, plan.end_block, plan.size)
        images = list(clean_images(prep.train_ds, prep.data_cfg(run.front), run.ls_images, run.seed))
        error, rows = fit_stitch(st, images, prep.device)
        assert rows == 32 * 17  # every token of 32 images: both ViTs have one class token, mapped with the others
        fa, fu, ea, eu = st.edge
        with torch.no_grad():
            feats = st.net.capture(torch.cat(images), {fa: {fu}, ea: {eu}})
            y = feats[(ea, eu)].double()
            measured = float((st.stitch(feats[(fa, fu)]).double() - y).norm() / y.norm())
        assert error == pytest.approx(measured, rel=1e-3)
        errors.append(error)
    linear, rank1, rank2 = errors
    assert len({linear, rank1, rank2}) == 3 and rank1 > linear and rank2 > linear
    summary = run_sweep(prep.sweep)
    assert summary.trained == [0, 1, 2]
    for c, error in enumerate(errors):
        res = run_result(out, results(out)[c])
        assert res["ls_rel_error"] == pytest.approx(error, rel=1e-9)


# ---------------------------------------------------------------------------------------------------- reproducibility
#: anchors with neither checkpoint nor pretrained weights (the sweep sets pretrained: false): random, from the seed
RANDOM = {"r8": {**VIT, "model_kwargs": {**VIT["model_kwargs"], "embed_dim": 8}},
          "r16": {**VIT, "model_kwargs": {**VIT["model_kwargs"], "embed_dim": 16}}}


@pytest.mark.slow
def test_random_anchors_repeat_and_the_hash_covers_the_seed_and_the_weights(digits_folder, tmp_path):
    """Anchors are built right after seeding with the sweep's seed, so two sweeps of the same random-anchor file
    build bit-identical anchors and give identical metrics. A run's folder hash covers its seed and both anchors'
    weights, and an anchor's cached evaluation is named by its weights: after a change neither is reused."""
    from snnet.explore.stitch_train.jobs import run_sweep
    from snnet.explore.stitch_train.sweep import load_sweep
    runs = [{"pair": ["r8", "r16"], "cut": 1}]
    summaries = []
    for k in range(2):
        path = write_sweep(tmp_path / f"s{k}.yaml", RANDOM, digits_folder, tmp_path / f"out{k}", runs=runs,
                           pretrained=False)
        summaries.append(run_sweep(load_sweep(path)))
    a, b = summaries
    for label in RANDOM:
        sa, sb = a.anchors[label].state_dict(), b.anchors[label].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), label
        assert a.anchor_ids[label]["weights_sha256"] == b.anchor_ids[label]["weights_sha256"]
    ra, rb = (run_result(tmp_path / f"out{k}", results(tmp_path / f"out{k}")[0]) for k in range(2))
    assert ra["run"] == rb["run"] and ra["spec_hash"] == rb["spec_hash"]
    for key in ("ls_rel_error", "init_acc1", "init_acc5", "init_val_loss", "acc1", "acc5", "val_loss", "train_loss"):
        assert ra[key] == rb[key], key
    assert results(tmp_path / "out0")[1]["acc1"] == results(tmp_path / "out1")[1]["acc1"]  # r8 on its own
    cached = sorted(p.name for p in (tmp_path / "out0" / "anchors").iterdir())
    assert cached == sorted(p.name for p in (tmp_path / "out1" / "anchors").iterdir())

    # the run's seed (the layer's init, the data): a new run, the same anchors and their cached evaluations
    path = write_sweep(tmp_path / "c.yaml", RANDOM, digits_folder, tmp_path / "out0",
                       runs=[{**runs[0], "seed": 1}], pretrained=False)
    reseeded = run_sweep(load_sweep(path), dry_run=True)
    assert reseeded.plans[0].spec_hash != a.plans[0].spec_hash and reseeded.plans[0].name != a.plans[0].name
    assert reseeded.anchor_ids == a.anchor_ids and reseeded.skipped == []
    assert [r["route"] for r in reseeded.records] == ["r8", "r16"]
    # the sweep's seed (the anchors' random init): other weights, so a new run and no cached anchor evaluation
    path = write_sweep(tmp_path / "c.yaml", RANDOM, digits_folder, tmp_path / "out0", runs=runs, pretrained=False,
                       seed=1)
    other = run_sweep(load_sweep(path), dry_run=True)
    assert all(other.anchor_ids[l]["weights_sha256"] != a.anchor_ids[l]["weights_sha256"] for l in RANDOM)
    assert other.plans[0].spec_hash != a.plans[0].spec_hash and other.skipped == [] and other.records == []


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("change, message", [
    ({"grid": {"pair": [["v8", "v32"]], "cut": [0]}}, "anchor 'v32' is not in `anchors`"),
    ({"grid": {"pair": [["v8", "v16"]], "cut": [3]}}, "cut 3 is past the last block of 'v8'; use 0..2"),
    ({"grid": {"pair": [["v8", "v16"]], "cut": [2], "gap": [2]}}, "gap 2 (end block 3 + 2) is outside"),
    ({"grid": {"pair": [["v8", "v16"]], "cut": [0], "layer": ["conv9"]}}, "layer 'conv9' must be one of"),
    ({"grid": {"pair": [["vn", "rn"]], "cut": [0], "end_block": [2]}}, "'vn' block 0 outputs 16 tokens but 'rn' "
                                                                        "block 2 takes 2x2"),
    ({"grid": {"pair": [["v8", "v16"]], "cut": [0]}, "train": {"mixup": 0.8}}, "train key 'mixup' cannot be set"),
    ({"grid": {"pair": [["v8", "v16"]], "cut": [0]}, "train": {"epochs": "ten"}}, "'ten' is not an integer"),
    ({"grid": {"pair": [["v8", "v16"]], "cuts": [0]}}, "unknown run field 'cuts' (did you mean 'cut'?)"),
    ({"runs": [{"pair": ["v8", "v16"], "cut": 0}, {"pair": ["v8", "v16"], "cut": 0, "gap": 0}]},
     "runs 0 and 1 are the same run"),
    ({"runs": [{"pair": ["v8", "v16"], "cut": 0, "gap": 0}, {"pair": ["v8", "v16"], "cut": 0, "end_block": 1}]},
     "runs 0 and 1 are the same run (v8[..b0] -(linear)-> v16[b1..])"),
])
def test_bad_sweeps_fail_in_one_line_before_writing_anything(anchors, digits_folder, tmp_path, change, message):
    out = tmp_path / "never"
    sweep = {"data": str(digits_folder), "out": str(out), "anchors": anchors, "train": dict(TRAIN), **change}
    if "train" in change:
        sweep["train"] = {**TRAIN, **change["train"]}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    rc, stdout, err = cli("--sweep", path)
    assert rc == 2 and stdout == ""
    assert err.startswith("snnet stitch-train: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()


def test_one_run_from_the_command_line_and_its_usage_errors(anchors, digits_folder, tmp_path):
    rc, _, err = cli(digits_folder, "--front", "v8=cfg.json#0", "--cut", "0", "--out", tmp_path)
    assert rc == 2 and "give --sweep FILE, or one run" in err
    rc, _, err = cli("--sweep", tmp_path / "missing.yaml", "--cut", "1")
    assert rc == 2 and "--cut describe one run; with --sweep put them into the sweep file" in err
    config = tmp_path / "pair.json"
    config.write_text(json.dumps({"anchors": [anchors["v8"], anchors["v16"]]}))
    rc, stdout, err = cli(digits_folder, "--front", f"{config}#0", "--end", f"{config}#1", "--cut", "0",
                          "--gap", "1", "--out", tmp_path / "one", "--train", *[f"{k}={v}" for k, v in TRAIN.items()],
                          "ls_images=32", "--dry-run")
    assert rc == 2 and "train key 'ls_images' cannot be set" not in err and "unknown key 'ls_images'" in err
    rc, stdout, err = cli(digits_folder, "--front", f"{config}#0", "--end", f"{config}#1", "--cut", "0", "--gap", "1",
                          "--ls-images", "32", "--out", tmp_path / "one", "--dry-run", "--train",
                          *[f"{k}={v}" for k, v in TRAIN.items()])
    assert rc == 0, err
    assert "pair0[..b0] -(linear)-> pair1[b2..]" in stdout and not (tmp_path / "one").exists()


def test_repeated_train_flags_add_up():
    """`--train epochs=1 --train lr=0.1` trains with both (argparse's default would keep only the last)."""
    from snnet.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(["stitch-train", "--sweep", "s.yaml", "--train", "epochs=1", "img_size=16",
                              "--train", "lr=0.1", "epochs=2"])
    assert dict(args.train) == {"epochs": 2, "img_size": 16, "lr": 0.1}
    again = parser.parse_args(["stitch-train", "--sweep", "s.yaml"])
    assert again.train == []  # the default list was not extended in place
