"""SN-Netv2's two-way stitching (docs/snnet_compat.md, C36): the plan in its cfg_id order, and its released S/L
table (tests/data/snnetv2_deit3_s_l_results.jsonl: 134 lines, SN-Netv2's results/stitches_res_s_l.txt) as the
FLOPs oracle, row for row."""
import json
from pathlib import Path

import pytest
import torch

from snnet import build_snnet, load_stitch_config
from snnet.stitching.cost import measure
from snnet.stitching.plan import two_way_plan

ORACLE = Path(__file__).parent / "data" / "snnetv2_deit3_s_l_results.jsonl"


def positions(plan, cfg_id):
    return [((s.front, s.end), (s.j, s.k), s.layer) for s in plan.routes[cfg_id].stitches]


def test_two_way_plan_order_and_counts():
    """Spec table: SL ids 2-13, LS 14-24, LSL 25-79, SLS 80-134; 135 ids, 12 + 11 layers."""
    plan = two_way_plan(12, 24)
    assert len(plan) == 135 and len(plan.layers) == 23
    assert positions(plan, 2) == [((0, 1), (0, 2), (0, 0))]
    assert positions(plan, 12) == [((0, 1), (10, 22), (0, 10))]
    assert positions(plan, 14) == [((1, 0), (1, 1), (1, 0))]
    assert positions(plan, 25) == [((1, 0), (1, 1), (1, 0)), ((0, 1), (1, 4), (0, 1))]
    assert positions(plan, 80) == [((0, 1), (0, 2), (0, 0)), ((1, 0), (3, 2), (1, 1))]
    assert positions(plan, 134) == [((0, 1), (9, 20), (0, 9)), ((1, 0), (21, 11), (1, 10))]
    kinds = [tuple(plan.routes[i].anchors) for i in range(135)]
    assert kinds[2:14] == [(0, 1)] * 12 and kinds[14:25] == [(1, 0)] * 11
    assert kinds[25:80] == [(1, 0, 1)] * 55 and kinds[80:] == [(0, 1, 0)] * 55
    assert len(two_way_plan(12, 12)) == 2 + 12 + 11 + 55 + 55  # S/B: r = 1, every j kept


@pytest.fixture(scope="module")
def s_l():
    torch.manual_seed(0)
    # PyTorch's default init, not timm's trunc-normal pass over 326M weights: FLOPs, params, keys and output shapes
    # are checked here, never the weights' values
    model = build_snnet(load_stitch_config("configs/deit3_s_l_v2.json"), pretrained=False, weight_init="skip")
    return model, measure(model, 224)


@pytest.mark.slow
def test_snnetv2_s_l_flops_row_for_row(s_l):
    model, table = s_l
    rows = [json.loads(line) for line in ORACLE.read_text().splitlines()]
    assert len(rows) == 134 and 13 not in {r["cfg_id"] for r in rows}
    ours = {c: table.route_flops(model.routes[c]) for c in range(model.num_configs)}
    assert {r["cfg_id"]: ours[r["cfg_id"]] for r in rows} == {r["cfg_id"]: r["flops"] for r in rows}


@pytest.mark.slow
def test_snnetv2_s_l_keys_params_and_id_13(s_l):
    model, _ = s_l
    assert [model.params(i) for i in range(2)] == [22059496, 304374760]  # DeiT-III S and L (timm's counts)
    keys = {k for k in model.state_dict() if k.startswith("stitch_layers.")}
    assert {k.rsplit(".", 2)[0] for k in keys} == {f"stitch_layers.0.{i}" for i in range(12)} | \
        {f"stitch_layers.1.{i}" for i in range(11)}
    assert "deit3_large" in model.describe(13) and model.routes[13][-2][0] == "unit"  # S, SL[11], L's norm + head
    x = torch.randn(1, 3, 224, 224)
    model.eval()
    with torch.no_grad():
        assert model(x, 13).shape == (1, 1000) and model(x, 134).shape == (1, 1000)


