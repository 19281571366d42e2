"""SN-Netv2's low-rank stitching layer (type "lora"): SN-Netv2's keys, frozen least-squares W, trainable b/A/B,
never merged in place, merged into one linear layer by `merged()` and by export."""
import json
import sys

import pytest
import torch
from helpers import FAST, TINY, run

from snnet import build_snnet, parse_stitch_config
from snnet.deploy.export import count_params, export_stitch, load_exported, load_snnet, stitched_network
from snnet.stitching.adapter import NCHW, NHWC, TOKENS
from snnet.stitching.layers import StitchingLayer, create_stitch_layer, stitch_layer_from_spec
from snnet.stitching.ls_init import ls_init
from snnet.utils.checkpoint import save_checkpoint

RANK = 4
VALUES = {"anchors": TINY, "skip_final_norm": False, "stitch_layer": {"type": "lora", "rank": RANK}}
KEYS = {"weight", "bias", "lora_A", "lora_B"}


def tiny(stitch_layer=None, seed=0):
    torch.manual_seed(seed)
    values = {**VALUES, "stitch_layer": stitch_layer or VALUES["stitch_layer"]}
    return build_snnet(parse_stitch_config(values), pretrained=False, num_classes=10, img_size=16)


def stitched(net):
    return [c for c in range(net.num_configs) if any(s[0] == "stitch" for s in net.routes[c])]


def layers(net):
    return [net.stitch_layer(spec.address) for spec in net.plan.layers]


def max_diff(a, b):
    return float((a - b).abs().max())


def train_steps(net, steps=6, lr=1e-2):
    """A few AdamW steps on random data over the stitched routes, with every stitching-layer parameter flagged
    trainable (what train.py's ``fulltune: false`` does): W must still not move."""
    for p in net.stitch_layers.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in net.stitch_layers.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    net.train()
    for _step in range(steps):
        for c in stitched(net):
            x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x, c), y).backward()
            opt.step()
    net.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny lora SN-Net: LS-initialised (W, b kept for comparison), trained a few steps, checkpointed."""
    net = tiny()
    ls_init(net, [torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))])
    init = {k: v.clone() for k, v in net.stitch_layers.state_dict().items()}
    train_steps(net)
    folder = tmp_path_factory.mktemp("lora")
    (folder / "cfg.json").write_text(json.dumps(VALUES))
    save_checkpoint(folder / "ckpt.pth.tar", {"state_dict": net.checkpoint_state(), "args": json.dumps(
        {"num_classes": 10, "img_size": 16})})
    return net, init, folder


def test_keys_frozen_weight_spec_and_params():
    net = tiny()
    keys = [k for k in net.state_dict() if k.startswith("stitch_layers.")]
    assert keys and {k.rsplit(".", 1)[1] for k in keys} == KEYS
    assert all(k.startswith("stitch_layers.0.") and k.split(".")[3] == "transform" for k in keys)
    for name, p in net.stitch_layers.named_parameters():
        assert p.requires_grad == (not name.endswith(".weight")), name
    layer = layers(net)[0]
    t = layer.transform
    cin, cout = t.in_features, t.out_features
    assert (tuple(t.weight.shape), tuple(t.bias.shape)) == ((cout, cin), (cout,))
    assert (tuple(t.lora_A.shape), tuple(t.lora_B.shape)) == ((RANK, cin), (cout, RANK))
    assert t.scaling == 1.0 / RANK and torch.count_nonzero(t.lora_B) == 0 and torch.count_nonzero(t.lora_A) > 0
    assert layer.spec() == {"type": "lora", "in_channels": cin, "out_channels": cout, "in_layout": TOKENS,
                            "out_layout": TOKENS, "rank": RANK, "alpha": 1.0}
    assert stitch_layer_from_spec(layer.spec()).spec() == layer.spec()
    linear = tiny({"type": "linear"})
    for c in stitched(net):  # W + b + A + B of every stitching layer the route runs
        n_layers = sum(s[0] == "stitch" for s in net.routes[c])
        assert net.params(c) == linear.params(c) + n_layers * RANK * (cin + cout)
    assert create_stitch_layer({"type": "lora"}, 64, 128).rank == 64  # SN-Netv2's default
    with pytest.raises(ValueError, match="rank 64 is above the smaller width of 8 -> 16"):
        create_stitch_layer({"type": "lora"}, 8, 16)  # a rank above the widths is no low-rank update
    for bad in ({"rank": 0}, {"rank": 2.5}, {"alpha": 0}):
        with pytest.raises(ValueError, match="rank|alpha"):
            create_stitch_layer({"type": "lora", **bad}, 8, 16)


def test_ls_init_gives_the_linear_layers_outputs():
    net, linear = tiny(), tiny({"type": "linear"})
    linear.anchors.load_state_dict(net.anchors.state_dict())
    images = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ls_init(net, [images])
    ls_init(linear, [images])
    for a, b in zip(layers(net), layers(linear)):
        assert torch.equal(a.transform.weight, b.transform.weight) and torch.equal(a.transform.bias, b.transform.bias)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for c in range(net.num_configs):
            assert max_diff(net.eval()(x, c), linear.eval()(x, c)) < 1e-6, c


def test_training_moves_b_a_b_not_w_and_merged_is_equivalent(trained):
    net, init, _ = trained
    state = net.stitch_layers.state_dict()
    for k, v in state.items():
        # W frozen, even with requires_grad flipped on; b, A, B of every layer (all are used) trained
        assert torch.equal(v, init[k]) == k.endswith(".weight"), k
    assert all(torch.count_nonzero(layer.transform.lora_B) > 0 for layer in layers(net))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        for layer in layers(net):
            feats = torch.randn(3, 17, layer.transform.in_features)
            merged = layer.merged()
            assert type(merged) is StitchingLayer and merged.spec()["type"] == "linear"
            assert count_params(merged) == layer.transform.in_features * layer.transform.out_features + \
                layer.transform.out_features
            assert max_diff(merged(feats), layer(feats)) < 1e-5
        for c in stitched(net):  # the standalone network runs the merged layers
            module, _ = stitched_network(net, c)
            assert all(type(m) is StitchingLayer for m in module.stitch_layers.values())
            assert max_diff(module(x), net(x, c)) < 1e-5, c
    assert all(torch.count_nonzero(layer.transform.lora_B) > 0 for layer in layers(net))  # nothing merged in place
    net.train()
    net.eval()  # no in-place merge on eval() (SN-Netv2's resume bug): the weights are the trained ones
    assert all(torch.equal(v, net.stitch_layers.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("in_layout,out_layout", [(NCHW, NCHW), (NCHW, TOKENS), (TOKENS, NCHW), (NHWC, NCHW)])
def test_layouts_match_the_linear_type(in_layout, out_layout):
    torch.manual_seed(0)
    lora = create_stitch_layer({"type": "lora", "rank": 3}, 6, 5, in_layout, out_layout)
    linear = create_stitch_layer(None, 6, 5, in_layout, out_layout)
    W, b = torch.randn(5, 6), torch.randn(5)
    lora.set_affine(W, b)
    linear.set_affine(W, b)
    x = {NCHW: torch.randn(2, 6, 4, 4), NHWC: torch.randn(2, 4, 4, 6), TOKENS: torch.randn(2, 16, 6)}[in_layout]
    with torch.no_grad():
        assert max_diff(lora(x), linear(x)) < 1e-5
        torch.nn.init.normal_(lora.transform.lora_B)
        assert max_diff(lora(x), linear(x)) > 1e-3
        merged = lora.merged()
        assert merged.spec() == linear.spec() and max_diff(merged(x), lora(x)) < 1e-5


def test_export_writes_one_linear_layer_with_the_snnets_logits(trained, tmp_path):
    net, _, folder = trained
    loaded = load_snnet(folder / "ckpt.pth.tar", folder / "cfg.json")
    c = stitched(loaded.net)[-1]
    spec = export_stitch(loaded, c, tmp_path / "out", formats=())
    (key, layer_spec), = spec["stitch_layers"].items()
    cin, cout = layer_spec["in_channels"], layer_spec["out_channels"]
    assert layer_spec["type"] == "linear" and "rank" not in layer_spec
    assert spec["params"] == loaded.net.params(c) - RANK * (cin + cout)
    from snnet.stitching.cost import cost_table
    # the cost model counts the merged linear map (SN-Netv2's convention), which is what the export runs
    assert spec["flops"] == cost_table(loaded.net, 16).route_flops(loaded.net.routes[c])
    exported = load_exported(tmp_path / "out")
    layer = exported.stitch_layers[key]
    assert type(layer) is StitchingLayer and isinstance(layer.transform, torch.nn.Linear)
    assert count_params(layer) == cin * cout + cout
    assert sorted(k for k in exported.state_dict() if k.startswith("stitch_layers.")) == \
        [f"stitch_layers.{key}.transform.bias", f"stitch_layers.{key}.transform.weight"]
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(exported(images), loaded.net(images, c)) < 1e-5
        assert max_diff(exported(images), net.eval()(images, c)) < 1e-5
    assert spec["max_abs_diff_vs_snnet"]["reloaded"] < 1e-5


HOOK = """
import sys, torch, snnet.train.main as m, snnet.train.trainer as t
fit, path = t.Trainer.fit, sys.argv[1]
def keep_ls_init(self, *args):
    state = self.model.state_dict()
    torch.save({k: v.detach().clone() for k, v in state.items() if k.startswith("stitch_layers.")}, path)
    return fit(self, *args)
