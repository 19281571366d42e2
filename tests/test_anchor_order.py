"""Anchor order never changes a number.

Two anchors of two families with different preprocessing (a ResNet with ImageNet's mean/std, a ViT with mean/std
0.5), trained briefly on digits, each on its own normalisation. `snnet search` (which computes the compatibility
maps: CKA, least-squares residual and KL, then evaluates the anchors and every 2-segment network in one pass) runs
with the anchors in both orders [A, B] and [B, A]: the maps must be the same up to the transposed pair indices, and
every network's top-1 exactly the same. Each anchor's top-1 must equal its own evaluation alone, by a plain loop over
the validation images preprocessed with that anchor's own data config (timm's resolve_data_config on it).

Before per-anchor preprocessing, every anchor read the last anchor's data config: these three tests failed (the
ResNet's top-1 and loss depended on which anchor came last, and so did the maps).

Then the mechanism in-process, on the same two families with random weights: grouping equal data configs, the maps
on per-anchor inputs in both orders at full precision, and the one-pass evaluator (`RouteTree.run` with one input
per root) against route-by-route runs on each route's front anchor's input.
"""
import json
import math

import numpy as np
import pytest
import torch

from snnet import cli
from snnet.results.records import read_results
from snnet.stitching.build import create_anchor
from snnet.stitching.config import AnchorSpec
from snnet.stitching.maps import anchors_net, compatibility_maps
from snnet.stitching.model import ComposedNet
from snnet.stitching.plan import Composition, Segment
from snnet.stitching.route_tree import RouteTree
from snnet.utils.checkpoint import save_checkpoint

IMG = 16
RESNET = {"name": "resnet18", "model_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}}
VIT = {"name": "deit_tiny_patch16_224", "model_kwargs": {
    "patch_size": 4, "depth": 2, "embed_dim": 16, "num_heads": 2,
    # another normalisation than the ResNet's (timm's pretrained_cfg is the data config resolve_data_config reads)
    "pretrained_cfg_overlay": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 1.0}}}


def _own_config(model):
    from timm.data import resolve_data_config
    return resolve_data_config({"img_size": IMG}, model=model)


def _train(model, images, labels, steps, seed=0):
    """A few Adam steps on the digits (in [-1, 1]) normalised as the model's own data config says."""
    cfg = _own_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    x = ((images + 1) / 2 - mean) / std
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def searched(digits_images, digits_folder, tmp_path_factory):
    """`snnet search` with the anchors in both orders; returns {order: (out dir, anchors)}."""
    root = tmp_path_factory.mktemp("order")
    x, y = digits_images
    x = torch.nn.functional.interpolate(x[300:], size=IMG, mode="nearest")  # not the folder's val images (0..59)
    anchors = {}
    for i, (key, spec, steps) in enumerate((("resnet", RESNET, 50), ("vit", VIT, 400))):
        torch.manual_seed(i)
        model = create_anchor(AnchorSpec(spec["name"], None, spec["model_kwargs"]), pretrained=False,
                              num_classes=10, img_size=IMG)
        _train(model, x, y[300:], steps, seed=i)
        path = root / f"{key}.pth.tar"
        save_checkpoint(path, {"state_dict": model.state_dict()})
        anchors[key] = {**spec, "checkpoint": str(path)}
    out = {}
    for order in (("resnet", "vit"), ("vit", "resnet")):
        config = root / f"{'_'.join(order)}.json"
        config.write_text(json.dumps({"anchors": [anchors[k] for k in order], "input_size": IMG}))
        out[order] = root / "_".join(order)
        rc = cli.main(["search", "--stitch_config", str(config), "--data", str(digits_folder), "--out",
                       str(out[order]), "--score", "kl", "--threshold", "0", "--total-threshold", "0",
                       "--max-depth", "2", "--beam-width", "0", "--batches", "2", "-b", "32", "--device", "cpu"])
        assert rc == 0
    return out, anchors


def _maps_by_label(out):
    data = json.loads((out / "similarity" / "similarity.json").read_text())
    units = {a["label"]: a["units"] for a in data["anchors"]}
    return units, {(p["front_label"], p["end_label"]): p for p in data["pairs"]}


