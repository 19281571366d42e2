"""--freeze-anchors: only the stitching layers train; the anchors keep their weights and stay in eval mode."""
import sys

import pytest
import torch
from helpers import FAST, run

from snnet import build_snnet, parse_stitch_config


def test_frozen_anchors_stay_in_eval_mode_with_batchnorm():
    torch.manual_seed(0)
    net = build_snnet(parse_stitch_config({"anchors": ["resnet18", "resnet34"]}), pretrained=False, num_classes=10,
                      img_size=32)
    net.freeze_anchors()
    net.train()
    bns = [m for m in net.anchors.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and all(m.training for m in net.stitch_layers.modules())
    assert not any(p.requires_grad for p in net.anchors.parameters())
    before = {k: v.clone() for k, v in net.anchors.state_dict().items()}
    net(torch.randn(4, 3, 32, 32), 3).sum().backward()  # a training forward: no running statistics move
    assert all(torch.equal(v, before[k]) for k, v in net.anchors.state_dict().items())


@pytest.mark.slow
def test_train_py_freeze_anchors_trains_only_the_stitching_layers(digits_folder, tiny_config, tmp_path):
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, "--epochs", "2",
             "--freeze-anchors", "--eval-metric", "loss", "--output", tmp_path, "--experiment", "frozen"])
    assert r.returncode == 0, r.stderr[-2000:]
    first = torch.load(tmp_path / "frozen" / "checkpoint-0.pth.tar", weights_only=True)
    last = torch.load(tmp_path / "frozen" / "last.pth.tar", weights_only=True)
    anchors = [k for k in last["state_dict"] if k.startswith("anchors.")]
    stitches = [k for k in last["state_dict"] if k.startswith("stitch_layers.")]
    assert all(torch.equal(first["state_dict"][k], last["state_dict"][k]) for k in anchors)
    assert any(not torch.equal(first["state_dict"][k], last["state_dict"][k]) for k in stitches)
    n_trained = sum(len(g["params"]) for g in last["optimizer"]["param_groups"])
    assert n_trained == len(stitches)  # no optimizer state for the anchors


def test_excluded_cfg_ids_are_never_drawn_and_draws_stay_deterministic():
    from types import SimpleNamespace

    import pytest

    from snnet.train.sampler import create_sampler
    net = SimpleNamespace(num_configs=12)
    sampler = create_sampler(None, net, seed=1, rank=0, exclude=[0, 1])
    draws = [sampler(s) for s in range(3000)]
    assert set(draws) == set(range(2, 12)) and draws == [sampler(s) for s in range(3000)]
    counts = [draws.count(c) for c in range(2, 12)]
    assert max(counts) / min(counts) < 1.5  # the others keep equal frequencies
    with pytest.raises(ValueError, match="every cfg_id is excluded"):
        create_sampler(None, SimpleNamespace(num_configs=2), seed=1, rank=0, exclude=[0, 1])
