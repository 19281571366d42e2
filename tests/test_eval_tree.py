"""Evaluating every stitch in one pass with shared prefixes gives the stitch-by-stitch results."""
import sys
from pathlib import Path

import pytest
import torch
from helpers import trace_route_flops
from torch.utils.data import DataLoader, TensorDataset

from snnet import build_snnet, parse_stitch_config
from snnet.stitching.cost import measure
from snnet.stitching.ls_init import ls_init
from snnet.stitching.route_tree import RouteTree
from snnet.train.evaluator import evaluate_stitches


def vit(width):
    return {"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": width,
                                                              "num_heads": 2}}


@pytest.fixture(scope="module")
def digits_loader(digits_images):
    x, y = digits_images
    x = torch.nn.functional.interpolate(x[:192], size=16)
    return DataLoader(TensorDataset(x, y[:192]), batch_size=64)


def tree_vs_one_by_one(model, loader, amp=None):
    """Each stitch evaluated alone (a one-route tree runs it from the input), then all in one pass; the peak bytes of
    live activations in the one pass."""
    ids = list(range(model.num_configs))
    cpu = torch.device("cpu")
    one_by_one = {c: evaluate_stitches(model, loader, [c], cpu, amp)[c] for c in ids}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from eval_all_stitches import tracking_peak  # the benchmark's measure: weak references to live activations
    peak = tracking_peak(model)
    tree = evaluate_stitches(model, loader, ids, cpu, amp)
    del model.run_step
    return one_by_one, tree, {"peak_activation_bytes": peak[0]}


def assert_same(one_by_one, tree):
    for c, a in one_by_one.items():
        b = tree[c]
        assert (a["acc1"], a["acc5"], a["samples"]) == (b["acc1"], b["acc5"], b["samples"]), c
        assert abs(a["loss"] - b["loss"]) < 1e-5, c


@pytest.mark.parametrize("nearest", [True, False])
@pytest.mark.slow
def test_deit_every_cfg_same_as_stitch_by_stitch(digits_loader, digits_images, nearest):
    torch.manual_seed(0)
    cfg = parse_stitch_config({"anchors": [vit(8), vit(16), vit(32)], "num_classes": 10,
                               "nearest_stitching": nearest, "skip_final_norm": False})
    model = build_snnet(cfg, pretrained=False, img_size=16, num_classes=10)
    ls_init(model, [torch.nn.functional.interpolate(digits_images[0][200:300], size=16)])
    one_by_one, tree, stats = tree_vs_one_by_one(model, digits_loader)
    assert len(tree) == model.num_configs == (23 if nearest else 96)  # 3 + 3 pairs x 10 + 63 three-anchor chains
    assert_same(one_by_one, tree)
    assert len({round(v["acc1"], 3) for v in tree.values()}) > 3  # the stitches really differ
    # peak live activations: at most one root-to-leaf path, far below one activation per route
    act = 64 * 17 * 32 * 4
    longest = max(len(r) for r in model.routes)
    assert 0 < stats["peak_activation_bytes"] <= longest * act


@pytest.mark.slow
def test_cnn_every_cfg_same_as_stitch_by_stitch_with_amp(digits_loader):
    cfg = parse_stitch_config({"anchors": ["resnet18", "resnet50"], "num_classes": 10})
    torch.manual_seed(0)
    model = build_snnet(cfg, pretrained=False, num_classes=10)
    loader = [(x[:16], y[:16]) for x, y in digits_loader][:2]
    one_by_one, tree, _ = tree_vs_one_by_one(model, loader, amp=torch.bfloat16)
    assert len(tree) == 10
    assert_same(one_by_one, tree)


@pytest.mark.slow
def test_trie_computes_each_distinct_prefix_once():
    cfg = parse_stitch_config({"anchors": ["deit_tiny_patch16_224", "deit_small_patch16_224",
                                           "deit_base_patch16_224"]})
    model = build_snnet(cfg, pretrained=False, img_size=32, patch_size=8, weight_init="skip")  # costs only
    tree = RouteTree({c: model.routes[c] for c in range(model.num_configs)})
    naive = sum(len(r) for r in model.routes)
    unique = tree.unique_steps()
    assert len(unique) == 599 and naive == 1133  # about half of the steps are shared prefixes
    # every distinct prefix of every route is exactly one trie node
    prefixes = {tuple(r[:i + 1]) for r in model.routes for i in range(len(r))}
    assert len(unique) == len(prefixes)


@pytest.mark.slow
def test_unit_sums_equal_full_trace_for_every_deit_cfg():
    """FLOPs from per-unit traces (one trace per distinct unit) equal a whole-route trace, for all 71 cfgs. The
    anchors at an eighth of their widths (heads of 8 channels): the same plan and units, without allocating DeiT-B."""
    cfg = parse_stitch_config({"anchors": [{"name": f"deit_{size}_patch16_224", "model_kwargs": {"embed_dim": width}}
                                           for size, width in (("tiny", 24), ("small", 48), ("base", 96))]})
    model = build_snnet(cfg, pretrained=False, img_size=32, patch_size=8, weight_init="skip")  # costs only
    table = measure(model, 32)
    for c in range(model.num_configs):
        assert table.route_flops(model.routes[c]) == trace_route_flops(model, c, 32), c
