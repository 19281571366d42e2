"""ResNet-18 -> ResNet-50 and ResNet-18 -> Swin-Ti against SN-Net's published numbers (docs/snnet_compat.md, C30,
C34), the other direction (Swin -> ResNet, which SN-Net lacks), split-BN, and the refusal of anchors that cannot be
stitched."""
import json
import statistics

import pytest
import timm
import torch
from helpers import trace_route_flops
from timm.layers import SplitBatchNorm2d, convert_splitbn_model

from snnet import AnchorError, SNNet, build_snnet, load_stitch_config, plan_for
from snnet.stitching.adapter import NCHW, NHWC, adapter_for
from snnet.stitching.build import check_resolutions
from snnet.stitching.cost import measure
from snnet.stitching.ls_init import ls_init, stitch_errors
from stitching_resnet_swin import snnet_to_ours

SWIN_T = "swin_tiny_patch4_window7_224"


# --- analytic oracle (docs/snnet_compat.md, C34): conv MACs + 2 per BN element + pool elements + FC;
# stitch conv H*W*Cin*Cout ---
def conv(h, cin, cout, k):
    return h * h * cout * cin * k * k


def bn(h, c):
    return 2 * h * h * c


def resnet_blocks(kind):
    """FLOPs of every block, per stage, at 224 px (SN-Net's stage s = timm layer{s+1}, block 0 downsamples)."""
    depths = [2, 2, 2, 2] if kind == "r18" else [3, 4, 6, 3]
    stages, cin = [], 64
    for s, depth in enumerate(depths):
        h, w = 56 >> s, 64 << s
        blocks = []
        for b in range(depth):
            h_in = h * 2 if (b == 0 and s > 0) else h
            if kind == "r18":
                f = conv(h, cin, w, 3) + bn(h, w) + conv(h, w, w, 3) + bn(h, w)
                cout = w
            else:  # bottleneck, stride in the 3x3 conv
                cout = 4 * w
                f = (conv(h_in, cin, w, 1) + bn(h_in, w) + conv(h, w, w, 3) + bn(h, w) + conv(h, w, cout, 1)
                     + bn(h, cout))
            if cin != cout:
                f += conv(h, cin, cout, 1) + bn(h, cout)
            blocks.append(f)
            cin = cout
        stages.append(blocks)
    return stages


RESNET = {"r18": resnet_blocks("r18"), "r50": resnet_blocks("r50")}
RESNET_WIDTH = {"r18": [64, 128, 256, 512], "r50": [256, 512, 1024, 2048]}
RESNET_STEM = conv(112, 3, 64, 7) + bn(112, 64)  # the max-pool is not counted


def resnet_head(kind):
    c = RESNET_WIDTH[kind][3]
    return 7 * 7 * c + c * 1000


def swin_t_blocks():
    """timm Swin-Ti per block, with each stage's merge as the first entry of the next stage (docs/snnet_compat.md,
    C32 formulas)."""
    tokens, stages = [3136, 784, 196, 49], []
    for s, depth in enumerate([2, 2, 6, 2]):
        c, n = 96 << s, tokens[s]
        stages.append([12 * n * c * c + 98 * n * c + 10 * n * c] * depth)
    merges = [2 * tokens[s] * (96 << s) ** 2 + 5 * tokens[s] * (96 << s) for s in range(3)]
    return stages, merges


def snnet_flops(route, kinds):
    """SN-Net's FLOPs of a route of (front, end) anchors of the given kinds ('r18', 'r50' or 'swin_t')."""
    def anchor_part(kind, stage, start, stop):  # blocks [start, stop) of `stage`, then everything after it
        if kind == "swin_t":
            blocks, merges = swin_t_blocks()
            f = sum(blocks[stage][start:stop])
            if stop is None:
                f += sum(merges[stage:]) + sum(sum(b) for b in blocks[stage + 1:]) + 768 * (49 * 5 + 1000)
            return f
        f = sum(RESNET[kind][stage][start:stop])
        if stop is None:
            f += sum(sum(b) for b in RESNET[kind][stage + 1:]) + resnet_head(kind)
        return f

    def prefix(kind, stage):  # stem and the stages before `stage`
        if kind == "swin_t":
            blocks, merges = swin_t_blocks()
            return 3136 * 96 * 53 + sum(sum(b) for b in blocks[:stage]) + sum(merges[:stage])
        return RESNET_STEM + sum(sum(b) for b in RESNET[kind][:stage])

    if route.is_anchor:
        kind = kinds[route.anchors[0]]
        return prefix(kind, 0) + anchor_part(kind, 0, 0, None)
    st = route.stitches[0]
    front, end = kinds[st.front], kinds[st.end]
    h = 56 >> st.stage
    widths = {"r18": RESNET_WIDTH["r18"], "r50": RESNET_WIDTH["r50"], "swin_t": [96, 192, 384, 768]}
    return (prefix(front, st.stage) + anchor_part(front, st.stage, 0, st.j + 1)
            + h * h * widths[front][st.stage] * widths[end][st.stage] + anchor_part(end, st.stage, st.k, None))