@pytest.mark.slow
def test_maps_do_not_depend_on_anchor_order(searched):
    out, _ = searched
    units_ab, ab = _maps_by_label(out[("resnet", "vit")])
    units_ba, ba = _maps_by_label(out[("vit", "resnet")])
    assert units_ab == units_ba and ab.keys() == ba.keys() and len(ab) == 2
    compared = 0
    for pair, p in ab.items():
        q = ba[pair]
        assert p["not_stitchable"] == q["not_stitchable"], pair
        for kind in ("cka", "ls_residual", "kl"):
            for row_p, row_q in zip(p[kind], q[kind], strict=True):
                for u, v in zip(row_p, row_q, strict=True):
                    assert (u is None) == (v is None), (pair, kind)
                    if u is not None:  # the files round to 6 decimals
                        assert u == pytest.approx(v, abs=2e-6), (pair, kind)
                        compared += 1
    assert compared > 60


@pytest.mark.slow
def test_every_network_evaluates_the_same_in_both_orders(searched):
    out, _ = searched
    ab = {r["route"]: r for r in read_results(out[("resnet", "vit")] / "stitches_res.txt")}
    ba = {r["route"]: r for r in read_results(out[("vit", "resnet")] / "stitches_res.txt")}
    assert ab.keys() == ba.keys() and len(ab) > 10
    assert {"resnet18", "deit_tiny_patch16_224"} <= ab.keys()
    for route, r in ab.items():
        s = ba[route]
        assert (r["acc1"], r["acc5"], r["samples"], r["flops"], r["params"]) == \
               (s["acc1"], s["acc5"], s["samples"], s["flops"], s["params"]), route
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-6, abs=1e-7), route
        if r["score"] is not None:
            assert r["score"] == pytest.approx(s["score"], rel=1e-6, abs=1e-9), route


@torch.no_grad()
@pytest.mark.slow
def test_each_anchor_scores_as_it_does_alone_with_its_own_data_config(searched, digits_folder):
    from timm.data import create_dataset, create_transform
    out, anchors = searched
    for key, name in (("resnet", "resnet18"), ("vit", "deit_tiny_patch16_224")):
        spec = anchors[key]
        model = create_anchor(AnchorSpec(spec["name"], spec["checkpoint"], spec["model_kwargs"]), pretrained=False,
                              num_classes=10, img_size=IMG).eval()
        cfg = _own_config(model)
        val = create_dataset("", root=str(digits_folder / "val"), transform=create_transform(**{
            k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}))
        xs = torch.stack([val[n][0] for n in range(len(val))])
        ys = torch.tensor([val[n][1] for n in range(len(val))])
        logits = model(xs)
        acc1 = 100.0 * int((logits.argmax(1) == ys).sum()) / len(ys)
        loss = float(torch.nn.functional.cross_entropy(logits.double(), ys))
        assert acc1 > 30  # trained: the comparison below can tell preprocessings apart
        for order in out:
            rec = {r["route"]: r for r in read_results(out[order] / "stitches_res.txt")}[name]
            assert rec["acc1"] == pytest.approx(acc1, abs=1e-9), (order, name)
            assert rec["loss"] == pytest.approx(loss, rel=1e-5), (order, name)
            assert math.isfinite(rec["loss"]) and rec["samples"] == len(ys)


# ------------------------------------------------------------------------------------------ the mechanism, in-process
@pytest.fixture(scope="module")
def random_anchors():
    """The two anchors with random weights (seeded), their adapters and per-anchor preprocessing."""
    from snnet.data.transforms import anchor_data_configs
    from snnet.stitching.adapter import adapter_for
    models = []
    for i, spec in enumerate((RESNET, VIT)):
        torch.manual_seed(10 + i)
        models.append(create_anchor(AnchorSpec(spec["name"], None, spec["model_kwargs"]), pretrained=False,
                                    num_classes=10, img_size=IMG).eval())
    names = ["resnet18", "deit_tiny_patch16_224"]
    return models, [adapter_for(m, n) for m, n in zip(models, names)], names, anchor_data_configs(
        models, {"img_size": IMG})


