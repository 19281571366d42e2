"""Swin Ti/S/B against SN-Net's published numbers, checkpoint layout and stitching rules (docs/snnet_compat.md, C28,
C32)."""
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
from stitching_swin import ours_to_snnet, snnet_to_ours

NAMES = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224"]
C0 = [96, 96, 128]
DEPTHS = [[2, 2, 6, 2], [2, 2, 18, 2], [2, 2, 18, 2]]
HEADS = [[3, 6, 12, 24], [3, 6, 12, 24], [4, 8, 16, 32]]
L = [3136, 784, 196, 49]  # tokens per stage at 224 px


# --- analytic oracle (docs/snnet_compat.md, C32): SN-Net's FLOPs and its get_model_size ------------------------------
def block_flops(s, c0):
    c = c0 * 2 ** s
    return 12 * L[s] * c * c + 98 * L[s] * c + 10 * L[s] * c


def merge_flops(s, c0):  # the merge at the end of stage s (Microsoft layout)
    c = c0 * 2 ** s
    return 2 * L[s] * c * c + 5 * L[s] * c


def block_params(s, a):
    c = C0[a] * 2 ** s
    return 12 * c * c + 13 * c + 169 * HEADS[a][s]


def merge_params(s, c0):
    c = c0 * 2 ** s
    return 8 * c * c + 8 * c


def snnet_flops(route):
    if route.is_anchor:
        a = route.anchors[0]
        return (3136 * C0[a] * 53 + sum(DEPTHS[a][t] * block_flops(t, C0[a]) for t in range(4))
                + sum(merge_flops(t, C0[a]) for t in range(3)) + 8 * C0[a] * (49 * 5 + 1000))
    st = route.stitches[0]
    f, e, s = st.front, st.end, st.stage
    cf, ce = C0[f] * 2 ** s, C0[e] * 2 ** s
    return (3136 * C0[f] * 53 + sum(DEPTHS[f][t] * block_flops(t, C0[f]) + merge_flops(t, C0[f]) for t in range(s))
            + (st.j + 1) * block_flops(s, C0[f]) + L[s] * cf * ce + (DEPTHS[e][s] - st.k) * block_flops(s, C0[e])
            + sum(DEPTHS[e][t] * block_flops(t, C0[e]) for t in range(s + 1, 4))
            + sum(merge_flops(t, C0[e]) for t in range(s, 3)) + 8 * C0[e] * (49 * 5 + 1000))


def snnet_params(route):
    """SN-Net's get_model_size, including its bug: the front's merges before the stitch stage are left out."""
    if route.is_anchor:
        a = route.anchors[0]
        return (51 * C0[a] + sum(DEPTHS[a][t] * block_params(t, a) for t in range(4))
                + sum(merge_params(t, C0[a]) for t in range(3)) + 8016 * C0[a] + 1000)
    st = route.stitches[0]
    f, e, s = st.front, st.end, st.stage
    cf, ce = C0[f] * 2 ** s, C0[e] * 2 ** s
    return (51 * C0[f] + sum(DEPTHS[f][t] * block_params(t, f) for t in range(s)) + (st.j + 1) * block_params(s, f)
            + cf * ce + ce + (DEPTHS[e][s] - st.k) * block_params(s, e)
            + sum(DEPTHS[e][t] * block_params(t, e) for t in range(s + 1, 4))
            + sum(merge_params(t, C0[e]) for t in range(s, 3)) + 8016 * C0[e] + 1000)


FAST = dict(weight_init="skip")  # PyTorch's default init instead of timm's trunc-normal pass: same modules, faster


@pytest.fixture(scope="module")
def swin224():
    model = build_snnet(load_stitch_config("configs/swin_ti_s_b.json"), pretrained=False, **FAST)
    return model, measure(model, 224)


