"""SN-Netv2's run as its recipe cards give it (docs/snnet_compat.md, C36): the same drop-path rate in every block,
DeiT-III's 3-Augment crop, and `train.py --eval` of configs/deit3_s_l_v2.json writing SN-Netv2's 134 networks
(plus id 13) with its released FLOPs row for row."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run

from snnet import build_snnet, load_stitch_config, parse_stitch_config
from snnet.stitching.config import ConfigError

ORACLE = Path(__file__).parent / "data" / "snnetv2_deit3_s_l_results.jsonl"


def drop_probs(anchor):
    from timm.layers import DropPath
    return [[b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0,
             b.drop_path2.drop_prob if isinstance(b.drop_path2, DropPath) else 0.0] for b in anchor.blocks]


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_drop_path_schedule(schedule):
    deit3 = lambda width, rate: {"name": "deit3_small_patch16_224", "model_kwargs": {
        "patch_size": 4, "depth": 4, "embed_dim": width, "num_heads": 2, "drop_path_rate": rate}}
    cfg = parse_stitch_config({"anchors": [deit3(8, 0.05), deit3(16, 0.3)], "stitch_plan": "two_way",
                               "skip_final_norm": False, "drop_path_schedule": schedule})
    net = build_snnet(cfg, pretrained=False, num_classes=10, img_size=16)
    for anchor, rate in zip(net.anchors, (0.05, 0.3)):
        probs = np.array(drop_probs(anchor))
        if schedule == "constant":  # SN-Netv2: every block at the anchor's rate
            assert np.allclose(probs, rate)
        else:  # timm: 0 at the first block, the rate at the last
            assert probs[0, 0] == 0 and np.isclose(probs[-1, 0], rate) and np.all(np.diff(probs[:, 0]) > 0)


def test_drop_path_schedule_typo_refused():
    with pytest.raises(ConfigError, match="drop_path_schedule.*'linear'.*'constant'.*'ramp'"):
        parse_stitch_config({"anchors": ["deit_tiny_patch16_224"], "drop_path_schedule": "ramp"})


def test_v2_cards_drop_path_constant():
    for name, rates in (("s_l", (0.05, 0.4)), ("s_b", (0.05, 0.15)), ("b_l", (0.15, 0.4))):
        cfg = load_stitch_config(f"configs/deit3_{name}_v2.json")
        assert cfg.get("drop_path_schedule") == "constant"
        assert tuple(a.model_kwargs["drop_path_rate"] for a in cfg.anchors) == rates
        assert cfg.get("recipe")["train-crop-mode"] == "src"


def test_src_crop_is_deit3_three_augment_crop():
    """--train-crop-mode src: resize the short side, random crop with 4 px reflect padding (DeiT-III's `--src`), in
    place of timm's random-resized crop; the rest of timm's 3-Augment transform is kept."""
    from PIL import Image
    from timm.data import create_transform
    from torchvision import transforms as T

    from snnet.data.transforms import src_crop
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8))
    tf = src_crop(create_transform(24, is_training=True, auto_augment="3a", interpolation="bicubic", hflip=0.0,
                                   color_jitter=0.0), 24)
    names = [type(t).__name__ for t in tf.transforms]
    assert "RandomResizedCropAndInterpolation" not in names and names[0] == "Compose"
    crop = tf.transforms[0]
    want = T.Compose([T.Resize(24, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomCrop(24, padding=4, padding_mode="reflect")])
    for seed in range(5):
        torch.manual_seed(seed)
        a = np.asarray(crop(img))
        torch.manual_seed(seed)
        b = np.asarray(want(img))
        assert a.shape == (24, 24, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="no random-resized crop"):
        src_crop(T.Compose([T.ToTensor()]), 24)


@pytest.mark.slow
def test_src_crop_mode_in_train_loader(digits_folder, tiny_config, tmp_path):
    """The training loader of a run with --train-crop-mode src crops as DeiT-III does; such a run trains."""
    from helpers import FAST

    from snnet.data.datasets import create_datasets
    from snnet.data.loaders import create_train_loader
    from snnet.train.args import parse_args
    args, _ = parse_args([str(digits_folder), "--stitch_config", str(tiny_config), *FAST, "--aa", "3a",
                          "--train-crop-mode", "src"])
    args.distributed = False
    train, _ = create_datasets(args, need_train=True)
    loader = create_train_loader(train, args, {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3},
                                 torch.device("cpu"))
    crop = loader.dataset.transform.transforms[0]
    assert [type(t).__name__ for t in crop.transforms] == ["Resize", "RandomCrop"] and crop.transforms[1].padding == 4
    assert next(iter(loader))[0].shape == (16, 3, 16, 16)
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, "--epochs", "1",
             "--aa", "3a", "--train-crop-mode", "src", "--output", tmp_path, "--experiment", "src"])
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_eval_deit3_s_l_v2_writes_snnetv2_networks(tmp_path):
    """`train.py --eval --no-pretrained --num-classes 1000` of the S/L card: a line for each of SN-Netv2's 134 cfg_ids
    plus id 13 (kept as a real network), each with the FLOPs and params of the network built, every image counted.

    At 32 px (2x2 patches): at 224 px the 135 evaluations of DeiT-III S/L took 6 min on one CPU thread. The released
    FLOPs and timm's params at 224 are checked row for row on the same library code by test_snnetv2_plan."""
    from PIL import Image

    from snnet.stitching.cost import cost_table
    val = tmp_path / "data" / "val" / "c0"
    val.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 260, 3), dtype=np.uint8)).save(val / "0.png")
    r = run([sys.executable, "train.py", tmp_path / "data", "--stitch_config", "configs/deit3_s_l_v2.json", "--eval",
             "--no-pretrained", "--num-classes", "1000", "--img-size", "32", "-b", "1", "-j", "0", "--output",
             tmp_path, "--experiment", "v2"], timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (tmp_path / "v2" / "stitches_res.txt").read_text().splitlines()
    ours = {rec["cfg_id"]: rec for rec in map(json.loads, lines)}
    assert len(lines) == len(ours)  # one line per cfg_id
    theirs = [json.loads(line) for line in ORACLE.read_text().splitlines()]
    assert sorted(ours) == list(range(135)) and len(theirs) == 134
    model = build_snnet(load_stitch_config("configs/deit3_s_l_v2.json"), pretrained=False, num_classes=1000,
                        img_size=32, weight_init="skip")  # FLOPs and params only: no 300M random weights drawn
    table = cost_table(model, 32)
    assert {c: rec["flops"] for c, rec in ours.items()} == {c: table.route_flops(model.routes[c]) for c in ours}
    assert [ours[i]["params"] for i in (0, 1)] == [model.params(0), model.params(1)]
    assert all(rec["samples"] == 1 for rec in ours.values())