def test_two_way_on_small_vits_ls_init_and_every_route_runs():
    from snnet import parse_stitch_config
    from snnet.stitching.ls_init import ls_init, stitch_errors
    vit = lambda width, depth: {"name": "deit_tiny_patch16_224", "model_kwargs": {
        "patch_size": 4, "depth": depth, "embed_dim": width, "num_heads": 2}}
    torch.manual_seed(0)
    cfg = parse_stitch_config({"anchors": [vit(8, 3), vit(16, 6)], "stitch_plan": "two_way", "skip_final_norm": False})
    net = build_snnet(cfg, pretrained=False, num_classes=10, img_size=16)
    # SL (0,2),(1,4),(2,6); LS (1,1),(3,2); LSL (1,1)+(1,4); SLS (0,2)+(3,2)
    assert net.num_configs == 2 + 3 + 2 + 1 + 1
    x = torch.randn(16, 3, 16, 16)
    before = stitch_errors(net, x)
    ls_init(net, [x])  # one layer per position: each fitted to its own position
    after = stitch_errors(net, x)
    assert after.keys() == before.keys() and len(after) == 5 and all(after[k] < before[k] for k in after)
    net.eval()
    table = measure(net, 16)
    from helpers import trace_route_flops
    for c in range(net.num_configs):
        assert net(x, c).shape == (16, 10)
        assert table.route_flops(net.routes[c]) == trace_route_flops(net, c, 16)


