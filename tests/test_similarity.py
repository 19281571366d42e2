"""Compatibility maps: the CKA estimators (snnet/stitching/cka.py), the least-squares stitches and KL of
snnet/explore/similarity.py across families (tiny random ViT and ResNet), and `snnet similarity` on tiny models."""
import itertools
import json
import math
import re

import pytest
import torch
from helpers import run_cli

from snnet.explore.similarity import build_anchors
from snnet.stitching.cka import MinibatchCKA, _HsicTerms, _rows, gram
from snnet.stitching.config import parse_stitch_config
from snnet.stitching.cut import CutStitch, why_not_stitchable
from snnet.stitching.maps import compatibility_maps
from snnet.stitching.model import ComposedNet
from snnet.stitching.plan import Composition, Segment

VIT = {"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 2, "embed_dim": 16,
                                                         "num_heads": 2}}


# the references MinibatchCKA is checked against
def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Biased full-batch linear CKA of X (n, p) and Y (n, q), float64, on column-centred X and Y:
    ``||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F)``, through the n x n Gram matrices when that is smaller; 0 when either
    side is constant."""
    X, Y = _rows(X), _rows(Y)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"CKA needs the same samples on both sides: {X.shape[0]} vs {Y.shape[0]} rows")
    X, Y = X - X.mean(0), Y - Y.mean(0)
    n, p, q = X.shape[0], X.shape[1], Y.shape[1]
    if p * q + p * p + q * q <= 3 * n * n:  # feature space
        cross, xx, yy = (Y.T @ X).square().sum(), (X.T @ X).square().sum(), (Y.T @ Y).square().sum()
    else:  # the same sums through the Gram matrices
        K, L = X @ X.T, Y @ Y.T
        cross, xx, yy = (K * L).sum(), K.square().sum(), L.square().sum()
    den = math.sqrt(float(xx) * float(yy))
    return float(cross) / den if den > 0 else 0.0


def hsic_unbiased(K, L):
    """Unbiased HSIC₁ of two n x n Gram matrices (n >= 4), as MinibatchCKA sums it per minibatch."""
    return float(_HsicTerms(K).hsic(_HsicTerms(L)))


def minibatch_cka(batches):
    """Unbiased minibatch CKA of paired minibatches (X_b, Y_b)."""
    acc = MinibatchCKA()
    for X, Y in batches:
        acc.add({"x": X, "y": Y}, [("x", "y")])
    return acc.cka("x", "y")


def _pair(n=400, p=12, q=7, noise=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, p, generator=g, dtype=torch.float64)
    Y = X @ torch.randn(p, q, generator=g, dtype=torch.float64) + noise * torch.randn(n, q, generator=g,
                                                                                      dtype=torch.float64)
    return X, Y, g


def _batches(X, Y, size):
    return [(X[i:i + size], Y[i:i + size]) for i in range(0, X.shape[0], size)]


# ------------------------------------------------------------------------------------------------------------ CKA
def test_cka_of_a_representation_with_itself_is_one():
    X, _, _ = _pair()
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert minibatch_cka(_batches(X, X, 50)) == pytest.approx(1.0, abs=1e-12)
    wide = torch.randn(20, 500, dtype=torch.float64)  # p > n: the Gram-matrix path
    assert linear_cka(wide, wide) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariant_to_orthogonal_map_isotropic_scale_and_shift():
    X, Y, g = _pair()
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    moved = 3.7 * X @ Q + torch.randn(12, generator=g, dtype=torch.float64) * 5
    assert linear_cka(moved, Y) == pytest.approx(linear_cka(X, Y), abs=1e-10)
    assert minibatch_cka(_batches(moved, Y, 50)) == pytest.approx(minibatch_cka(_batches(X, Y, 50)), abs=1e-10)
    # a non-isotropic scale is not an invariance: the test can tell
    skew = X * torch.linspace(0.1, 10, 12, dtype=torch.float64)
    assert abs(linear_cka(skew, Y) - linear_cka(X, Y)) > 1e-3


def test_feature_space_and_gram_forms_agree():
    X, Y, _ = _pair(n=30, p=80, q=90)  # p, q > n: Gram path
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    direct = float((Yc.T @ Xc).square().sum() / ((Xc.T @ Xc).norm() * (Yc.T @ Yc).norm()))
    assert linear_cka(X, Y) == pytest.approx(direct, rel=1e-10)
    X, Y, _ = _pair(n=300, p=5, q=4)  # feature-space path
    K, L = gram(X - X.mean(0)), gram(Y - Y.mean(0))
    assert linear_cka(X, Y) == pytest.approx(float((K * L).sum() / (K.norm() * L.norm())), rel=1e-10)


def test_unbiased_hsic_is_the_u_statistic():
    """HSIC₁ equals the U-statistic E[k_ij l_ij] + E[k_ij l_qr] - 2 E[k_ij l_iq] over distinct indices."""
    X, Y, _ = _pair(n=7, p=3, q=2)
    K, L = gram(X), gram(Y)
    n = 7
    t1 = sum(K[i, j] * L[i, j] for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    t2 = sum(K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(range(n), 4)) / math.perm(n, 4)
    t3 = sum(K[i, j] * L[i, q] for i, j, q in itertools.permutations(range(n), 3)) / (n * (n - 1) * (n - 2))
    assert hsic_unbiased(K, L) == pytest.approx(float(t1 + t2 - 2 * t3), rel=1e-9)


def test_unbiased_minibatch_cka_is_about_zero_for_independent_gaussians():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(2000, 50, generator=g, dtype=torch.float64)
    Y = torch.randn(2000, 50, generator=g, dtype=torch.float64)
    batches = _batches(X, Y, 100)
    assert abs(minibatch_cka(batches)) < 0.01
    # the biased estimator on the same minibatches is far from 0: what the unbiased one removes
    biased = sum(linear_cka(x, y) for x, y in batches) / len(batches)
    assert biased > 0.2


def test_minibatch_cka_approximates_the_full_batch():
    X, Y, _ = _pair(n=4000, p=20, q=10, noise=2.0, seed=3)
    full = linear_cka(X, Y)
    assert 0.2 < full < 0.95
    assert minibatch_cka(_batches(X, Y, 500)) == pytest.approx(full, abs=0.02)


def test_minibatch_cka_refuses_tiny_batches():
    acc = MinibatchCKA()
    with pytest.raises(ValueError, match="at least 4"):
        acc.add({"x": torch.randn(3, 2), "y": torch.randn(3, 2)}, [("x", "y")])


# ------------------------------------------------------------------------------------------------- maps, stitches
@pytest.fixture(scope="module")
def vit_resnet():
    torch.manual_seed(0)
    cfg = parse_stitch_config({"anchors": [VIT, "resnet18"]})
    net = build_anchors(cfg, False, 10, 32)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(16, 3, 32, 32, generator=g) for _ in range(3)]
    return net, batches, compatibility_maps(net, batches)


def _rel(pred, target):
    return float((pred.double() - target.double()).norm() / target.double().norm())


@pytest.mark.slow
def test_cut_points_and_stitchability_across_families(vit_resnet):
    net, _, maps = vit_resnet
    vit, res = maps.cuts
    assert [c.name for c in vit] == ["embed", "blocks.0", "blocks.1", "norm", "head"]
    assert (vit[1].layout, vit[1].channels, vit[1].extent, vit[1].prefix) == ("tokens", 16, (64,), 1)
    assert (res[0].name, res[0].layout, res[0].extent, res[0].channels) == ("stem", "nchw", (8, 8), 64)
    assert res[-1].layout == vit[-1].layout == "flat"
    # ViT tokens (8x8 + cls) stitch onto ResNet maps of 8x8 (stem, layer1), not onto layer2's 4x4
    assert why_not_stitchable(vit[1], res[1]) is None
    assert why_not_stitchable(vit[1], res[3]) == "the front outputs 65 tokens but the end takes 4x4"
    assert why_not_stitchable(vit[-1], res[-1]) is None  # logits onto logits
    assert "pooled" in why_not_stitchable(vit[-1], res[1])
    stitchable = {(e[1], e[3]) for e in maps.stitches if e[0] == 0}
    assert stitchable == {(i, j) for i in range(4) for j in range(3)} | {(4, 9)}
    assert math.isnan(maps.ls_residual[(0, 1)][1, 3]) and maps.value("ls_residual", (0, 1, 1, 3)) is None
    assert maps.cka[(0, 1)].shape == (5, 10) and maps.cka[(1, 0)].shape == (10, 5)
    assert torch.allclose(torch.tensor(maps.cka[(0, 1)]), torch.tensor(maps.cka[(1, 0)]).T)


@pytest.mark.parametrize("edge", [(0, 1, 1, 2), (0, 3, 1, 0), (1, 1, 0, 2), (1, 9, 0, 4)],
                         ids=["vit_to_resnet", "vit_norm_to_resnet", "resnet_to_vit_with_cls", "logits"])
def test_ls_stitch_is_the_least_squares_fit_and_its_residual(vit_resnet, edge):
    """The fitted stitch is what torch.linalg.lstsq gives on the same rows, and the reported residual is that of the
    module actually run on the images."""
    net, batches, maps = vit_resnet
    a, i, b, j = edge
    stitch = maps.stitches[edge]
    with torch.no_grad():
        feats = [net.capture(x, {a: {i}, b: {j}}) for x in batches]
        X = torch.cat([f[(a, i)] for f in feats])
        Y = torch.cat([f[(b, j)] for f in feats])
        out = stitch(X)
    assert out.shape == Y.shape
    assert maps.value("ls_residual", edge) == pytest.approx(_rel(out, Y), rel=1e-4, abs=1e-6)
    # the main map against lstsq on the spatial rows (cls dropped from the ViT front; the ResNet's map is NCHW)
    fc, ec = maps.cuts[a][i], maps.cuts[b][j]
    rows = lambda t, c: (t[:, c.prefix:] if c.layout == "tokens" else t.permute(0, 2, 3, 1) if c.layout == "nchw"
                         else t).reshape(-1, c.channels).double()
    Xr, Yr = rows(X, fc), rows(Y, ec)
    Xa = torch.cat([Xr, torch.ones(Xr.shape[0], 1, dtype=torch.float64)], 1)
    ref = torch.linalg.lstsq(Xa, Yr, rcond=1e-5, driver="gelsd").solution  # the maps' cutoff (RCOND on XᵀX)
    pred = rows(out, ec)
    assert _rel(pred, Xa @ ref) < 1e-4
    if ec.prefix:  # ResNet -> ViT: the cls token comes from the pooled ResNet features
        P = X.mean((2, 3)).double()
        Pa = torch.cat([P, torch.ones(P.shape[0], 1, dtype=torch.float64)], 1)
        cls = Pa @ torch.linalg.lstsq(Pa, Y[:, :1].reshape(Y.shape[0], -1).double(), rcond=1e-5,
                                      driver="gelsd").solution
        assert _rel(out[:, 0], cls) < 1e-4


def test_a_stitch_with_no_fewer_unknowns_than_rows_is_left_out_not_scored():
    """On few images a wide unit with few positions gives fewer least-squares rows than its stitch has unknowns:
    any features fit exactly there (residual ~0), so that pair is left out of the maps, the search and the KL, with
    the reason and the fix; a pair with rows to spare is scored."""
    from snnet.explore.similarity import summary
    torch.manual_seed(0)
    net = build_anchors(parse_stitch_config({"anchors": ["resnet18", "resnet18"]}), False, 10, 32)
    maps = compatibility_maps(net, [torch.randn(8, 3, 32, 32)], pairs=[(0, 1)], kl=False)
    unit = {c.name: c.unit for c in maps.cuts[0]}
    wide = (0, unit["layer4.1"], 1, unit["layer4.1"])  # 1x1 positions x 8 images = 8 rows, 513 unknowns
    assert wide not in maps.stitches and maps.value("ls_residual", wide) is None
    assert maps.rows[wide] == 8 and "513 unknowns per output channel and only 8 rows" in maps.reasons[wide]
    early = (0, unit["stem"], 1, unit["stem"])  # 8x8 positions x 8 images = 512 rows, 65 unknowns
    assert early in maps.stitches and maps.value("ls_residual", early) is not None
    left = sum(1 for e in maps.rows if e not in maps.stitches)
    assert f"({left} more left out: their stitch has as many unknowns as the 8 images give rows" in summary(maps, 1.0)


def test_vit_to_vit_stitch_maps_every_token_by_least_squares():
    """Same family, same prefix: SN-Net's stitch (one linear map for every token, cls included); after the final
    LayerNorm (channels summing to zero) too."""
    torch.manual_seed(0)
    small = {**VIT, "model_kwargs": {**VIT["model_kwargs"], "embed_dim": 8}}
    net = build_anchors(parse_stitch_config({"anchors": [small, VIT]}), False, 10, 32)
    batches = [torch.randn(16, 3, 32, 32) for _ in range(2)]
    maps = compatibility_maps(net, batches, pairs=[(0, 1)], kl=False)
    assert maps.kl is None and maps.pairs == [(0, 1)]
    for edge in [(0, 1, 1, 2), (0, 3, 1, 3)]:  # blocks.0 -> blocks.1, norm -> norm
        stitch = maps.stitches[edge]
        assert stitch.joint and stitch.prefix is None
        with torch.no_grad():
            feats = [net.capture(x, {0: {edge[1]}, 1: {edge[3]}}) for x in batches]
            X, Y = torch.cat([f[(0, edge[1])] for f in feats]), torch.cat([f[(1, edge[3])] for f in feats])
            out = stitch(X)
        Xr = X.reshape(-1, 8).double()
        Xa = torch.cat([Xr, torch.ones(len(Xr), 1, dtype=torch.float64)], 1)
        ref = Xa @ torch.linalg.lstsq(Xa, Y.reshape(-1, 16).double(), rcond=1e-5, driver="gelsd").solution
        assert _rel(out.reshape(-1, 16), ref) < 1e-4
        assert maps.value("ls_residual", edge) == pytest.approx(_rel(out, Y), rel=1e-4)


def test_kl_is_that_of_the_stitched_network(vit_resnet):
    net, batches, maps = vit_resnet
    edge = (1, 1, 0, 1)  # ResNet up to layer1.0, then the ViT from blocks.1
    comp = Composition((Segment(1, 0, 1), Segment(0, 2, 4)))
    stitched = ComposedNet(list(net.anchors), [comp], {edge: maps.stitches[edge]}, net.names, net.adapters).eval()
    kl, n = 0.0, 0
    with torch.no_grad():
        for x in batches:
            lp = torch.log_softmax(net.anchors[0](x).double(), 1)
            lq = torch.log_softmax(stitched(x, 0).double(), 1)
            kl += float((lp.exp() * (lp - lq)).sum())
            n += x.shape[0]
    assert maps.value("kl", edge) == pytest.approx(kl / n, rel=1e-5, abs=1e-9)
    assert maps.value("kl", (1, 1, 0, 1)) is not None and maps.value("kl", (1, 5, 0, 1)) is None


def test_a_stitch_that_cannot_exist_is_refused(vit_resnet):
    _, _, maps = vit_resnet
    with pytest.raises(ValueError, match=re.escape("unit 'blocks.0' of anchor 0 outputs 65 tokens but unit "
                                                   "'layer3.0' of anchor 1 takes 2x2")):
        CutStitch(maps.cuts[0][1], maps.cuts[1][5])


# ------------------------------------------------------------------------------------------------------- command
_run = run_cli


@pytest.mark.slow
def test_similarity_command_writes_the_maps(digits_folder, tmp_path, capsys):
    out = tmp_path / "maps"
    rc, stdout, err = _run(capsys, "similarity", "--anchors", json.dumps(VIT), "resnet18", "--no-pretrained",
                           "--data", digits_folder, "--img-size", 16, "--batches", 2, "-b", 16, "--out", out,
                           "--device", "cpu")
    assert rc == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cka.png", "kl.png", "ls_residual.png", "similarity.csv",
                                                     "similarity.json"]
    data = json.loads((out / "similarity.json").read_text())
    assert data["images"] == 32 and data["img_size"] == [16, 16]
    # each anchor was fed its own preprocessing (timm's data config of that anchor), and the file says which
    from timm.data import resolve_data_config
    own = [resolve_data_config({"img_size": 16}, model=m) for m in build_anchors(
        parse_stitch_config({"anchors": [VIT, "resnet18"]}), False, 10, 16).anchors]
    assert [a["data_config"]["crop_pct"] for a in data["anchor_specs"]] == [c["crop_pct"] for c in own]
    assert own[0]["crop_pct"] != own[1]["crop_pct"] and [a["img_size"] for a in data["anchors"]] == [[16, 16]] * 2
    assert [p["front"] for p in data["pairs"]] == [0, 1]
    vit_to_res = data["pairs"][0]
    assert len(vit_to_res["cka"]) == 5 and len(vit_to_res["cka"][0]) == 10
    # at 16x16 the ViT has 4x4 tokens: stitchable onto the ResNet's 4x4 stem and layer1, not layer2 (2x2)
    assert vit_to_res["ls_residual"][1][1] is not None and vit_to_res["ls_residual"][1][3] is None
    assert vit_to_res["not_stitchable"]["1,3"] == "the front outputs 17 tokens but the end takes 2x2"
    lines = (out / "similarity.csv").read_text().splitlines()
    assert lines[0].startswith("front,end,front_unit") and len(lines) == 1 + 2 * 5 * 10
    assert "compatibility maps of 2 anchors on 32 images" in stdout
    assert (out / "cka.png").read_bytes()[:4] == b"\x89PNG"
    # the summary lists stitchable positions only, each with its residual, best first
    listed = [line for line in stdout.splitlines() if line.startswith("  ")]
    assert listed and all("LS residual" in line and "no linear stitch" not in line for line in listed)
    first = [line for line in stdout.splitlines() if "->" in line and not line.startswith("  ")][0]
    assert "the best 5 by LS residual" in first
    residuals = [float(line.split("LS residual ")[1].split(",")[0]) for line in listed[:5]]
    assert residuals == sorted(residuals)


def test_heatmap_numbers_and_one_colour_scale():
    """0.00 never stands for a small KL, and every panel of a score shares one scale (the largest over pairs)."""
    import numpy as np

    from snnet.explore.similarity import _scale, number
    assert [number(v) for v in (0.0, 0.5, 1.234e-4, -3e-5, 12.5)] == ["0.00", "0.50", "1.2e-4", "-3.0e-5", "12.50"]
    small, large = np.array([[1e-4, np.nan], [2e-4, 3e-4]]), np.array([[0.5, 0.8]])
    norm = _scale([small, large], "kl")
    assert norm.vmax == 0.8 and norm(0.8) == 1.0 and 0 < norm(2e-4) < norm(0.5)  # log: small values stay visible
    assert _scale([small], "kl").vmax == 3e-4
    assert (_scale([small, large], "cka").vmin, _scale([large], "cka").vmax) == (0, 1)


@pytest.mark.parametrize("argv,needles", [
    (["--anchors", "deit_tinyy_patch16_224", "resnet18"], ["deit_tinyy_patch16_224", "did you mean"]),
    (["--anchors", "resnet18"], ["at least two anchors"]),
    (["--anchors", "resnet18", "resnet18", "--stitch_config", "x.json"], ["--anchors", "--stitch_config"]),
    (["--anchors", "{bad json", "resnet18"], ["not a JSON object"]),
], ids=["unknown_anchor", "one_anchor", "both_anchor_sources", "bad_json_anchor"])
def test_similarity_refuses_bad_anchors(digits_folder, tmp_path, capsys, argv, needles):
    out = tmp_path / "maps"
    rc, _, err = _run(capsys, "similarity", *argv, "--no-pretrained", "--data", digits_folder, "--out", out)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()


def test_similarity_refuses_a_data_folder_without_images(tmp_path, capsys):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "train" / "cat" / "notes.txt").write_text("no image here")
    rc, _, err = _run(capsys, "similarity", "--anchors", "resnet18", "resnet18", "--no-pretrained", "--data",
                      tmp_path / "data", "--out", tmp_path / "maps")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "no images" in lines[0], err
    assert not (tmp_path / "maps").exists()
