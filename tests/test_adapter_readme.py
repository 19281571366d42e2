"""The "Adding a timm family" example in snnet/README.md works as printed: run it, stitch two ConvNeXts."""
import re
from pathlib import Path

import torch

from snnet import build_snnet, parse_stitch_config
from snnet.cost import measure, trace_route_flops
from snnet.ls_init import ls_init, stitch_errors


def test_readme_convnext_adapter_stitches():
    text = (Path(__file__).resolve().parent.parent / "snnet" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "snnet/README.md", "exec"), {})  # registers ConvNeXtAdapter
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
