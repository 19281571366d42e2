"""build_snnet's family-agnostic resolution check (build.check_resolutions): anchors whose stitched stages do
not run at the same resolution are refused when the SN-Net is built, not deep inside the least-squares init."""
import pytest

from snnet import AnchorError, build_snnet, parse_stitch_config


def test_build_refuses_other_token_counts():
    """A ViT with 8-px patches has 4x the tokens of one with 16-px patches at the same image size."""
    cfg = parse_stitch_config({"anchors": ["deit_tiny_patch16_224", "vit_small_patch8_224"]})
    with pytest.raises(AnchorError, match=r"cannot stitch 'deit_tiny_patch16_224' to 'vit_small_patch8_224' in stage "
                                          r"0: at 32x32 input, 'deit_tiny_patch16_224' block 0 outputs 5 tokens but "
                                          r"'vit_small_patch8_224' block 0 takes 17 tokens; stitch anchors whose "
                                          r"stage 0 runs at the same resolution"):
        build_snnet(cfg, pretrained=False, img_size=32, depth=2)


def test_build_accepts_equal_resolutions():
    cfg = parse_stitch_config({"anchors": ["deit_tiny_patch16_224", "deit_small_patch16_224"]})
    assert build_snnet(cfg, pretrained=False, img_size=32, depth=2).num_configs == 2 + 4