def test_snnetv2_release_converts_and_loads(tmp_path):
    """SN-Netv2's checkpoints: DeiT-III's own LayerScale names (gamma_1/2) and LoRA stitching layers, with a pickled
    argparse Namespace; `snnet convert --trust` maps them to timm's names and the result loads strictly."""
    import argparse
    import re

    from snnet import parse_stitch_config
    from snnet.deploy.convert import convert_release
    deit3 = lambda width, depth: {"name": "deit3_small_patch16_224", "model_kwargs": {
        "patch_size": 4, "depth": depth, "embed_dim": width, "num_heads": 2}}
    cfg = parse_stitch_config({"anchors": [deit3(8, 2), deit3(16, 4)], "stitch_plan": "two_way",
                               "skip_final_norm": False, "stitch_layer": {"type": "lora", "rank": 4}})
    torch.manual_seed(0)
    net = build_snnet(cfg, pretrained=False, num_classes=10, img_size=16).eval()
    theirs = {re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", k): v for k, v in net.state_dict().items()}
    assert any(k.endswith("gamma_1") for k in theirs) and any(k.endswith("lora_B") for k in theirs)
    torch.save({"model": theirs, "args": argparse.Namespace(lora_r=4), "epoch": 49}, tmp_path / "v2.pth")
    assert convert_release(tmp_path / "v2.pth", tmp_path / "v2.pth.tar")["family"] == "deit"
    other = build_snnet(cfg, pretrained=False, num_classes=10, img_size=16).eval()
    other.load_state_dict(torch.load(tmp_path / "v2.pth.tar", weights_only=True)["state_dict"], strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert all(torch.equal(net(x, c), other(x, c)) for c in range(net.num_configs))


def test_two_way_for_cnns_each_stage_both_ways_one_hop():
    """Hierarchical anchors with "stitch_plan": "two_way": after each stage's SN-Net routes (small front), the same
    positions with the larger anchor in front, each with its own layer mapping the larger width onto the smaller;
    the one-way plan keeps its cfg_ids and keys; LS init fits the reverse layers; FLOPs sit between the two."""
    from helpers import trace_route_flops

    from snnet import parse_stitch_config
    from snnet.stitching.ls_init import ls_init, stitch_errors
    from snnet.stitching.plan import PlanError, stagewise_plan
    cnn = lambda w: {"name": "resnet18", "model_kwargs": {"channels": [w, 2 * w, 4 * w, 8 * w]}}
    one = stagewise_plan([[2, 2, 2, 2]] * 3, [2, 3])
    two = stagewise_plan([[2, 2, 2, 2]] * 3, [2, 3], large_front=True)
    assert [r.stitches for r in two.routes[:5]] == [r.stitches for r in one.routes[:5]]  # stage 2's SN-Net ids
    assert [positions(two, c) for c in (5, 6, 9, 10)] == [
        [((1, 0), (0, 1), (0, 2, 0))], [((2, 1), (0, 1), (0, 3, 0))],
        [((1, 0), (0, 1), (1, 2, 0))], [((2, 1), (0, 1), (1, 3, 0))]]
    assert len(one) == 7 and len(two) == 11 and len(two.layers) == 8
    back = stagewise_plan([[2, 2, 2, 2]] * 3, [3], small_front=False, large_front=True)  # "large_to_small"
    assert [positions(back, c) for c in (3, 4)] == [[((1, 0), (0, 1), (0, 0, 0))], [((2, 1), (0, 1), (0, 1, 0))]]
    with pytest.raises(PlanError, match="equal depths in each stitched stage: stage 1 has 2 blocks"):
        stagewise_plan([[2, 2, 2, 2], [2, 3, 2, 2]], [1], large_front=True)
    torch.manual_seed(0)
    cfg = parse_stitch_config({"anchors": [cnn(4), cnn(8)], "stitch_plan": "two_way", "stitch_stages": [3]})
    net = build_snnet(cfg, pretrained=False, num_classes=5, img_size=32)
    assert [net.describe(c) for c in range(2, 4)] == ["resnet18#0[..s3.b0] -(0.0.0)-> resnet18#1[s3.b1..]",
                                                      "resnet18#1[..s3.b0] -(0.1.0)-> resnet18#0[s3.b1..]"]
    assert tuple(net.stitch_layer((0, 1, 0)).transform.weight.shape[:2]) == (32, 64)  # c8's 64 channels onto c4's 32
    x = torch.randn(32, 3, 32, 32)
    before = stitch_errors(net, x)
    ls_init(net, [x])
    after = stitch_errors(net, x)
    assert len(after) == 2 and all(after[k] < before[k] for k in after)
    net.eval()
    flops = [trace_route_flops(net, c, 32) for c in range(4)]
    assert flops[0] < flops[2] < flops[1] and flops[0] < flops[3] < flops[1]
    assert all(net(x, c).shape == (32, 5) for c in range(4))
    cfg = parse_stitch_config({"anchors": [cnn(4), cnn(8)], "stitch_plan": "large_to_small", "stitch_stages": [3]})
    assert build_snnet(cfg, pretrained=False, num_classes=5, img_size=32).describe(2) == \
        "resnet18#1[..s3.b0] -(0.0.0)-> resnet18#0[s3.b1..]"
    vit = {"name": "deit_tiny_patch16_224", "model_kwargs": {"depth": 2, "embed_dim": 8, "num_heads": 2}}
    with pytest.raises(Exception, match="'large_to_small' takes hierarchical anchors"):
        build_snnet(parse_stitch_config({"anchors": [vit, vit], "stitch_plan": "large_to_small"}), pretrained=False)


def test_per_stitch_batchnorm_statistics_leave_the_anchors_their_own():
    """"bn_stats": "per_stitch": training a stitched route updates only that stitch's copy of the end anchor's
    BatchNorm statistics (the front anchor's blocks before it see its own route's images); the end anchor's own
    route gives what it gave; the one-pass trie, a checkpoint round trip and
    the exported stitch run with the stitch's statistics. The default keeps SN-Net's shared statistics and keys."""
    from snnet import parse_stitch_config
    from snnet.deploy.export import stitched_network
    from snnet.stitching.route_tree import RouteTree
    cnn = lambda w: {"name": "resnet18", "model_kwargs": {"channels": [w, 2 * w, 4 * w, 8 * w]}}
    cfg = {"anchors": [cnn(4), cnn(8)], "stitch_plan": "large_to_small", "stitch_stages": [2, 3]}
    torch.manual_seed(0)
    shared = build_snnet(parse_stitch_config(cfg), pretrained=False, num_classes=5, img_size=32)
    net = build_snnet(parse_stitch_config({**cfg, "bn_stats": "per_stitch"}), pretrained=False, num_classes=5,
                      img_size=32)
    net.load_state_dict(shared.state_dict(), strict=False)
    assert not any(k.startswith("bn_stats") for k in shared.state_dict())
    assert net.routes[2][-1] == ("unit", 0, net.routes[2][-1].unit, "0_0_0")  # c4's head after stitch 0.0.0
    x = torch.randn(16, 3, 32, 32)
    net.eval()
    own = net(x, 0).detach()  # c4: the end anchor of stitch 2
    stitched = net(x, 2).detach()
    net.train()
    shared.train()
    for _ in range(3):  # features far from the anchors' own: the statistics move
        net(3 * x + 1, 2)
        shared(3 * x + 1, 2)
    net.eval()
    shared.eval()
    assert torch.equal(net(x, 0), own)
    assert not torch.allclose(shared(x, 0), own)  # SN-Net's shared statistics: the anchor's route moved
    assert not torch.allclose(net(x, 2), stitched)
    outs = {}
    RouteTree(dict(enumerate(net.routes))).run(net.run_step, x, outs.__setitem__)
    assert all(torch.allclose(outs[c], net(x, c), atol=1e-6) for c in range(net.num_configs))
    again = build_snnet(parse_stitch_config({**cfg, "bn_stats": "per_stitch"}), pretrained=False, num_classes=5,
                        img_size=32).eval()
    again.load_checkpoint_state(net.checkpoint_state())
    assert torch.equal(again(x, 2), net(x, 2))
    module, _ = stitched_network(net, 2)
    assert torch.allclose(module(x), net(x, 2), atol=1e-5)
    with pytest.raises(Exception, match="bn_stats 'per_route' is not known: use shared or per_stitch"):
        build_snnet(parse_stitch_config({**cfg, "bn_stats": "per_route"}), pretrained=False, num_classes=5)
