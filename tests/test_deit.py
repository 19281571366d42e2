"""DeiT Ti/S/B against SN-Net's published numbers and checkpoint layout (docs/snnet_compat.md, C7, C22, C27, C31)."""
import pytest
import torch
from helpers import trace_route_flops

from snnet import build_snnet, load_stitch_config
from snnet.stitching.cost import measure

N = 197  # tokens at 224 px
WIDTH = [192, 384, 768]


def block_flops(c):
    return 12 * N * c * c + 2 * N * N * c + 10 * N * c


def embed_flops(c):
    return 196 * 768 * c


def snnet_flops(route):
    """SN-Net's published FLOPs (docs/snnet_compat.md, C31 formulas; stitched routes skip the end anchor's final
    norm)."""
    if route.is_anchor:
        c = WIDTH[route.anchors[0]]
        return embed_flops(c) + 12 * block_flops(c) + 5 * N * c + 1000 * c
    st = route.stitches[0]
    cf, ce = WIDTH[st.front], WIDTH[st.end]
    return (embed_flops(cf) + (st.j + 1) * block_flops(cf) + N * cf * ce + (12 - st.k) * block_flops(ce)
            + 1000 * ce)


def block_params(c):
    return 12 * c * c + 13 * c


def snnet_params(route):
    """SN-Net's get_model_size (docs/snnet_compat.md, C22, C31): stitched counts omit front cls/pos and include the
    end's final norm."""
    if route.is_anchor:
        c = WIDTH[route.anchors[0]]
        return 769 * c + 12 * block_params(c) + 2 * c + 1000 * c + 1000 + c + 197 * c
    st = route.stitches[0]
    cf, ce = WIDTH[st.front], WIDTH[st.end]
    return (769 * cf + (st.j + 1) * block_params(cf) + cf * ce + ce + (12 - st.k) * block_params(ce)
            + 1000 * ce + 1000 + 2 * ce)


@pytest.fixture(scope="module")
def deit():
    cfg = load_stitch_config("configs/deit_ti_s_b.json")
    model = build_snnet(cfg, pretrained=False, weight_init="skip")  # costs, keys, shapes: no weights read; PyTorch's
    return model, measure(model, 224)  # default init instead of timm's trunc-normal pass over 114M parameters (s)


@pytest.mark.slow
def test_config_is_snnets_file_and_builds_71(deit):
    model, _ = deit
    assert model.num_configs == 71 and model.skip_final_norm


def test_anchor_flops_and_params(deit):
    model, table = deit
    assert [table.route_flops(model.routes[i]) for i in range(3)] == [1258411200, 4608338304, 17582740224]
    assert [model.params(i) for i in range(3)] == [5717416, 22050664, 86567656]


def test_published_rows_verbatim(deit):
    """The first rows of SN-Net's results file and the README headline stitches (docs/snnet_compat.md, C31)."""
    model, table = deit
    published = {3: 4696010496, 4: 4316862720, 24: 2758967808, 56: 10048040448}
    for cfg_id, flops in published.items():
        assert table.route_flops(model.routes[cfg_id]) == flops, cfg_id
    # SN-Net's range, to 3 decimals (docs/snnet_compat.md, C31): the cheapest stitch and the most expensive one
    assert round(table.route_flops(model.routes[34]) / 1e9, 3) == 1.550
    assert round(table.route_flops(model.routes[39]) / 1e9, 3) == 18.341


def test_every_cfg_flops_equal_snnet(deit):
    model, table = deit
    for route in model.plan.routes:
        assert table.route_flops(model.routes[route.cfg_id]) == snnet_flops(route), route.cfg_id


@pytest.mark.slow
def test_unit_sum_equals_full_trace(deit):
    model, table = deit
    for cfg_id in (0, 2, 3, 5, 39, 70):
        assert table.route_flops(model.routes[cfg_id]) == trace_route_flops(model, cfg_id, 224)


def test_params_differ_from_snnet_by_what_snnet_miscounts(deit):
    """Ours count exactly the executed modules. SN-Net's stitched count leaves out the front's cls_token (C_f) and
    pos_embed (197·C_f), which run, and includes the end's final norm (2·C_e), which does not
    (docs/snnet_compat.md, C22). Ti→S: +37,248 per stitch; S→B: +74,496."""
    model, _ = deit
    diffs = {}
    for route in model.plan.routes:
        ours, theirs = model.params(route.cfg_id), snnet_params(route)
        if route.is_anchor:
            assert ours == theirs
            continue
        st = route.stitches[0]
        cf, ce = WIDTH[st.front], WIDTH[st.end]
        assert ours - theirs == (cf + 197 * cf) - 2 * ce, route.cfg_id
        diffs[(st.front, st.end)] = ours - theirs
    assert diffs == {(0, 1): 37248, (1, 2): 74496}
    assert model.params(3) == 22345960 + 37248  # SN-Net's published cfg 3 row: 22,345,960
    assert model.params(4) == 20571496 + 37248  # cfg 4: 20,571,496


def timm_vit_keys(depth=12):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias", "head.weight", "head.bias"]
    for b in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{b}.{m}.weight", f"blocks.{b}.{m}.bias"]
    return keys


