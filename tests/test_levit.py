"""LeViT-192/256 against SN-Net's published numbers and checkpoint layout (docs/snnet_compat.md, C10, C29, C33); any
LeViT depth; the two distillation heads; refusals."""
import statistics

import pytest
import timm
import torch
from helpers import trace_route_flops

from snnet import AnchorError, SNNet, build_snnet, load_stitch_config, plan_for
from snnet.stitching.adapter import adapter_for
from snnet.stitching.build import check_resolutions
from snnet.stitching.cost import measure
from snnet.stitching.ls_init import ls_init, stitch_errors
from stitching_levit import ours_to_snnet, snnet_to_ours
from stitching_levit.convert import flat_layout

NAMES = ["levit_192", "levit_256"]
WIDTHS = [[192, 288, 384], [256, 384, 512]]
HEADS = [[3, 5, 6], [4, 6, 8]]
TOKENS = [196, 49, 16]  # per stage at 224 px
KD = 32  # key dim


# --- analytic oracle (docs/snnet_compat.md, C33) ---------------------------------------------------------------------
def linear_bn(n, cin, cout):
    return n * cin * cout + 2 * n * cout


def mlp(n, c):
    return linear_bn(n, c, 2 * c) + linear_bn(n, 2 * c, c)


def block(a, s):
    n, c, h, d = TOKENS[s], WIDTHS[a][s], HEADS[a][s], 2 * KD  # attention ratio 2
    return linear_bn(n, c, h * (2 * KD + d)) + h * n * n * KD + h * n * n * d + linear_bn(n, h * d, c) + mlp(n, c)


def subsample(a, s):
    """Attention-subsample + MLP from stage s-1 into stage s: queries on the strided grid, keys on the full one."""
    nk, nq, cin, cout = TOKENS[s - 1], TOKENS[s], WIDTHS[a][s - 1], WIDTHS[a][s]
    h, d = cin // KD, 4 * KD
    return (linear_bn(nk, cin, h * (KD + d)) + linear_bn(nq, cin, h * KD) + h * nq * nk * KD + h * nq * nk * d
            + linear_bn(nq, h * d, cout) + mlp(nq, cout))