@pytest.fixture(scope="module")
def r18_r50():
    model = build_snnet(load_stitch_config("configs/resnet18_resnet50.json"), pretrained=False)
    return model, measure(model, 224)


@pytest.fixture(scope="module")
def r18_swin():
    model = build_snnet(load_stitch_config("configs/resnet18_swin_ti.json"), pretrained=False)
    return model, measure(model, 224)


def test_configs_name_snnets_anchors_with_the_weights_it_loaded():
    """SN-Net's JSON held only the timm names; its timm 0.6 loaded torchvision's R18, the RSB A1 R50 and the
    ImageNet-1k Swin-T, which timm 1.0 names by these tags (docs/snnet_compat.md, C34)."""
    assert json.load(open("configs/resnet18_resnet50.json"))["anchors"] == ["resnet18.tv_in1k", "resnet50.a1_in1k"]
    assert json.load(open("configs/resnet18_swin_ti.json"))["anchors"] == ["resnet18.tv_in1k", f"{SWIN_T}.ms_in1k"]


@pytest.mark.slow
def test_cfg_order(r18_r50, r18_swin):
    rows = [(r.stitches[0].stage, r.stitches[0].position, r.stitches[0].layer) for r in r18_r50[0].plan.routes[2:]]
    assert r18_r50[0].num_configs == 10 and rows == [
        (1, (0, 1), (0, 0, 0)), (1, (1, 2), (0, 0, 0)), (1, (1, 3), (0, 0, 1)),
        (2, (0, 1), (1, 0, 0)), (2, (0, 2), (1, 0, 0)), (2, (1, 3), (1, 0, 0)), (2, (1, 4), (1, 0, 1)),
        (2, (1, 5), (1, 0, 1))]
    rows = [(r.stitches[0].stage, r.stitches[0].position, r.stitches[0].layer) for r in r18_swin[0].plan.routes[2:]]
    assert r18_swin[0].num_configs == 8 and rows == [
        (1, (0, 1), (0, 0, 0)), (2, (0, 1), (1, 0, 0)), (2, (0, 2), (1, 0, 0)), (2, (1, 3), (1, 0, 0)),
        (2, (1, 4), (1, 0, 1)), (2, (1, 5), (1, 0, 1))]


@pytest.mark.slow
def test_published_flops(r18_r50, r18_swin):
    """Anchors and the first stitched rows of both results files (docs/snnet_compat.md, C34), and their ranges."""
    model, table = r18_r50
    flops = [table.route_flops(steps) for steps in model.routes]
    assert flops[:5] == [1819065856, 4111512576, 3755463680, 3767505920, 3547935744]
    assert round(flops[9] / 1e9, 3) == 2.490 and max(flops[2:]) == flops[3]
    model, table = r18_swin
    flops = [table.route_flops(steps) for steps in model.routes]
    assert flops[:5] == [1819065856, 4509194496, 4095543552, 3730713856, 3375768832]
    assert round(flops[7] / 1e9, 3) == 2.542 and round(max(flops[2:]) / 1e9, 3) == 4.096


@pytest.mark.slow
def test_every_cfg_flops_equal_snnet(r18_r50, r18_swin):
    for (model, table), kinds in ((r18_r50, ["r18", "r50"]), (r18_swin, ["r18", "swin_t"])):
        for route in model.plan.routes:
            assert table.route_flops(model.routes[route.cfg_id]) == snnet_flops(route, kinds), (kinds, route.cfg_id)


@pytest.mark.slow
def test_unit_sum_equals_full_trace(r18_r50, r18_swin):
    for (model, table), cfg_ids in ((r18_r50, (1, 4, 9)), (r18_swin, (2, 7))):
        for cfg_id in cfg_ids:
            assert table.route_flops(model.routes[cfg_id]) == trace_route_flops(model, cfg_id, 224), cfg_id


