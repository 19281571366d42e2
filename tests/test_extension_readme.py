"""The extension examples in snnet/README.md work as printed: a model family, a stitching-layer type, a sampler
and an export format, each registered by the README's own code and then used through the library."""
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import TINY, trace_route_flops

from snnet import build_snnet, parse_stitch_config
from snnet.deploy.export import export_stitch, load_exported, load_snnet
from snnet.stitching.cost import measure
from snnet.stitching.ls_init import ls_init, stitch_errors
from snnet.train.sampler import create_sampler
from snnet.utils.checkpoint import save_checkpoint

README = Path(__file__).resolve().parent.parent / "snnet" / "README.md"


def readme_block(heading: str) -> str:
    """Run the first python block under `heading` of snnet/README.md (it registers its extension)."""
    section = README.read_text().split(f"## {heading}\n", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, f"snnet/README.md ({heading})", "exec"), {})
    return code


def test_readme_convnext_adapter_stitches():
    readme_block("Adding a model family")  # registers ConvNeXtAdapter
    torch.manual_seed(0)
    cfg = parse_stitch_config({"anchors": ["convnext_atto", "convnext_femto"], "num_classes": 10})
    model = build_snnet(cfg, pretrained=False, num_classes=10)
    assert [type(a).__name__ for a in model.adapters] == ["ConvNeXtAdapter"] * 2
    assert model.num_configs == 2 + 1 + 5  # anchors + stage 1 (depth 2: one position) + stage 2 (depth 6: five)
    x = torch.randn(4, 3, 64, 64)
    before = sum(stitch_errors(model, x).values())
    ls_init(model, [x])
    assert sum(stitch_errors(model, x).values()) < 0.5 * before
    model.eval()
    for c in range(model.num_configs):
        assert model(x, c).shape == (4, 10)
    table = measure(model, 64)
    assert table.route_flops(model.routes[5]) == trace_route_flops(model, 5, 64)


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    """A tiny SN-Net whose config asks for the README's "scaled" stitching layers, LS-initialised, checkpointed."""
    readme_block("Adding a stitching-layer type")
    torch.manual_seed(0)
    values = {"anchors": TINY, "skip_final_norm": False, "stitch_layer": {"type": "scaled", "init_scale": 0.5}}
    net = build_snnet(parse_stitch_config(values), pretrained=False, num_classes=10, img_size=16)
    folder = tmp_path_factory.mktemp("scaled")
    (folder / "cfg.json").write_text(json.dumps(values))
    save_checkpoint(folder / "ckpt.pth.tar", {"state_dict": net.checkpoint_state(), "args": json.dumps(
        {"num_classes": 10, "img_size": 16})})
    return net, folder


def test_readme_stitching_layer_type_is_built_trained_and_exported(scaled, tmp_path):
    net, folder = scaled
    layer = net.stitch_layer(net.plan.layers[0].address)
    assert type(layer).__name__ == "ScaledStitchingLayer" and float(layer.gate.detach()) == 0.5
    assert any(k.endswith(".gate") for k in net.state_dict())
    x = torch.randn(8, 3, 16, 16)
    before = stitch_errors(net, x)
    ls_init(net, [x])  # set_affine is inherited: the gate still scales the fitted map
    assert stitch_errors(net, x) != before
    readme_block("Adding an export format")
    loaded = load_snnet(folder / "ckpt.pth.tar", folder / "cfg.json")
    stitched = next(c for c in range(loaded.net.num_configs) if "->" in loaded.net.describe(c))
    spec = export_stitch(loaded, stitched, tmp_path / "out", formats=("state_dict",))
    assert spec["files"] == {"weights": "model.safetensors", "state_dict": "model.pt"}
    assert spec["stitch_layers"][next(iter(spec["stitch_layers"]))]["type"] == "scaled"
    assert spec["max_abs_diff_vs_snnet"]["state_dict"] == 0.0
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(load_exported(tmp_path / "out")(images), loaded.net(images, stitched), atol=1e-6)
    assert sorted(torch.load(tmp_path / "out" / "model.pt", weights_only=True)) == \
        sorted(load_exported(tmp_path / "out").state_dict())


def test_readme_sampler_draws_anchors_first(scaled):
    readme_block("Adding a sampler")
    net, _ = scaled
    sampler = create_sampler({"type": "anchors_first", "warmup_steps": 50}, net, seed=3, rank=1)
    early, late = [sampler(s) for s in range(50)], [sampler(s) for s in range(50, 2000)]
    assert set(early) <= {0, 1} and len(set(late)) == net.num_configs
    again = create_sampler({"type": "anchors_first", "warmup_steps": 50}, net, seed=3, rank=1)
    assert [again(s) for s in range(100)] == early + late[:50]  # a pure function of (seed, rank, step)


@pytest.mark.slow
def test_a_checkout_that_was_never_installed_finds_its_families():
    """Without installed metadata (no entry points: a clone run as `python train.py`, or the image of a GPU machine
    that has torch but not this project) the four families come from the checkout's pyproject.toml; before, every
    anchor was refused with "supported families: none registered" (the first GPU run hit it)."""
    import subprocess
    import sys
    code = ("import importlib.metadata as m; real = m.entry_points; "
            "m.entry_points = lambda **k: [] if k.get('group') == 'snnet.families' else real(**k); "
            "from snnet.stitching.adapter import registered_adapters; "
            "print(sorted(c.family for c in registered_adapters()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=README.parent.parent).stdout
    families = eval(out)
    assert {"deit", "swin", "levit"} <= set(families), families
    assert len(families) >= 4, families
