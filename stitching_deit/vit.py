"""Cut timm ``VisionTransformer`` anchors (deit_*, vit_*) into embedding / blocks / final norm / head.

Units run timm's own submodules, so the SN-Net keys are ``anchors.<i>.<timm ViT names>`` as in SN-Net
(docs/snnet_compat.md, C27).
"""
from __future__ import annotations

import re

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from snnet.stitching.adapter import TOKENS, AnchorAdapter, Unit, head_unit, module_unit, register_adapter

#: a LayerScale key of DeiT-III's own ViT code (SN-Netv2's anchors)
RELEASE_KEY = re.compile(r"(\bblocks\.\d+)\.gamma_([12])$")

_EMBED_MODULES = ("patch_embed", "cls_token", "reg_token", "dist_token", "pos_embed", "norm_pre", "patch_drop")
_HEAD_MODULES = ("attn_pool", "fc_norm", "head", "head_dist")


def _embed(model: VisionTransformer, x):
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


@register_adapter
class VisionTransformerAdapter(AnchorAdapter):
    family = "deit"
    #: SN-Net's stitched DeiT routes skip the end anchor's final norm (docs/snnet_compat.md, C7);
    #: configs can turn it off
    skip_final_norm_default = True

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    @classmethod
    def release_keys_match(cls, keys) -> bool:
        # SN-Netv2's DeiT-III anchors (DeiT-III's own vit_models) name LayerScale gamma_1 / gamma_2; SN-Net v1's DeiT
        # keys are timm's already
        return any(RELEASE_KEY.search(k) for k in keys)

    @classmethod
    def convert_release_state(cls, state_dict, stage_depths=None):
        """DeiT-III's ``blocks.<n>.gamma_{1,2}`` -> timm's ``blocks.<n>.ls{1,2}.gamma``; every other key (and the
        LoRA stitching layers' ``transform.{weight,bias,lora_A,lora_B}``) is the same (docs/snnet_compat.md, C36)."""
        return {RELEASE_KEY.sub(r"\1.ls\2.gamma", k): v for k, v in state_dict.items()}

    def units(self, model: VisionTransformer) -> list[Unit]:
        def present(names):
            return tuple(n for n in names if getattr(model, n, None) is not None)

        units = [Unit("embed", "stem", _embed, present(_EMBED_MODULES))]
        units += [module_unit(f"blocks.{i}", "block", 0, i) for i in range(len(model.blocks))]
        units.append(module_unit("norm", "norm"))
        units.append(head_unit(present(_HEAD_MODULES)))
        return units

    def stage_depths(self, model: VisionTransformer) -> list[int]:
        return [len(model.blocks)]

    def stage_width(self, model: VisionTransformer, stage: int) -> int:
        return model.embed_dim

    def stage_layout(self, model: VisionTransformer, stage: int) -> str:
        return TOKENS