@pytest.mark.slow
def test_params_and_stitch_layers(r18_r50, r18_swin):
    model, _ = r18_r50
    sd = model.state_dict()
    assert sd["stitch_layers.0.0.1.transform.weight"].shape == (512, 128, 1, 1)
    assert sd["stitch_layers.1.0.1.transform.weight"].shape == (1024, 256, 1, 1)
    assert sum(p.numel() for p in model.stitch_layers.parameters()) == 658432
    assert sum(p.numel() for p in model.parameters()) == 37904976  # SN-Net's log: the same
    # cfg 2 = R18 stem, layer1, layer2.0 -> layer 0.0.0 -> R50 layer2.1.. and head: exactly those parameters
    r18, r50 = model.anchors
    owned = lambda m, names: sum(p.numel() for n, p in m.named_parameters() if n.startswith(names))
    expected = (owned(r18, ("conv1.", "bn1.", "layer1.", "layer2.0.")) + 128 * 512 + 512
                + owned(r50, ("layer2.1.", "layer2.2.", "layer2.3.", "layer3.", "layer4.", "fc.")))
    assert model.params(2) == expected
    model, _ = r18_swin
    sd = model.state_dict()
    assert sd["stitch_layers.0.0.0.transform.weight"].shape == (192, 128, 1, 1)
    assert sd["stitch_layers.1.0.1.transform.weight"].shape == (384, 256, 1, 1)
    assert sum(p.numel() for p in model.stitch_layers.parameters()) == 222144
    assert sum(p.numel() for p in model.parameters()) == 40200010


@pytest.mark.slow
def test_snnet_checkpoint_keys_load(r18_swin):
    """SN-Net's R18 -> Swin-Ti checkpoint layout (docs/snnet_compat.md, C30): ResNet keys are timm's; the Swin anchor
    used timm 0.7 names (merge at the end of a stage, a plain Linear head, persistent buffers), which the Swin key map
    converts."""
    model, _ = r18_swin
    ours = model.state_dict()
    theirs = {}
    for k, v in ours.items():
        k = k.replace("anchors.1.head.fc.", "anchors.1.head.")
        if k.startswith("anchors.1.layers.") and ".downsample." in k:
            s = int(k.split(".")[3])
            k = k.replace(f"anchors.1.layers.{s}.downsample.", f"anchors.1.layers.{s - 1}.downsample.")
        theirs[k] = torch.randn_like(v) if v.is_floating_point() else v
    theirs["anchors.1.layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    theirs["anchors.1.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    for key in ("anchors.0.conv1.weight", "anchors.0.layer4.1.bn2.running_var",
                "anchors.0.layer2.0.downsample.0.weight", "anchors.0.fc.bias",
                "anchors.1.layers.2.downsample.reduction.weight", "anchors.1.head.weight",
                "stitch_layers.1.0.1.transform.bias"):
        assert key in theirs, key
    converted = snnet_to_ours(theirs)
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.anchors[1].layers[3].downsample.norm.weight,
                       theirs["anchors.1.layers.2.downsample.norm.weight"])
    assert torch.equal(model.anchors[0].layer2[0].downsample[0].weight,
                       theirs["anchors.0.layer2.0.downsample.0.weight"])


# --- small images ----------------------------------------------------------------------------------------------------
SMALL = 64  # px: stage 1 at 8x8, stage 2 at 4x4


def anchor(name, **kw):
    if "swin" in name:
        kw = dict(img_size=SMALL, **kw)
    return timm.create_model(name, pretrained=False, **kw)


def snnet_of(names, **kw):
    torch.manual_seed(0)
    models = [anchor(n, **kw.get(n, {})) for n in names]
    adapters = [adapter_for(m, n) for m, n in zip(models, names)]
    model = SNNet(models, plan_for(models, adapters, names), names=names, adapters=adapters)
    check_resolutions(model, SMALL)
    return model


@pytest.fixture(scope="module")
def digits64(digits_images):
    return torch.nn.functional.interpolate(digits_images[0], size=SMALL, mode="bilinear")


# error ratio after/before LS: random-weight Swin stage-2 features are far from a linear map of random ResNet ones
# (held-out error 1.02 -> 0.70), the other pairs drop below a third
@pytest.mark.parametrize("names,count,ratio", [(["resnet18", "resnet50"], 10, 0.5), (["resnet18", SWIN_T], 8, 0.8),
                                               ([SWIN_T, "resnet50"], 2 + 3 + 5, 0.5)])