def stem(a):
    c = WIDTHS[a][0]
    return sum(h * h * cout * cin * 9 + 2 * h * h * cout
               for h, cin, cout in ((112, 3, c // 8), (56, c // 8, c // 4), (28, c // 4, c // 2), (14, c // 2, c)))


def head(a):
    return 2 * (2 * WIDTHS[a][2] + 1000 * WIDTHS[a][2])  # head and head_dist, BN + Linear each


def snnet_flops(route):
    def upto(a, s, j):  # stem .. block j of stage s
        return stem(a) + sum(4 * block(a, t) + subsample(a, t + 1) for t in range(s)) + (j + 1) * block(a, s)

    def after(a, s, k):  # block k of stage s .. head
        return ((4 - k) * block(a, s) + sum(subsample(a, t) + 4 * block(a, t) for t in range(s + 1, 3)) + head(a))

    if route.is_anchor:
        return upto(route.anchors[0], 0, -1) + after(route.anchors[0], 0, 0)
    st = route.stitches[0]
    cross = TOKENS[st.stage] * WIDTHS[st.front][st.stage] * WIDTHS[st.end][st.stage]
    return upto(st.front, st.stage, st.j) + cross + after(st.end, st.stage, st.k)


@pytest.fixture(scope="module")
def levit224():
    model = build_snnet(load_stitch_config("configs/levit_192_256.json"), pretrained=False)
    return model, measure(model, 224)


@pytest.mark.slow
def test_config_builds_8_in_snnet_order(levit224):
    model, _ = levit224
    rows = [(r.stitches[0].stage, r.stitches[0].position, r.stitches[0].layer) for r in model.plan.routes[2:]]
    assert model.num_configs == 8 and rows == [(s, (i, i + 1), (s, 0, i)) for s in (0, 1) for i in range(3)]


def test_published_flops(levit224):
    model, table = levit224
    flops = [table.route_flops(steps) for steps in model.routes]
    assert flops[:5] == [661663808, 1133412864, 1020918272, 977741824, 934565376]  # docs/snnet_compat.md, C33
    assert round(flops[7] / 1e9, 3) == 0.770 and round(max(flops[2:]) / 1e9, 3) == 1.021


def test_every_cfg_flops_equal_snnet(levit224):
    model, table = levit224
    for route in model.plan.routes:
        assert table.route_flops(model.routes[route.cfg_id]) == snnet_flops(route), route.cfg_id


@pytest.mark.slow
def test_unit_sum_equals_full_trace(levit224):
    model, table = levit224
    for cfg_id in (0, 2, 7):
        assert table.route_flops(model.routes[cfg_id]) == trace_route_flops(model, cfg_id, 224), cfg_id


def test_params_and_stitch_layers(levit224):
    model, _ = levit224
    # computed from the architecture (docs/snnet_compat.md, C33)
    assert [model.params(0), model.params(1)] == [10947069, 18893876]
    assert sum(p.numel() for p in model.parameters()) == 30322097
    assert sum(p.numel() for p in model.stitch_layers.parameters()) == 481152
    sd = model.state_dict()
    assert all(sd[f"stitch_layers.0.0.{i}.transform.weight"].shape == (256, 192) for i in range(3))
    assert all(sd[f"stitch_layers.1.0.{i}.transform.weight"].shape == (384, 288) for i in range(3))


# --- checkpoint compatibility ----------------------------------------------------------------------------------------
def bn_keys(prefix, c):
    return {prefix + "weight": (c,), prefix + "bias": (c,), prefix + "running_mean": (c,), prefix + "running_var": (c,),
            prefix + "num_batches_tracked": ()}


def snnet_levit_state_dict():
    """A synthetic SN-Net LeViT-192/256 checkpoint with the facebookresearch keys and shapes of
    docs/snnet_compat.md, C29."""
    sd = {}
    for a in range(2):
        p, w, res = f"anchors.{a}.", WIDTHS[a], [14, 7, 4]
        for i, (cin, cout) in enumerate(((3, w[0] // 8), (w[0] // 8, w[0] // 4), (w[0] // 4, w[0] // 2),
                                         (w[0] // 2, w[0]))):
            sd[f"{p}patch_embed.{2 * i}.c.weight"] = (cout, cin, 3, 3)
            sd.update(bn_keys(f"{p}patch_embed.{2 * i}.bn.", cout))
        for s in range(3):
            c, h, n = w[s], HEADS[a][s], res[s] ** 2
            if s > 0:  # subsample at flat index 10s-2, its MLP at 10s-1
                q, cin, hs = f"{p}blocks.{10 * s - 2}.", w[s - 1], w[s - 1] // KD
                for m, cout, ci in (("kv", hs * (KD + 4 * KD), cin), ("q.1", hs * KD, cin), ("proj.1", c, hs * 4 * KD)):
                    sd[f"{q}{m}.c.weight"] = (cout, ci)
                    sd.update(bn_keys(f"{q}{m}.bn.", cout))
                sd[q + "attention_biases"] = (hs, res[s - 1] ** 2)
                sd[q + "attention_bias_idxs"] = (n, res[s - 1] ** 2)
                mlp_prefixes = [f"{p}blocks.{10 * s - 1}.m."]
            else:
                mlp_prefixes = []
            for b in range(4):
                q = f"{p}blocks.{10 * s + 2 * b}.m."
                sd[q + "qkv.c.weight"] = (h * 4 * KD, c)
                sd.update(bn_keys(q + "qkv.bn.", h * 4 * KD))
                sd[q + "proj.1.c.weight"] = (c, h * 2 * KD)
                sd.update(bn_keys(q + "proj.1.bn.", c))
                sd[q + "attention_biases"], sd[q + "attention_bias_idxs"] = (h, n), (n, n)
                mlp_prefixes.append(f"{p}blocks.{10 * s + 2 * b + 1}.m.")
            for q in mlp_prefixes:
                sd[q + "0.c.weight"], sd[q + "2.c.weight"] = (2 * c, c), (c, 2 * c)
                sd.update(bn_keys(q + "0.bn.", 2 * c))
                sd.update(bn_keys(q + "2.bn.", c))
        for hd in ("head", "head_dist"):
            sd.update(bn_keys(f"{p}{hd}.bn.", w[2]))
            sd[f"{p}{hd}.l.weight"], sd[f"{p}{hd}.l.bias"] = (1000, w[2]), (1000,)
    for s in range(2):
        for layer in range(3):
            sd[f"stitch_layers.{s}.0.{layer}.transform.weight"] = (WIDTHS[1][s], WIDTHS[0][s])
            sd[f"stitch_layers.{s}.0.{layer}.transform.bias"] = (WIDTHS[1][s],)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randint(0, 10, shape) if k.endswith(("idxs", "num_batches_tracked")) else
            torch.randn(shape, generator=g) for k, shape in sd.items()}


def test_snnet_checkpoint_converts_and_loads_strictly(levit224):
    model, _ = levit224
    theirs = snnet_levit_state_dict()
    ours = snnet_to_ours(theirs)
    idxs = [k for k in theirs if k.endswith("attention_bias_idxs")]
    assert len(idxs) == 2 * 14 and len(ours) == len(theirs) - len(idxs)  # 12 attention blocks + 2 subsamples each
    own = model.state_dict()
    assert set(ours) == set(own)
    assert all(ours[k].shape == own[k].shape for k in own)
    model.load_state_dict(ours, strict=True)
    pairs = {"blocks.18.q.1.c.weight": model.anchors[1].stages[2].downsample.attn_downsample.q.ln.linear.weight,
             "blocks.19.m.2.bn.bias": model.anchors[1].stages[2].downsample.mlp.ln2.bn.bias,
             "blocks.12.m.proj.1.c.weight": model.anchors[1].stages[1].blocks[1].attn.proj.ln.linear.weight,
             "blocks.27.m.0.c.weight": model.anchors[1].stages[2].blocks[3].mlp.ln1.linear.weight,
             "patch_embed.6.bn.running_var": model.anchors[1].stem.conv4.bn.running_var,
             "head_dist.l.weight": model.anchors[1].head_dist.linear.weight}
    for key, tensor in pairs.items():
        assert torch.equal(tensor, theirs["anchors.1." + key]), key
    back = ours_to_snnet(ours)
    assert set(back) == set(theirs) - set(idxs) and all(torch.equal(back[k], theirs[k]) for k in back)


def test_key_map_follows_the_depths():
    """SN-Net's flat indices for LeViT-128S (depths 2-3-4): stage 0 at 0..3, subsample 4, MLP 5, stage 1 at 6..11."""
    layout = flat_layout((2, 3, 4))
    assert [t[:2] for t in layout[3:7]] == [("blocks.3.m.", "stages.0.blocks.1.mlp."),
                                           ("blocks.4.", "stages.1.downsample.attn_downsample."),
                                           ("blocks.5.m.", "stages.1.downsample.mlp."),
                                           ("blocks.6.m.", "stages.1.blocks.0.attn.")]
    model = timm.create_model("levit_128s", pretrained=False)
    sd = model.state_dict()
    theirs = ours_to_snnet(sd, depths=(2, 3, 4))
    assert "blocks.12.kv.c.weight" in theirs and "blocks.21.m.2.bn.weight" in theirs and len(theirs) == len(sd)
    assert snnet_to_ours(theirs, depths=(2, 3, 4)).keys() == sd.keys()
    assert snnet_to_ours(theirs).keys() == sd.keys()  # the depths read from the keys
    with pytest.raises(ValueError, match="stage depths 2-3-4, not 4-4-4"):
        snnet_to_ours(theirs, depths=(4, 4, 4))


# --- small images ----------------------------------------------------------------------------------------------------
def snnet_of(names, img_size, **kw):
    torch.manual_seed(0)
    models = [timm.create_model(n, pretrained=False, img_size=img_size, **kw.get(n, {})) for n in names]
    adapters = [adapter_for(m, n) for m, n in zip(models, names)]
    model = SNNet(models, plan_for(models, adapters, names), names=names, adapters=adapters)
    check_resolutions(model, img_size)
    return model


def test_training_returns_both_heads_evaluation_their_mean():
    model = snnet_of(NAMES, 64)
    x = torch.randn(4, 3, 64, 64)
    model.train()
    for cfg_id in (0, 3, 7):
        out = model(x, cfg_id)
        assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape == (4, 1000)
    model.eval()
    with torch.no_grad():
        end = model.anchors[1]
        feats = model.run_steps(model.routes[3][:-1], x)  # everything but the end anchor's head unit
        expected = (end.head(feats.mean(1)) + end.head_dist(feats.mean(1))) / 2
        assert torch.allclose(model(x, 3), expected, atol=1e-5)
        assert torch.allclose(model(x, 1), end(x), atol=1e-5)  # the anchor route is timm's own eval forward


def test_any_depth():
    """LeViT-128S (2-3-4) -> LeViT-128 (4-4-4): units come from the module structure, so unequal depths stitch by
    depth interpolation (SN-Net's LeViT hard-coded 4-4-4)."""
    model = snnet_of(["levit_128s", "levit_128"], 64)
    rows = [(r.stitches[0].stage, r.stitches[0].position) for r in model.plan.routes[2:]]
    assert rows == [(0, (0, 1)), (0, (1, 2)), (0, (1, 3)), (1, (0, 1)), (1, (1, 2)), (1, (2, 3))]
    units = [(s[1], model.units[s[1]][s[2]].name) if s[0] == "unit" else "stitch" for s in model.routes[7]]
    assert units[units.index("stitch") - 2:units.index("stitch") + 2] == [
        (0, "stages.1.blocks.1"), (0, "stages.1.blocks.2"), "stitch", (1, "stages.1.blocks.3")]
    model.eval()
    with torch.no_grad():
        outs = [model(torch.randn(2, 3, 64, 64), c) for c in range(model.num_configs)]
    assert all(o.shape == (2, 1000) and torch.isfinite(o).all() for o in outs)


def test_conv_variant_stitches_nchw_maps():
    """levit_conv_* keep NCHW maps: the stitching layers are 1x1 convs and every route runs."""
    model = snnet_of(["levit_conv_192", "levit_conv_256"], 64)
    assert isinstance(model.stitch_layer((1, 0, 2)).transform, torch.nn.Conv2d)
    model.eval()
    with torch.no_grad():
        assert all(model(torch.randn(2, 3, 64, 64), c).shape == (2, 1000) for c in range(model.num_configs))


@torch.no_grad()
@pytest.mark.slow
def test_every_cfg_runs_and_ls_init_helps(digits_images):
    images = torch.nn.functional.interpolate(digits_images[0], size=128, mode="bilinear")
    model = snnet_of(NAMES, 128)  # 8x8 tokens in stage 0, 4x4 in stage 1
    before = stitch_errors(model, images[1500:1516])
    reports = ls_init(model, [images[:24], images[24:48]])
    after = stitch_errors(model, images[1500:1516])
    assert [r.rows for r in reports] == [48 * 64] * 3 + [48 * 16] * 3
    assert all(after[k] < before[k] for k in before)
    assert statistics.mean(after.values()) < 0.5 * statistics.mean(before.values()), (before, after)
    model.eval()
    outs = [model(images[:2], c) for c in range(model.num_configs)]
    assert all(o.shape == (2, 1000) and torch.isfinite(o).all() for o in outs)


def test_refuses_other_resolution_and_wrong_order():
    with pytest.raises(AnchorError, match=r"cannot stitch 'levit_192' to 'levit_256' in stage 0: at 64x64 input, "
                                          r"'levit_192' block 0 outputs 16 tokens but 'levit_256' block 1 takes "
                                          r"64 tokens"):
        snnet_of(NAMES, 64, levit_256=dict(stem_type="s8"))  # a stride-8 stem: twice the resolution
    with pytest.raises(AnchorError, match="not ordered small to large: 'levit_256' is 256 wide but 'levit_192' is "
                                          "192"):
        snnet_of(NAMES[::-1], 64)