@pytest.mark.slow
def test_config_builds_41_in_snnet_order(swin224):
    model, _ = swin224
    assert model.num_configs == 41
    rows = [(r.stitches[0].stage, r.anchors, r.stitches[0].position, r.stitches[0].layer)
            for r in model.plan.routes[3:]]
    assert rows[:4] == [(0, (0, 1), (0, 1), (0, 0, 0)), (0, (1, 2), (0, 1), (0, 1, 0)),
                        (1, (0, 1), (0, 1), (1, 0, 0)), (1, (1, 2), (0, 1), (1, 1, 0))]
    # cfg 7..23: Ti->S stage 2, depth interpolation 6 -> 18 with SN-Net's shifted layer ids (docs/snnet_compat.md, C3)
    assert [r[2] for r in rows[4:21]] == [(0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (2, 6), (2, 7), (2, 8), (3, 9),
                                          (3, 10), (3, 11), (4, 12), (4, 13), (4, 14), (5, 15), (5, 16), (5, 17)]
    assert [r[3][2] for r in rows[4:21]] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]
    assert [r[2] for r in rows[21:]] == [(i, i + 1) for i in range(17)] and rows[-1][3] == (2, 1, 16)


@pytest.mark.slow
def test_anchor_flops_and_params(swin224):
    model, table = swin224
    assert [table.route_flops(model.routes[a]) for a in range(3)] == [4509194496, 8768534784, 15467826176]
    assert [model.params(a) for a in range(3)] == [28288354, 49606258, 87768224]


@pytest.mark.slow
def test_published_rows(swin224):
    """SN-Net's results file and README stitches (docs/snnet_compat.md, C32)."""
    model, table = swin224
    for cfg_id, flops in {3: 8797436160, 4: 15220458496, 13: 7377656064, 28: 12936597504}.items():
        assert table.route_flops(model.routes[cfg_id]) == flops, cfg_id
    assert round(table.route_flops(model.routes[23]) / 1e9, 3) == 4.893  # the cheapest stitch
    assert model.params(3) == 49615570 and model.params(4) == 87692407  # no merge before stage 0: SN-Net is right


@pytest.mark.slow
def test_every_cfg_flops_equal_snnet(swin224):
    model, table = swin224
    for route in model.plan.routes:
        assert table.route_flops(model.routes[route.cfg_id]) == snnet_flops(route), route.cfg_id


@pytest.mark.slow
def test_params_differ_from_snnet_by_the_front_merges(swin224):
    """Ours count what runs; SN-Net's count omits the front's PatchMerging before the stitch stage
    (docs/snnet_compat.md, C22)."""
    model, _ = swin224
    for route in model.plan.routes:
        missing = 0
        if not route.is_anchor:
            st = route.stitches[0]
            missing = sum(merge_params(t, C0[st.front]) for t in range(st.stage))
        assert model.params(route.cfg_id) - snnet_params(route) == missing, route.cfg_id
    assert model.params(5) == 49568818 + 74496  # SN-Net's cfg 5 row is 74,496 (the stage-0 merge) short
    assert model.params(7) - snnet_params(model.plan.routes[7]) == 74496 + 296448


@pytest.mark.slow
def test_unit_sum_equals_full_trace(swin224):
    model, table = swin224
    for cfg_id in (5, 23):
        assert table.route_flops(model.routes[cfg_id]) == trace_route_flops(model, cfg_id, 224), cfg_id


