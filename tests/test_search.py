"""`snnet search`: StitchNet's options on synthetic compatibility maps (against an exhaustive depth-first reference),
and the command end to end on tiny random anchors of two families, whose networks are then evaluated again
independently (accuracy by a plain loop, FLOPs by tracing each whole network, the stitches against lstsq)."""
import json
import random
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from helpers import open_data, trace_route_flops
from torch import nn

from snnet import cli
from snnet.explore.search import SearchOptions, beam_search
from snnet.explore.similarity import calibration_batches
from snnet.results.records import read_results
from snnet.stitching.build import create_anchor
from snnet.stitching.config import AnchorSpec
from snnet.stitching.cut import CutStitch, cut_points
from snnet.stitching.maps import CompatibilityMaps
from snnet.stitching.model import ComposedNet
from snnet.stitching.plan import Composition, Segment
from snnet.utils.checkpoint import save_checkpoint


# ------------------------------------------------------------------------------------------------ synthetic maps
def _maps(counts, seed=0, missing=0.2):
    """Maps over anchors with `counts` units: random CKA in [0.4, 1]; a share of the edges has no stitch."""
    rng = random.Random(seed)
    n = len(counts)
    pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
    cka, stitches = {}, {}
    for a, b in pairs:
        cka[(a, b)] = np.array([[rng.uniform(0.4, 1.0) for _ in range(counts[b])] for _ in range(counts[a])])
        for i in range(counts[a]):
            for j in range(counts[b]):
                if rng.random() > missing:
                    stitches[(a, i, b, j)] = nn.Identity()
    cuts = [[None] * c for c in counts]
    return CompatibilityMaps([f"m{a}" for a in range(n)], cuts, pairs, cka, {}, None, {}, stitches)


def _score(maps, edge):
    return float(maps.cka[(edge[0], edge[2])][edge[1], edge[3]]) if edge in maps.stitches else None


def _exhaustive(maps, counts, options):
    """StitchNet's depth-first search with K=None, written out directly: every path, no beam."""
    found = {}

    def grow(segments, anchor, first, used, total):
        last = counts[anchor] - 1
        if segments and not any((anchor, u) in used for u in range(first, last + 1)):
            found[Composition(tuple(segments) + (Segment(anchor, first, last),))] = total
        if len(segments) + 1 >= options.max_depth:
            return
        for i in range(first, last):
            if any((anchor, u) in used for u in range(first, i + 1)):
                break
            for c in range(len(counts)):
                for k in range(counts[c] - 1):
                    s = _score(maps, (anchor, i, c, k))
                    if c == anchor or (c, k + 1) in used or s is None or s <= options.threshold or \
                            total * s < options.total_threshold:
                        continue
                    grow(segments + [Segment(anchor, first, i)], c, k + 1,
                         used | {(anchor, u) for u in range(first, i + 1)}, total * s)

    for a in range(len(counts)):
        grow([], a, 0, frozenset(), 1.0)
    return found


@pytest.mark.parametrize("threshold,total,depth", [(0.7, 0.3, 4), (0.9, 0.5, 10), (0.5, 0.8, 3), (0.0, 0.0, 3)])
def test_unbounded_beam_finds_exactly_every_qualifying_path(threshold, total, depth):
    counts = [4, 5, 3]
    maps = _maps(counts, seed=int(threshold * 10 + depth))
    options = SearchOptions(threshold, total, depth, beam_width=0)
    found = dict(beam_search(maps, options))
    expected = _exhaustive(maps, counts, options)
    assert found.keys() == expected.keys() and len(found) > 0
    for comp, score in found.items():
        assert score == pytest.approx(expected[comp])
        scores = [_score(maps, e) for e in comp.edges]
        assert all(s > threshold for s in scores) and np.prod(scores) >= total
        assert score == pytest.approx(float(np.prod(scores)))
        assert 2 <= len(comp.segments) <= depth
        comp.check(counts)
        ran = [(s.anchor, u) for s in comp.segments for u in range(s.first, s.last + 1)]
        assert len(ran) == len(set(ran))  # no unit runs twice
        assert all(s.anchor != t.anchor for s, t in zip(comp.segments, comp.segments[1:]))


def test_thresholds_and_depth_prune():
    counts = [4, 5, 3]
    maps = _maps(counts, seed=7)
    loose = dict(beam_search(maps, SearchOptions(0.5, 0.0, 6, beam_width=0)))
    strict_edge = dict(beam_search(maps, SearchOptions(0.8, 0.0, 6, beam_width=0)))
    strict_total = dict(beam_search(maps, SearchOptions(0.5, 0.7, 6, beam_width=0)))
    shallow = dict(beam_search(maps, SearchOptions(0.5, 0.0, 2, beam_width=0)))
    assert set(strict_edge) < set(loose) and set(strict_total) < set(loose) and set(shallow) < set(loose)
    assert all(len(c.segments) == 2 for c in shallow)
    assert max(len(c.segments) for c in loose) > 2