t.Trainer.fit = keep_ls_init
sys.exit(m.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_train_py_keeps_w_frozen_at_the_ls_init(tmp_path, digits_folder):
    """train.py's main() (its whole code), with `Trainer.fit` wrapped to record the stitching layers after the LS
    init."""
    cfg, init = tmp_path / "lora.json", tmp_path / "init.pt"
    cfg.write_text(json.dumps({**VALUES, "stitch_init_bs": 32}))
    r = run([sys.executable, "-c", HOOK, init, digits_folder, "--stitch_config", cfg, *FAST, "--epochs", "2",
             "--output", tmp_path, "--experiment", "lora"])
    assert r.returncode == 0, r.stderr[-3000:]
    before = torch.load(init, weights_only=True)
    after = torch.load(tmp_path / "lora" / "last.pth.tar", weights_only=True)
    assert after["epoch"] == 1
    sd = {k: v for k, v in after["state_dict"].items() if k.startswith("stitch_layers.")}
    assert sd.keys() == before.keys() and {k.rsplit(".", 1)[1] for k in sd} == KEYS
    for k, v in sd.items():
        if k.endswith(".weight"):
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in sd.items() if k.endswith(".lora_B"))
    assert all(torch.count_nonzero(before[k]) == 0 for k in before if k.endswith(".lora_B"))


def test_flops_count_the_merged_layer_as_snnetv2():
    """Deployed, a LoRA stitching layer is one linear map: its FLOPs are the linear layer's (SN-Netv2 counted the
    merged layer, since it merged on eval())."""
    from snnet.stitching.cost import measure
    lora, linear = tiny({"type": "lora", "rank": 4}), tiny({"type": "linear"})
    t_lora, t_linear = measure(lora, 16), measure(linear, 16)
    assert t_lora.layer_flops == t_linear.layer_flops
    assert [t_lora.route_flops(s) for s in lora.routes] == [t_linear.route_flops(s) for s in linear.routes]