def test_state_dict_keys_and_shapes_are_snnets(deit):
    model, _ = deit
    sd = model.state_dict()
    expected = {f"anchors.{a}.{k}" for a in range(3) for k in timm_vit_keys()}
    expected |= {f"stitch_layers.{c}.{l}.transform.{p}"
                 for c in range(2) for l in range(11) for p in ("weight", "bias")}
    assert set(sd) == expected
    assert sd["stitch_layers.0.3.transform.weight"].shape == (384, 192)
    assert sd["stitch_layers.1.10.transform.weight"].shape == (768, 384)
    assert sd["anchors.2.pos_embed"].shape == (1, 197, 768)
    # an SN-Net checkpoint (same keys and shapes, different values) loads strictly
    snnet_ckpt = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(snnet_ckpt, strict=True)
    assert torch.equal(model.state_dict()["stitch_layers.1.4.transform.bias"],
                       snnet_ckpt["stitch_layers.1.4.transform.bias"])
    assert sum(p.numel() for p in model.stitch_layers.parameters()) == 4067712
    assert sum(p.numel() for p in model.parameters()) == 118403448


def test_stitched_route_skips_final_norm_unless_switched_off():
    from snnet.stitching.config import parse_stitch_config
    cfg = parse_stitch_config({"anchors": ["deit_tiny_patch16_224", "deit_small_patch16_224"]})
    on = build_snnet(cfg, pretrained=False, img_size=32, patch_size=8)
    cfg_off = parse_stitch_config({"anchors": ["deit_tiny_patch16_224", "deit_small_patch16_224"],
                                   "skip_final_norm": False})
    off = build_snnet(cfg_off, pretrained=False, img_size=32, patch_size=8)
    kinds = lambda m, c: [m.units[s[1]][s[2]].kind for s in m.routes[c] if s[0] == "unit"]
    assert "norm" not in kinds(on, 2) and "norm" in kinds(off, 2)
    assert "norm" in kinds(on, 0)  # anchors always apply it
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 3, 32, 32)
    on.eval(), off.eval()
    assert torch.allclose(on(x, 0), off(x, 0))
    assert not torch.allclose(on(x, 5), off(x, 5))
    # a stitched route equals running the pieces by hand
    with torch.no_grad():
        ti, s = on.anchors
        h = ti.norm_pre(ti.patch_drop(ti._pos_embed(ti.patch_embed(x))))
        st = on.plan.routes[5].stitches[0]
        for b in range(st.j + 1):
            h = ti.blocks[b](h)
        h = on.stitch_layer(st.layer)(h)
        for b in range(st.k, 12):
            h = s.blocks[b](h)
        assert torch.allclose(on(x, 5), s.forward_head(h), atol=1e-5)



def test_units_of_one_structure_are_traced_once(monkeypatch):
    """`measure` traces each structure (module types, settings, parameter shapes) on each input shape once: two tiny
    DeiTs of 4 blocks price their 8 blocks with 2 traces and their stitching layers (one shape) with 1; the table is
    the one an unshared trace of every unit gives (the Ti/S/B table above is SN-Net's, cfg_id for cfg_id)."""
    import snnet.stitching.cost as cost
    from snnet import parse_stitch_config
    vit = lambda width: {"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 4,
                                                                            "embed_dim": width, "num_heads": 2}}
    net = build_snnet(parse_stitch_config({"anchors": [vit(8), vit(16)]}), pretrained=False, num_classes=10,
                      img_size=16)
    traces, real = [], cost.count_flops
    monkeypatch.setattr(cost, "count_flops", lambda fn, owner, x: traces.append(owner) or real(fn, owner, x))
    shared = measure(net, 16)
    units = sum(len(u) for u in net.units)
    blocks = sum(unit.kind == "block" for u in net.units for unit in u)
    layers = len(net.stitch_inputs())
    assert blocks == 8 and layers > 1 and len(traces) == units - blocks + 2 + 1, (units, layers, len(traces))
    monkeypatch.setattr(cost, "structure", lambda module: None)  # nothing shared: every unit traced
    traces.clear()
    alone = measure(net, 16)
    assert len(traces) == units + layers
    assert (shared.unit_flops, shared.layer_flops) == (alone.unit_flops, alone.layer_flops)


def test_a_network_built_again_reuses_its_cost_table(monkeypatch):
    """`cost_table` of a second network of the same structure (the run's own after its preflight's) is the first
    one's table, not a second trace; another width or a hooked network is traced anew."""
    import snnet.stitching.cost as cost
    from snnet import parse_stitch_config
    vit = lambda width: {"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 2,
                                                                            "embed_dim": width, "num_heads": 2}}

    def build(widths):
        cfg = parse_stitch_config({"anchors": [vit(w) for w in widths]})
        return build_snnet(cfg, pretrained=False, num_classes=10, img_size=16)
    traced, real = [], cost.measure
    monkeypatch.setattr(cost, "measure", lambda net, sizes, chans: traced.append(net) or real(net, sizes, chans))
    monkeypatch.setattr(cost, "_BY_STRUCTURE", {}, raising=False)
    first, again, other = build([8, 16]), build([8, 16]), build([8, 12])
    table = cost.cost_table(first, 16)
    assert cost.cost_table(again, 16) is table and len(traced) == 1
    assert cost.cost_table(other, 16) is not table and len(traced) == 2
    hooked = build([8, 16])
    hooked.anchor(0).blocks[0].register_forward_hook(lambda *a: None)
    assert cost.cost_table(hooked, 16) == table and len(traced) == 3
    assert real(again, [(16, 16)] * 2, 3) == table