def test_beam_width_bounds_and_orders_the_search():
    counts = [4, 5, 3]
    maps = _maps(counts, seed=3, missing=0.0)
    one = beam_search(maps, SearchOptions(0.0, 0.0, 4, beam_width=1))
    assert beam_search(maps, SearchOptions(0.0, 0.0, 4, beam_width=1)) == one  # deterministic
    assert 1 <= len(one) <= 3  # one path kept per level: at most one network per depth 2..4
    best_first_edge = max(_score(maps, (a, i, c, k)) for a in range(3) for i in range(counts[a] - 1)
                          for c in range(3) if c != a for k in range(counts[c] - 1))
    two = [(c, s) for c, s in one if len(c.segments) == 2]
    assert two and two[0][1] == pytest.approx(best_first_edge)
    wide = beam_search(maps, SearchOptions(0.0, 0.0, 4, beam_width=5))
    assert len(wide) <= 5 * 3 and [s for _, s in wide] == sorted((s for _, s in wide), reverse=True)


def test_options_refused():
    maps = _maps([3, 3])
    for options, needle in ((SearchOptions(max_depth=1), "--max-depth"), (SearchOptions(score="x"), "--score"),
                            (SearchOptions(beam_width=-1), "--beam-width")):
        with pytest.raises(ValueError, match=needle):
            beam_search(maps, options)


# ------------------------------------------------------------------------------------------------ the command
VIT = lambda w: {"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 2, "embed_dim": w,
                                                                   "num_heads": 2}}


@pytest.fixture(scope="module")
def searched(digits_folder, tmp_path_factory):
    """Two random anchors of two families (a ViT, a ResNet) saved as checkpoints, and `snnet search` on them: every
    network found crosses families (the cls-token bridge in both directions). Searches over more anchors: the
    synthetic tests above and the digits demo (docs/stitch_anything.md)."""
    root = tmp_path_factory.mktemp("search")
    anchors = []
    for i, spec in enumerate([VIT(8), {"name": "resnet18"}]):
        torch.manual_seed(i)
        model = create_anchor(AnchorSpec(spec["name"], None, spec.get("model_kwargs", {})), pretrained=False,
                              num_classes=10, img_size=16)
        path = root / f"anchor{i}.pth.tar"
        save_checkpoint(path, {"state_dict": model.state_dict()})
        anchors.append({**spec, "checkpoint": str(path)})
    config = root / "anchors.json"
    config.write_text(json.dumps({"anchors": anchors, "input_size": 16}))
    out = root / "out"
    rc = cli.main(["search", "--stitch_config", str(config), "--data", str(digits_folder), "--out", str(out),
                   "--batches", "2", "-b", "32", "--threshold", "0", "--total-threshold", "0", "--beam-width", "3",
                   "--max-depth", "3", "--device", "cpu"])
    assert rc == 0
    return config, out


@pytest.mark.slow
def test_search_writes_results_pareto_and_drawings(searched, capsys):
    _, out = searched
    records = read_results(out / "stitches_res.txt")
    spec = json.loads((out / "search.json").read_text())
    assert [r["route"] for r in records[:2]] == ["deit_tiny_patch16_224", "resnet18"]
    found = records[2:]
    assert 3 <= len(found) <= 3 * 2 and all("->" in r["route"] for r in found)  # beam 3, depths 2 and 3
    assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)
    assert all({s[0] for s in r["segments"]} == {0, 1} for r in found)
    assert any(len(r["segments"]) == 3 for r in found)  # ViT -> ResNet -> ViT: the cls bridge both ways
    assert len(spec["networks"]) == len(records) and spec["options"]["beam_width"] == 3
    for name in ("pareto_flops.md", "pareto_flops.json", "pareto_flops.png", "stitches.safetensors",
                 "similarity/similarity.json", "similarity/cka.png"):
        assert (out / name).is_file(), name
    for r in records:
        svg = ET.fromstring((out / "networks" / f"cfg_{r['cfg_id']:03d}.svg").read_text())
        rects = [e.get("class") for e in svg.iter("{http://www.w3.org/2000/svg}rect")]
        assert rects.count("segment") == len(r["segments"]) and rects.count("stitch") == len(r["segments"]) - 1
    capsys.readouterr()
    rc = cli.main(["pareto", str(out / "stitches_res.txt")])  # snnet pareto reads it
    text = capsys.readouterr().out
    assert rc == 0 and "on the flops Pareto front (anchors: cfg 0, 1;" in text