@pytest.mark.slow
def test_every_cfg_runs_and_ls_init_helps(names, count, ratio, digits64):
    """Every route runs; the least-squares init brings stitched features close to the end anchor's own, on images
    it never saw. Swin -> ResNet (NHWC tokens -> NCHW map, absent from SN-Net) works the same way."""
    model = snnet_of(names)
    assert model.num_configs == count
    before = stitch_errors(model, digits64[1500:1516])
    ls_init(model, [digits64[:32], digits64[32:64]])
    after = stitch_errors(model, digits64[1500:1516])
    assert all(after[k] < before[k] for k in before)
    assert statistics.mean(after.values()) < ratio * statistics.mean(before.values()), (before, after)
    model.eval()
    x = digits64[:2]
    with torch.no_grad():
        outs = [model(x, cfg_id) for cfg_id in range(model.num_configs)]
    assert all(o.shape == (2, 1000) and torch.isfinite(o).all() for o in outs)
    assert torch.allclose(outs[0], model.anchors[0](x), atol=1e-5)


@pytest.mark.slow
def test_layouts_of_stitching_layers():
    """1x1 conv on the ResNet map, then NHWC for timm's Swin; the reverse is a Linear on NHWC, then NCHW."""
    to_swin = snnet_of(["resnet18", SWIN_T])
    layer = to_swin.stitch_layer((0, 0, 0))
    assert isinstance(layer.transform, torch.nn.Conv2d) and (layer.in_layout, layer.out_layout) == (NCHW, NHWC)
    assert layer(torch.randn(2, 128, 8, 8)).shape == (2, 8, 8, 192)
    to_resnet = snnet_of([SWIN_T, "resnet50"])
    layer = to_resnet.stitch_layer((1, 0, 0))
    assert isinstance(layer.transform, torch.nn.Linear) and (layer.in_layout, layer.out_layout) == (NHWC, NCHW)
    assert layer(torch.randn(2, 4, 4, 384)).shape == (2, 1024, 4, 4)


def test_split_bn_keeps_the_snnet_working(digits64):
    """timm's --split-bn replaces every BatchNorm2d inside the anchors in place; the units look modules up by
    attribute at run time, so routes run the split BNs: same eval outputs, aux BN used on the second half."""
    model = snnet_of(["resnet18", "resnet50"])
    x = digits64[:4]
    model.eval()
    with torch.no_grad():
        before = [model(x, c) for c in (0, 2, 9)]
    params_before = [model.params(c) for c in range(model.num_configs)]
    converted = convert_splitbn_model(model, num_splits=2)
    model._unit_params = None  # recount: the auxiliary BNs must not count, they never run at evaluation
    assert [model.params(c) for c in range(model.num_configs)] == params_before
    assert converted is model and isinstance(model.anchors[1].layer3[2].bn2, SplitBatchNorm2d)
    assert "anchors.0.bn1.aux_bn.0.weight" in model.state_dict()  # SN-Net's split-BN keys (docs/snnet_compat.md, C30)
    model.eval()  # the new BN modules are created in training mode
    with torch.no_grad():
        after = [model(x, c) for c in (0, 2, 9)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(before, after))
    model.train()
    model(x, 4).sum().backward()
    aux = model.anchors[1].layer2[3].bn1.aux_bn[0]
    assert int(aux.num_batches_tracked) == 1 and model.stitch_layer((0, 0, 1)).transform.weight.grad is not None
    assert int(model.anchors[1].layer1[0].bn1.aux_bn[0].num_batches_tracked) == 0  # cfg 4 starts R50 at layer2.3


# --- refusals --------------------------------------------------------------------------------------------------------
def test_refuses_other_stage_resolution():
    with pytest.raises(AnchorError, match=r"cannot stitch 'resnet18' to 'swin_tiny_patch4_window7_224' in stage 1: "
                                          r"at 64x64 input, 'resnet18' block 0 outputs 8x8 but "
                                          r"'swin_tiny_patch4_window7_224' block 1 takes 4x4; stitch anchors whose "
                                          r"stage 1 runs at the same resolution"):
        snnet_of(["resnet18", SWIN_T], **{SWIN_T: dict(patch_size=8)})


def test_refuses_plain_vit_unequal_stages_and_wrong_order():
    with pytest.raises(AnchorError, match=r"cannot mix plain ViT anchors with hierarchical ones: "
                                          r"'deit_small_patch16_224' \(plain\) cannot join"):
        snnet_of(["resnet18", "deit_small_patch16_224"], deit_small_patch16_224=dict(img_size=SMALL))
    with pytest.raises(ValueError, match="different numbers of stages: 'resnet18' has 4, 'levit_256' has 3"):
        snnet_of(["resnet18", "levit_256"], levit_256=dict(img_size=SMALL))
    with pytest.raises(ValueError, match="not ordered small to large: stage 1 has 4 blocks in 'resnet50' but 2 in "
                                         "'resnet18'"):
        snnet_of(["resnet50", "resnet18"])
