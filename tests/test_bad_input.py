"""Bad anchors, options and configs: each error names the value and what would be valid."""
import json

import pytest
import timm

from snnet import AnchorError, ConfigError, PlanError, build_snnet, load_stitch_config, parse_stitch_config, plan_for
from snnet.stitching.adapter import adapter_for

SMALL = dict(img_size=32, patch_size=8)


def vit(name, **kw):
    return timm.create_model(name, pretrained=False, **SMALL, **kw)


def test_unequal_depth_for_paired_stitching():
    models = [vit("deit_tiny_patch16_224", depth=6), vit("deit_small_patch16_224")]
    names = ["deit_tiny_patch16_224", "deit_small_patch16_224"]
    with pytest.raises(AnchorError, match="equal depth: 'deit_tiny_patch16_224' has 6 blocks, "
                                          "'deit_small_patch16_224' has 12"):
        plan_for(models, [adapter_for(m) for m in models], names)


def test_anchors_not_small_to_large():
    cfg = parse_stitch_config({"anchors": ["deit_small_patch16_224", "deit_tiny_patch16_224"]})
    with pytest.raises(AnchorError, match="not ordered small to large: 'deit_small_patch16_224' is 384 wide but "
                                          "'deit_tiny_patch16_224' is 192"):
        build_snnet(cfg, pretrained=False, **SMALL)
    tiny = lambda width: {"name": "deit_tiny_patch16_224", "model_kwargs": {"embed_dim": width}}  # noqa: E731
    cfg = parse_stitch_config({"anchors": [tiny(96), tiny(48)]})  # one timm name: named by their route labels
    with pytest.raises(AnchorError, match="'deit_tiny_patch16_224#0' is 96 wide but 'deit_tiny_patch16_224#1' is 48"):
        build_snnet(cfg, pretrained=False, **SMALL)


def test_unknown_timm_name_suggests():
    cfg = parse_stitch_config({"anchors": ["deit_tiny_patch16_224", "deit_smal_patch16_224"]})
    with pytest.raises(AnchorError, match="unknown timm model name 'deit_smal_patch16_224': did you mean "
                                          "deit_small_patch16_224"):
        build_snnet(cfg, pretrained=False)


@pytest.mark.parametrize("field,value,match", [
    ("stitch_kernel_size", 13, "stitch_kernel_size 13 is out of range: use between 1 and the anchors' depth 12"),
    ("stitch_stride", 40, "stitch_stride 40 is out of range"),
])
def test_kernel_stride_out_of_range(field, value, match):
    cfg = parse_stitch_config({"anchors": ["deit_tiny_patch16_224", "deit_small_patch16_224"], field: value})
    with pytest.raises(PlanError, match=match):
        build_snnet(cfg, pretrained=False, **SMALL)


@pytest.mark.parametrize("field,value,match", [
    ("stitch_kernel_size", 0, "'stitch_kernel_size' must be >= 1, got 0"),
    ("stitch_stride", "2", "'stitch_stride' must be int, got '2'"),
    ("nearest_stitching", 1, "'nearest_stitching' must be bool, got 1"),
    ("stitch_kernal_size", 2, "unknown field.*'stitch_kernal_size' \\(did you mean 'stitch_kernel_size'\\?\\)"),
    # a field that sets a flag is checked by the flag's declaration (choices, rule), worded as train.py's refusal
    ("ls_mode", "mean", "field 'ls_mode': 'mean' is not one of 'joint', 'average', 'snnet' \\(as for --ls-mode\\)"),
    ("batch_size", 0, "field 'batch_size': 0 is not >= 1 \\(as for -b/--batch-size\\); fix the value in the file"),
    ("num_workers", -1, "field 'num_workers': -1 is not >= 0 \\(as for -j/--workers\\)"),
    ("distillation_type", "medium", "'medium' is not one of 'none', 'soft', 'hard'"),
    ("lr", "1", "'lr' must be int or float, got '1'"),
])
def test_config_field_errors(field, value, match):
    with pytest.raises(ConfigError, match=match):
        parse_stitch_config({"anchors": ["deit_tiny_patch16_224"], field: value})


def test_config_anchor_errors():
    with pytest.raises(ConfigError, match="missing field 'anchors'"):
        parse_stitch_config({"lr": 1e-4})
    with pytest.raises(ConfigError, match="'anchors' is empty"):
        parse_stitch_config({"anchors": []})
    with pytest.raises(ConfigError, match="anchor 1 has unknown field.*'ckpt'"):
        parse_stitch_config({"anchors": ["deit_tiny_patch16_224", {"name": "x", "ckpt": "y"}]})


def test_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_stitch_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"anchors": ["deit_tiny_patch16_224",')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_stitch_config(bad)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"anchors": [{"name": "deit_tiny_patch16_224", "checkpoint": "ti.safetensors"}]}))
    assert load_stitch_config(good).anchors[0].checkpoint == str(tmp_path / "ti.safetensors")


def test_cfg_id_out_of_range():
    cfg = parse_stitch_config({"anchors": ["deit_tiny_patch16_224", "deit_small_patch16_224"]})
    model = build_snnet(cfg, pretrained=False, **SMALL)
    import torch
    x = torch.randn(1, 3, 32, 32)
    for bad in (36, -1, 2.0, True):
        with pytest.raises(PlanError, match=f"cfg_id {bad!r} is out of range: this network has cfg_ids 0..35"):
            model(x, bad)
    with pytest.raises(PlanError, match="cfg_id 99 is out of range"):
        model.params(99)


def test_local_anchor_checkpoint(tmp_path):
    import torch
    from safetensors.torch import save_file

    from snnet import create_anchor
    from snnet.stitching.config import AnchorSpec
    src = vit("deit_tiny_patch16_224")
    save_file(src.state_dict(), str(tmp_path / "ti.safetensors"))
    torch.save({"model": src.state_dict()}, tmp_path / "ti.pth")
    for f in ("ti.safetensors", "ti.pth"):
        m = create_anchor(AnchorSpec("deit_tiny_patch16_224", str(tmp_path / f)), pretrained=True, **SMALL)
        assert torch.equal(m.pos_embed, src.pos_embed)
    with pytest.raises(AnchorError, match="checkpoint of anchor 'deit_small_patch16_224' .* does not fit"):
        create_anchor(AnchorSpec("deit_small_patch16_224", str(tmp_path / "ti.pth")), pretrained=False, **SMALL)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(AnchorError, match="cannot be read"):
        create_anchor(AnchorSpec("deit_tiny_patch16_224", str(tmp_path / "junk.pth")), **SMALL)


def test_unavailable_pretrained_weights_are_one_line(monkeypatch):
    """A download that fails (offline, unknown tag, hub error) names the model and the ways out, no traceback."""
    from snnet import create_anchor
    from snnet.stitching.config import AnchorSpec

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub\nsecond line")
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(AnchorError, match=r"cannot load the pretrained weights of 'resnet18.tv_in1k' \(OSError: We "
                                          r"couldn't connect to the hub second line\); .*--no-pretrained"):
        create_anchor(AnchorSpec("resnet18.tv_in1k"), pretrained=True)