@torch.no_grad()
@pytest.mark.slow
def test_found_networks_verified_by_an_independent_evaluation(searched, digits_folder):
    """Rebuild every network from search.json and stitches.safetensors, then check: each stitch is the lstsq fit on
    the calibration images (each anchor's features on its own preprocessing of them), top-1 from a plain loop over
    the validation images preprocessed as the network's front anchor's own data config, FLOPs from tracing the
    whole network, params of the anchors from the models."""
    from safetensors.torch import load_file
    from timm.data import create_dataset, create_transform, resolve_data_config
    config, out = searched
    spec = json.loads((out / "search.json").read_text())
    records = {r["cfg_id"]: r for r in read_results(out / "stitches_res.txt")}
    models = [create_anchor(AnchorSpec(a["name"], a["checkpoint"], a["model_kwargs"]), pretrained=False,
                            num_classes=10, img_size=16).eval() for a in spec["anchors"]]
    base = ComposedNet(models, [], {}).eval()
    # each anchor's own preprocessing, straight from timm (the two differ: crop_pct 0.9 vs 0.95 resize differently)
    own = [resolve_data_config({"img_size": 16}, model=m) for m in models]
    assert [a["data_config"]["crop_pct"] for a in spec["anchors"]] == [c["crop_pct"] for c in own]
    # the calibration images the search drew (same seed and draw), each anchor's own way, and the stitches it saved
    _, train, _ = open_data(str(digits_folder), True)
    images = [calibration_batches(train, own[a], 2, 32, spec["seed"]) for a in range(2)]
    feats = [{k: v for a in range(2) for k, v in
              base.capture(images[a][n], {a: set(range(len(base.units[a])))}).items()} for n in range(2)]
    cuts = cut_points(base, feats[0])
    state = load_file(str(out / "stitches.safetensors"))
    stitches = {}
    for idx, (a, i, b, j) in enumerate(map(tuple, spec["edges"])):
        st = CutStitch(cuts[a][i], cuts[b][j])
        st.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == str(idx)})
        stitches[(a, i, b, j)] = st.eval()
        X = torch.cat([f[(a, i)] for f in feats])
        Y = torch.cat([f[(b, j)] for f in feats])
        # ViT tokens (cls dropped) or ResNet maps (NCHW) as rows of channels, one per image and position
        rows = lambda t, c: (t[:, c.prefix:] if c.layout == "tokens" else t.permute(0, 2, 3, 1)).reshape(
            -1, c.channels).double()
        Xr, Yr, out_r = rows(X, cuts[a][i]), rows(Y, cuts[b][j]), rows(st(X), cuts[b][j])
        Xa = torch.cat([Xr, torch.ones(len(Xr), 1, dtype=torch.float64)], 1)
        # SVD least squares, singular values below 1e-5 of the largest cut (the maps' RCOND on [X|1]ᵀ[X|1])
        best = Xa @ torch.linalg.lstsq(Xa, Yr, rcond=1e-5, driver="gelsd").solution
        assert float((out_r - best).norm() / best.norm()) < 1e-4
    xs = []  # per anchor: the validation images as its own data config preprocesses them
    for cfg in own:
        val = create_dataset("", root=str(digits_folder / "val"), transform=create_transform(**{
            k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")}))
        xs.append(torch.stack([val[n][0] for n in range(len(val))]))
        ys = torch.tensor([val[n][1] for n in range(len(val))])
    assert not torch.equal(xs[0], xs[1])
    for entry in spec["networks"]:
        comp = Composition(tuple(Segment(*s) for s in entry["segments"]))
        net = ComposedNet(models, [comp], {e: stitches[e] for e in comp.edges}).eval()
        rec = records[entry["cfg_id"]]
        x = xs[comp.segments[0].anchor]  # a network reads its front anchor's preprocessing
        correct = sum(int((net(x[n:n + 7], 0).argmax(1) == ys[n:n + 7]).sum()) for n in range(0, len(x), 7))
        assert rec["acc1"] == pytest.approx(100.0 * correct / len(ys), abs=1e-9), entry["route"]
        assert rec["samples"] == len(ys)
        assert rec["flops"] == trace_route_flops(net, 0, img_size=16), entry["route"]
        if comp.is_anchor:
            assert rec["params"] == sum(p.numel() for p in models[comp.segments[0].anchor].parameters())