def test_equal_data_configs_share_one_input(random_anchors):
    from snnet.data.transforms import anchor_data_configs, group_data_configs
    models, _, _, (per_anchor, distinct, group) = random_anchors
    assert tuple(per_anchor[1]["mean"]) == (0.5, 0.5, 0.5) != tuple(per_anchor[0]["mean"])
    assert group == [0, 1] and distinct == per_anchor
    # a JSON overlay gives lists where timm gives tuples: still one config
    same = dict(per_anchor[0], mean=list(per_anchor[0]["mean"]), input_size=list(per_anchor[0]["input_size"]))
    assert group_data_configs([per_anchor[1], per_anchor[0], same]) == ([per_anchor[1], per_anchor[0]], [0, 1, 1])
    assert anchor_data_configs([models[0], models[0]], {"img_size": IMG})[1:] == ([per_anchor[0]], [0, 0])


@torch.no_grad()
def test_maps_with_per_anchor_inputs_are_the_same_in_both_orders(random_anchors):
    """Full precision (the files round): each anchor captured on its own input, in both orders."""
    models, adapters, names, _ = random_anchors
    g = torch.Generator().manual_seed(0)
    raw = [torch.rand(16, 3, IMG, IMG, generator=g) for _ in range(2)]
    own = [lambda x: (x - 0.45) / 0.23, lambda x: (x - 0.5) / 0.5]  # the anchors' different normalisations
    ab = anchors_net(models, adapters, names, [0, 1])
    ba = anchors_net(models[::-1], adapters[::-1], names[::-1], [1, 0])  # groups need not follow the anchor order
    m_ab = compatibility_maps(ab, [[own[0](x), own[1](x)] for x in raw])
    m_ba = compatibility_maps(ba, [[own[0](x), own[1](x)] for x in raw])
    one = compatibility_maps(ab, [own[1](x) for x in raw])  # the old way: both anchors read one preprocessing
    moved = {}
    for kind in ("cka", "ls_residual", "kl"):
        for a, b in ((0, 1), (1, 0)):
            x, y = getattr(m_ab, kind)[(a, b)], getattr(m_ba, kind)[(1 - a, 1 - b)]
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-9, equal_nan=True, err_msg=f"{kind} {a}->{b}")
        moved[kind] = float(np.nanmax(np.abs(getattr(one, kind)[(1, 0)] - getattr(m_ab, kind)[(1, 0)])))
    assert max(moved.values()) > 1e-2, moved  # the input matters: the comparison above can tell
    assert m_ab.input_sizes == [(IMG, IMG)] * 2 and m_ab.img_size == (IMG, IMG)
    # a stitched network reads its front anchor's input
    edge = next(e for e in m_ab.stitches if e[0] == 0 and e[1] > 0)
    comp = Composition((Segment(0, 0, edge[1]), Segment(1, edge[3] + 1, len(ab.units[1]) - 1)))
    net = ComposedNet(models, [comp], {edge: m_ab.stitches[edge]}, names, adapters, [0, 1]).eval()
    x = [own[0](raw[0]), own[1](raw[0])]
    assert torch.equal(net(x, 0), net(x[0], 0)) and not torch.equal(net(x, 0), net(x[1], 0))


