"""State-dict keys: SN-Net's Swin checkpoints (Microsoft Swin names; docs/snnet_compat.md, C28) <-> ours
(timm 1.0 Swin names).

The map is one-to-one on parameters; only names move, no tensor changes shape or order:

=====================================================  =======================================================
SN-Net (Microsoft Swin / timm 0.7 Swin)                 ours (timm 1.0 Swin)
=====================================================  =======================================================
``anchors.{a}.patch_embed.{proj,norm}.*``               same
``anchors.{a}.layers.{s}.blocks.{b}.*``                 same (norm1, attn.qkv, attn.proj,
                                                        attn.relative_position_bias_table, norm2, mlp.fc1/fc2)
``anchors.{a}.layers.{s}.downsample.{norm,reduction}``  ``anchors.{a}.layers.{s+1}.downsample.*``: the merge
                                                        ran at the end of stage s, timm runs it at the start of
                                                        stage s+1
``anchors.{a}.norm.*``                                  same
``anchors.{a}.head.{weight,bias}``                      ``anchors.{a}.head.fc.*`` (timm's ClassifierHead)
``...attn.relative_position_index``, ``...attn_mask``   dropped: non-persistent buffers in timm 1.0, rebuilt
                                                        from the window size and resolution
``stitch_layers.{stage}.{pair}.{layer}.transform.*``    same
=====================================================  =======================================================

PatchMerging concatenates the 2x2 neighbours in the same order in both code bases (x[0::2, 0::2], x[1::2, 0::2],
x[0::2, 1::2], x[1::2, 1::2]), so ``downsample.norm`` / ``downsample.reduction`` need no permutation. The same map
serves the CNN family's R18 -> Swin-Ti checkpoints: ResNet keys (``layer1``, ``fc``) match none of the patterns.
"""
from __future__ import annotations

import re

import torch

#: buffers SN-Net's checkpoints carry that timm 1.0 recomputes (not in its state dict)
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")

#: a key only SN-Net's (Microsoft) Swin checkpoints have under these names
RELEASE_KEY = re.compile(r"(^|\.)layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table$")
_DOWNSAMPLE = re.compile(r"^((?:.+\.)?)layers\.(\d+)\.downsample\.")
_SNNET_HEAD = re.compile(r"^((?:.+\.)?)head\.(weight|bias)$")
_OUR_HEAD = re.compile(r"^((?:.+\.)?)head\.fc\.(weight|bias)$")


def _shift_downsample(key: str, by: int) -> str:
    return _DOWNSAMPLE.sub(lambda m: f"{m.group(1)}layers.{int(m.group(2)) + by}.downsample.", key)


def snnet_to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SN-Net Swin (or R18 -> Swin) state dict (DDP's ``module.`` already removed: `snnet convert` does) with our
    keys; loads strictly into our SN-Net."""
    out = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        key = _SNNET_HEAD.sub(r"\1head.fc.\2", _shift_downsample(key, +1))
        if key in out:
            raise KeyError(f"two SN-Net keys map to {key!r}; is this already a timm 1.0 state dict?")
        out[key] = value
    return out


def ours_to_snnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse map, for SN-Net's own code. The derived buffers are not restored: SN-Net's Swin loads with
    strict=False and keeps the values it computed; a strict loader (the CNN family's timm 0.7) needs them rebuilt."""
    out = {}
    for key, value in state_dict.items():
        if _DOWNSAMPLE.match(key) and int(_DOWNSAMPLE.match(key).group(2)) == 0:
            raise KeyError(f"{key!r}: timm's stage 0 has no downsample; is this already an SN-Net state dict?")
        out[_OUR_HEAD.sub(r"\1head.\2", _shift_downsample(key, -1))] = value
    return out