# --- checkpoint compatibility ----------------------------------------------------------------------------------------
def snnet_swin_state_dict():
    """A synthetic SN-Net Swin checkpoint with the Microsoft-Swin keys and shapes of docs/snnet_compat.md, C28."""
    sd = {}
    for a in range(3):
        p, c0 = f"anchors.{a}.", C0[a]
        sd.update({p + "patch_embed.proj.weight": (c0, 3, 4, 4), p + "patch_embed.proj.bias": (c0,),
                   p + "patch_embed.norm.weight": (c0,), p + "patch_embed.norm.bias": (c0,)})
        for s in range(4):
            c, h = c0 * 2 ** s, HEADS[a][s]
            for b in range(DEPTHS[a][s]):
                q = f"{p}layers.{s}.blocks.{b}."
                for m, shape in (("norm1", (c,)), ("attn.qkv", (3 * c, c)), ("attn.proj", (c, c)), ("norm2", (c,)),
                                 ("mlp.fc1", (4 * c, c)), ("mlp.fc2", (c, 4 * c))):
                    sd[q + m + ".weight"], sd[q + m + ".bias"] = shape, (shape[0],)
                sd[q + "attn.relative_position_bias_table"] = (169, h)
                sd[q + "attn.relative_position_index"] = (49, 49)
                if b % 2 == 1 and s < 3:  # shifted blocks, where the stage is larger than one window
                    sd[q + "attn_mask"] = (L[s] // 49, 49, 49)
            if s < 3:
                sd.update({f"{p}layers.{s}.downsample.norm.weight": (4 * c,),
                           f"{p}layers.{s}.downsample.norm.bias": (4 * c,),
                           f"{p}layers.{s}.downsample.reduction.weight": (2 * c, 4 * c)})
        sd.update({p + "norm.weight": (8 * c0,), p + "norm.bias": (8 * c0,), p + "head.weight": (1000, 8 * c0),
                   p + "head.bias": (1000,)})
    for s in range(3):
        for pair, n_layers in enumerate([[1, 1], [1, 1], [6, 17]][s]):
            cf, ce = C0[pair] * 2 ** s, C0[pair + 1] * 2 ** s
            for layer in range(n_layers):
                sd[f"stitch_layers.{s}.{pair}.{layer}.transform.weight"] = (ce, cf)
                sd[f"stitch_layers.{s}.{pair}.{layer}.transform.bias"] = (ce,)
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=g) for k, shape in sd.items()}


@pytest.mark.slow
def test_snnet_checkpoint_converts_and_loads_strictly(swin224):
    model, _ = swin224
    theirs = snnet_swin_state_dict()
    ours = snnet_to_ours(theirs)
    assert "anchors.0.layers.1.downsample.reduction.weight" in ours and "anchors.2.head.fc.weight" in ours
    assert not any(k.startswith("anchors.0.layers.0.downsample") for k in ours)  # timm's stage 0 has none
    # dropped: 60 relative_position_index buffers (one per block) and 27 attn_mask (odd blocks of stages 0-2)
    dropped = {k for k in theirs if k.endswith(("relative_position_index", "attn_mask"))}
    assert len(dropped) == 60 + 27 and len(ours) == len(theirs) - 87
    own = model.state_dict()
    assert set(ours) == set(own)
    assert all(ours[k].shape == own[k].shape for k in own)
    model.load_state_dict(ours, strict=True)
    assert torch.equal(model.anchors[1].layers[3].downsample.reduction.weight,
                       theirs["anchors.1.layers.2.downsample.reduction.weight"])
    assert torch.equal(model.stitch_layer((2, 1, 16)).transform.weight,
                       theirs["stitch_layers.2.1.16.transform.weight"])
    # and back: the inverse map restores every SN-Net key except the derived buffers
    back = ours_to_snnet(ours)
    assert set(back) == set(theirs) - dropped
    assert all(torch.equal(back[k], theirs[k]) for k in back)


@pytest.mark.slow
def test_stitch_layer_keys_and_shapes(swin224):
    model, _ = swin224
    sd = model.state_dict()
    stitch = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("stitch_layers.")}
    assert len(stitch) == 2 * 27
    assert stitch["stitch_layers.0.0.0.transform.weight"] == (96, 96)
    assert stitch["stitch_layers.0.1.0.transform.weight"] == (128, 96)
    assert stitch["stitch_layers.1.1.0.transform.weight"] == (256, 192)
    assert stitch["stitch_layers.2.0.5.transform.weight"] == (384, 384)
    assert stitch["stitch_layers.2.1.16.transform.weight"] == (512, 384)
    assert sum(p.numel() for p in model.stitch_layers.parameters()) == 4346272
    assert sum(p.numel() for p in model.parameters()) == 170009108


# --- small images: routes, LS init, refusals --------------------------------------------------------------------------
def snnet_of(models, names):
    adapters = [adapter_for(m, n) for m, n in zip(models, names)]
    return SNNet(models, plan_for(models, adapters, names), names=names, adapters=adapters)


SMALL = 32  # px: stages at 8x8, 4x4, 2x2, 1x1
#: Ti/S/B with their depths (so the same 41-route plan) but thin: a forward on tiny images costs what reading the
#: weights costs, so the full-width anchors are only built once, for the 224-px numbers above
THIN = [dict(embed_dim=24, num_heads=(1, 2, 4, 8)), dict(embed_dim=24, num_heads=(1, 2, 4, 8)),
        dict(embed_dim=32, num_heads=(1, 2, 4, 8))]


