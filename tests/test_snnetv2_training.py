"""SN-Netv2 on the digits demo's anchors: two-way stitching, ROS sampling, LoRA stitching layers and
--freeze-anchors each train for one epoch with train.py and then evaluate every stitch. The anchors have the
architectures of configs/demo_digits_v2.json and configs/demo_digits_v1_pair.json (widths 16 and 64, depth 4,
random weights saved as their checkpoints), on scikit-learn's digits as `snnet.demo` writes them; the configs
reach them through `snnet.demo.stitch_config_for`, as `python -m snnet.demo --v2 --work DIR` does.

Two runs, one after the other (each a process forked by helpers.run from a server that imported torch, timm and
snnet once: side by side, each fresh interpreter spent ~6 CPU-s importing them): two-way + LoRA + ROS
(configs/demo_digits_v2.json), and --freeze-anchors on SN-Net's sliding-window plan (configs/demo_digits_v1_pair.json).
train.py's main() runs whole; a hook records the network after its least-squares init (before `fit`) and every
stitch the sampler draws."""
import json
import sys

import pytest
import torch
from helpers import run

from snnet import build_snnet, load_stitch_config
from snnet.demo import V2_CONFIGS, demo_anchors, stitch_config_for, write_digits
from snnet.results.records import read_results
from snnet.stitching.cost import cost_table
from snnet.stitching.plan import deit_plan, two_way_plan
from snnet.train.sampler import BucketSampler, flops_groups

FLAGS = ["--img-size", "16", "-b", "64", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "-j", "0",
         "--no-pretrained", "--log-interval", "1000", "--seed", "1", "--epochs", "1"]
HOOK = """
import json, sys, torch, snnet.train.main as m, snnet.train.trainer as t
out, fit, create = sys.argv[1], t.Trainer.fit, t.run_sampler
record = {"draws": []}
def keep_init(self, *args):
    torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()}, out + "/init.pt")
    return fit(self, *args)
def recording(*args, **kwargs):
    sampler = create(*args, **kwargs)
    inner = getattr(sampler, "inner", sampler)
    record.update(type=type(inner).__name__, gap=getattr(inner, "gap", None), groups=getattr(inner, "groups", None))
    def draw(step):
        record["draws"].append([step, sampler(step)])
        return record["draws"][-1][1]
    return draw
t.Trainer.fit, t.run_sampler = keep_init, recording
rc = m.main(sys.argv[2:])
open(out + "/sampler.json", "w").write(json.dumps(record))
sys.exit(rc)
"""


def anchor_checkpoints(work):
    """Random anchors of the demo's architectures saved where the demo configs (moved to `work`) expect them."""
    import timm
    torch.manual_seed(0)
    states = {}
    for name, model, kwargs in demo_anchors(*V2_CONFIGS.values()):
        net = timm.create_model(model, pretrained=False, num_classes=10, img_size=16, **kwargs)
        (work / name).mkdir(parents=True)
        torch.save({"state_dict": net.state_dict()}, work / name / "last.pth.tar")
        states[name] = net.state_dict()
    return states


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo_v2")
    data = write_digits(work)
    anchors = anchor_checkpoints(work)
    jobs = {"v2": (stitch_config_for(work, V2_CONFIGS["v2"]), []),
            "frozen": (stitch_config_for(work, V2_CONFIGS["v1"]), ["--freeze-anchors"])}
    out = {}
    for exp, (cfg, extra) in jobs.items():
        (work / f"{exp}_hook").mkdir()
        r = run([sys.executable, "-c", HOOK, work / f"{exp}_hook", data, "--stitch_config", cfg, *FLAGS, *extra,
                 "--output", work, "--experiment", exp])
        assert r.returncode == 0, f"{exp}: {r.stderr[-3000:]}"
        net = build_snnet(load_stitch_config(cfg), pretrained=False, num_classes=10, img_size=16)
        out[exp] = {
            "net": net, "cfg": json.loads(cfg.read_text()),
            "records": read_results(work / exp),
            "init": torch.load(work / f"{exp}_hook" / "init.pt", weights_only=True),
            "last": torch.load(work / exp / "last.pth.tar", weights_only=True)["state_dict"],
            "sampler": json.loads((work / f"{exp}_hook" / "sampler.json").read_text()),
        }
    out["anchors"] = anchors
    return out


def check_every_stitch_evaluated(run, n_routes):
    """stitches_res.txt: one line per cfg_id of the plan, with the network's own FLOPs, params and route names."""
    net, records = run["net"], run["records"]
    assert net.num_configs == n_routes
    assert [r["cfg_id"] for r in records] == list(range(n_routes))
    table = cost_table(net, (16, 16), 3)
    assert [r["flops"] for r in records] == [table.route_flops(net.routes[c]) for c in range(n_routes)]
    assert [r["params"] for r in records] == [net.params(c) for c in range(n_routes)]
    assert [r["route"] for r in records] == [net.describe(c) for c in range(n_routes)]
    assert all(r["samples"] == 360 and 0 <= r["acc1"] <= 100 for r in records)  # the demo's whole val split