@torch.no_grad()
def test_one_pass_evaluator_feeds_each_root_its_own_input(random_anchors):
    """evaluate_stitches on per-group batches: the trie (one input per root), route by route, and a plain loop on
    the front anchor's input agree exactly; a single tensor still feeds every route."""
    from snnet.train.evaluator import evaluate_stitches
    models, adapters, names, _ = random_anchors
    g = torch.Generator().manual_seed(1)
    raw = torch.rand(48, 3, IMG, IMG, generator=g)
    ys = torch.randint(0, 10, (48,), generator=g)
    own = [(raw - 0.45) / 0.23, (raw - 0.5) / 0.5]
    base = anchors_net(models, adapters, names, [0, 1])
    maps = compatibility_maps(base, [[own[0][:24], own[1][:24]], [own[0][24:], own[1][24:]]], kl=False)
    last = [len(u) - 1 for u in base.units]
    comps = list(base.compositions) + [Composition((Segment(a, 0, i), Segment(b, j + 1, last[b])))
                                       for a, i, b, j in list(maps.stitches)[::7] if i < last[a] and j < last[b]]
    edges = {e for c in comps for e in c.edges}
    net = ComposedNet(models, comps, {e: maps.stitches[e] for e in edges}, names, adapters, [0, 1]).eval()
    assert {c.segments[0].anchor for c in comps} == {0, 1} and len(comps) > 4
    loader = [([own[0][n:n + 16], own[1][n:n + 16]], ys[n:n + 16]) for n in range(0, 48, 16)]
    ids = list(range(net.num_configs))
    cpu = torch.device("cpu")
    tree = evaluate_stitches(net, loader, ids, cpu)
    one_by_one = {c: evaluate_stitches(net, loader, [c], cpu)[c] for c in ids}  # each route from its input
    for c, comp in enumerate(comps):
        logits = net.run_steps(net.routes[c], own[comp.segments[0].anchor])
        acc1 = 100.0 * int((logits.argmax(1) == ys).sum()) / len(ys)
        loss = float(torch.nn.functional.cross_entropy(logits.double(), ys))
        assert tree[c]["acc1"] == one_by_one[c]["acc1"] == acc1, c
        assert tree[c]["loss"] == pytest.approx(loss, rel=1e-5) and one_by_one[c]["loss"] == pytest.approx(loss,
                                                                                                          rel=1e-5)
    # RouteTree.run: per-root inputs as a mapping; one tensor for all
    rt = RouteTree({c: net.routes[c] for c in ids})
    assert sorted(rt.roots()) == [("unit", 0, 0), ("unit", 1, 0)]
    got = {}
    rt.run(net.run_step, {("unit", a, 0): own[a][:8] for a in (0, 1)}, lambda c, out: got.setdefault(c, out))
    for c, comp in enumerate(comps):
        assert torch.equal(got[c], net.run_steps(net.routes[c], own[comp.segments[0].anchor][:8])), c
    rt.run(net.run_step, own[1][:8], lambda c, out: got.__setitem__(c, out))
    assert all(torch.equal(got[c], net.run_steps(net.routes[c], own[1][:8])) for c in ids)


@torch.no_grad()
def test_search_prices_each_anchor_at_its_own_input_size(random_anchors):
    """Anchors whose own input sizes differ (the ResNet at 32x32, the ViT at 16x16): the maps record each size, and
    every network's FLOPs (units at their anchor's size, stitches on the front's output) equal a trace of the whole
    network on its front anchor's input."""
    from helpers import trace_route_flops

    from snnet.explore.search import network_flops
    models, adapters, names, _ = random_anchors
    g = torch.Generator().manual_seed(2)
    big, small = torch.rand(8, 3, 32, 32, generator=g), torch.rand(8, 3, IMG, IMG, generator=g)
    base = anchors_net(models, adapters, names, [0, 1])
    maps = compatibility_maps(base, [[big, small]], kl=False)
    assert maps.input_sizes == [(32, 32), (IMG, IMG)] and maps.img_size is None
    last = [len(u) - 1 for u in base.units]
    edges = [e for e in maps.stitches if e[1] < last[e[0]] and e[3] < last[e[2]]]
    picked = [next(e for e in edges if e[0] == a) for a in (0, 1)]  # one each way
    comps = list(base.compositions) + [Composition((Segment(a, 0, i), Segment(b, j + 1, last[b])))
                                       for a, i, b, j in picked]
    net = ComposedNet(models, comps, {e: maps.stitches[e] for e in picked}, names, adapters, [0, 1]).eval()
    flops = network_flops(net, [(32, 32), (IMG, IMG)])
    for c, comp in enumerate(comps):
        size = 32 if comp.segments[0].anchor == 0 else IMG
        assert flops[c] == trace_route_flops(net, c, img_size=size), net.describe(c)
    assert flops[0] > trace_route_flops(net, 0, img_size=IMG)  # one size for all would price the ResNet at 16x16