def small_swin(a, **kw):
    return timm.create_model(NAMES[a], pretrained=False, img_size=SMALL, num_classes=10, **THIN[a], **kw)


@pytest.fixture(scope="module")
def swin_small_img():
    torch.manual_seed(0)
    model = snnet_of([small_swin(a) for a in range(3)], NAMES)
    check_resolutions(model, SMALL)
    return model


@pytest.mark.slow
def test_every_cfg_runs_on_small_images(swin_small_img):
    model = swin_small_img
    x = torch.randn(2, 3, SMALL, SMALL)
    model.eval()
    with torch.no_grad():
        outs = [model(x, cfg_id) for cfg_id in range(model.num_configs)]
    assert model.num_configs == 41 and all(o.shape == (2, 10) and torch.isfinite(o).all() for o in outs)
    assert torch.allclose(outs[1], model.anchors[1](x), atol=1e-5)  # an anchor route is the timm model


def test_stitch_stays_inside_its_stage(swin_small_img):
    """cfg 5 = stage 1 Ti->S (0,1): Ti runs its stage-1 merge and block 0, S continues at its stage-1 block 1,
    so neither the stitch nor S's part re-runs or skips a PatchMerging."""
    model = swin_small_img
    names = [(s[1], model.units[s[1]][s[2]].name) if s[0] == "unit" else "stitch" for s in model.routes[5]]
    assert names[:6] == [(0, "patch_embed"), (0, "layers.0.blocks.0"), (0, "layers.0.blocks.1"),
                         (0, "layers.1.downsample"), (0, "layers.1.blocks.0"), "stitch"]
    assert names[6:8] == [(1, "layers.1.blocks.1"), (1, "layers.2.downsample")]
    # the least-squares target of a block is the output of the unit before it: for block 0 of a stage, the merge
    assert model.units[1][model.block_unit(1, 1, 0) - 1].name == "layers.1.downsample"
    x = torch.randn(2, 3, SMALL, SMALL)
    model.eval()
    with torch.no_grad():
        ti, s = model.anchors[:2]
        h = ti.layers[1].downsample(ti.layers[0](ti.patch_embed(x)))
        h = model.stitch_layer((1, 0, 0))(ti.layers[1].blocks[0](h))
        h = s.layers[3](s.layers[2](s.layers[1].blocks[1](h)))
        assert torch.allclose(model(x, 5), s.forward_head(s.norm(h)), atol=1e-5)


@torch.no_grad()
def test_ls_init_reduces_feature_error(swin_small_img, digits_images):
    model = swin_small_img
    fit, held_out = digits_images[0][:32], digits_images[0][1500:1516]  # real 32x32 images
    before = stitch_errors(model, held_out)
    reports = ls_init(model, [fit[:16], fit[16:]])
    after = stitch_errors(model, held_out)
    assert len(reports) == 27 and reports[0].rows == 32 * 8 * 8  # stage 0: 8x8 positions per image
    assert statistics.mean(after.values()) < 0.5 * statistics.mean(before.values())
    assert all(after[k] < before[k] for k in before)


def test_refuses_another_resolution():
    """Swin-T with 8-px patches runs its stages at half the resolution of Swin-S with 4-px patches."""
    model = snnet_of([small_swin(0, patch_size=8), small_swin(1)], NAMES[:2])
    with pytest.raises(AnchorError, match=r"cannot stitch 'swin_tiny_patch4_window7_224' to "
                                          r"'swin_small_patch4_window7_224' in stage 0: at 32x32 input, "
                                          r"'swin_tiny_patch4_window7_224' block 0 outputs 4x4 but "
                                          r"'swin_small_patch4_window7_224' block 1 takes 8x8; .*same resolution"):
        check_resolutions(model, SMALL)


def test_refuses_wrong_order():
    models = [small_swin(1), small_swin(0)]
    with pytest.raises(ValueError, match="not ordered small to large.*stage 2 has 18 blocks in "
                                         "'swin_small_patch4_window7_224' but 6 in 'swin_tiny_patch4_window7_224'"):
        snnet_of(models, [NAMES[1], NAMES[0]])