@pytest.mark.dist
def test_two_way_plan_trains_and_evaluates_all_15_networks(runs):
    run = runs["v2"]
    assert run["cfg"]["stitch_plan"] == "two_way"
    plan = two_way_plan(4, 4)  # r = 1: 2 anchors, 4 SL, 3 LS, 3 LSL, 3 SLS
    check_every_stitch_evaluated(run, len(plan))
    assert len(plan) == 15 and [len(r.stitches) for r in run["net"].plan.routes] == [len(r.stitches)
                                                                                     for r in plan.routes]
    # one stitching layer per position, keyed by the front anchor: 4 small->large, 3 large->small
    layers = {k.rsplit(".", 2)[0] for k in run["last"] if k.startswith("stitch_layers.")}
    assert layers == {f"stitch_layers.0.{i}" for i in range(4)} | {f"stitch_layers.1.{i}" for i in range(3)}
    # both directions are real networks: the large->small (LS) routes cost less than the large anchor
    flops = {r["cfg_id"]: r["flops"] for r in run["records"]}
    ls = [c for c in range(15) if tuple(plan.routes[c].anchors) == (1, 0)]
    assert len(ls) == 3 and all(flops[0] < flops[c] < flops[1] for c in ls)
    # the anchors were trained too (not frozen): the --freeze-anchors check below can fail
    a = [k for k in run["last"] if k.startswith("anchors.")]
    assert any(not torch.equal(run["last"][k], run["init"][k]) for k in a)


@pytest.mark.dist
def test_lora_stitching_layers_train_b_and_keep_the_ls_w(runs):
    run = runs["v2"]
    assert run["cfg"]["stitch_layer"] == {"type": "lora", "rank": 4}
    init, last = run["init"], run["last"]
    keys = [k for k in last if k.startswith("stitch_layers.")]
    assert {k.rsplit(".", 1)[1] for k in keys} == {"weight", "bias", "lora_A", "lora_B"}
    bs = [k for k in keys if k.endswith(".lora_B")]
    assert len(bs) == 7 and all(last[k].shape[1] == 4 for k in bs)
    assert all(torch.count_nonzero(init[k]) == 0 for k in bs)           # B starts at zero...
    trained = {k for k in bs if torch.count_nonzero(last[k]) > 0}       # ...and trained where a drawn route runs it
    plan = run["net"].plan
    drawn = {f"stitch_layers.{'.'.join(map(str, s.layer))}.transform.lora_B"
             for _, c in run["sampler"]["draws"] for s in plan.routes[c].stitches}
    assert trained == drawn and len(trained) >= 5
    assert all(torch.equal(last[k], init[k]) for k in keys if k.endswith(".weight"))  # W: the frozen LS solution
    assert any(torch.count_nonzero(init[k]) > 0 for k in keys if k.endswith(".weight"))  # (and it was LS-fitted)


@pytest.mark.dist
def test_ros_draws_buckets_of_the_cost_table(runs):
    run = runs["v2"]
    spec = run["cfg"]["sampler"]
    rec = run["sampler"]
    assert spec == {"type": "ros", "gap": 5e-4} and rec["type"] == "BucketSampler" and rec["gap"] == 5e-4
    flops = {r["cfg_id"]: float(r["flops"]) for r in run["records"]}
    groups = flops_groups(flops, 5e-4)
    assert rec["groups"] == groups and len(groups) == 5  # 0.27 .. 3.59 MFLOPs: about one w64 block apart
    steps = [s for s, _ in rec["draws"]]
    assert steps == list(range(len(steps))) and len(steps) == 1437 // 64  # every step of the epoch drew once
    again = BucketSampler(flops, seed=1, rank=0, gap=5e-4)
    assert [c for _, c in rec["draws"]] == [again(s) for s in steps]  # train.py drew from ROS with (seed, rank)
    group_of = {c: i for i, g in enumerate(groups) for c in g}
    assert len({group_of[c] for _, c in rec["draws"]}) >= 3


@pytest.mark.dist
def test_freeze_anchors_on_the_demo_pair(runs):
    run = runs["frozen"]
    assert run["cfg"].get("stitch_plan", "sliding_window") == "sliding_window"
    check_every_stitch_evaluated(run, len(deit_plan(2, 4, 2, 1, True)))  # SN-Net's plan: 2 anchors + 10 stitches
    last, init = run["last"], run["init"]
    for i, name in enumerate(("anchor_w16", "anchor_w64")):  # bit-identical to the checkpoints the config names
        saved = runs["anchors"][name]
        assert {k for k in last if k.startswith(f"anchors.{i}.")} == {f"anchors.{i}.{k}" for k in saved}
        assert all(torch.equal(last[f"anchors.{i}.{k}"], v) for k, v in saved.items())
    stitches = [k for k in last if k.startswith("stitch_layers.")]
    assert stitches and any(not torch.equal(last[k], init[k]) for k in stitches)  # the stitching layers trained
    assert all(c >= 2 for _, c in run["sampler"]["draws"])  # an anchor's own route has nothing to train
