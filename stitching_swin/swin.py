"""Cut timm ``SwinTransformer`` anchors (swin_{tiny,small,base}_patch4_window7_224, ...) into units.

timm 1.0's Swin runs each stage's PatchMerging at the *start* of ``layers[s]`` (s >= 1) and keeps features NHWC
(B, H, W, C); SN-Net's Microsoft Swin ran it at the *end* of stage s-1 on tokens. Either way the merge sits between
two stages, so it is its own "transition" unit here: a stitch (j -> k) inside stage s never crosses it, and the
least-squares target of k = 0 (the stage input) is the merge's output, as in SN-Net (docs/snnet_compat.md, C9).
"""
from __future__ import annotations

from timm.models.swin_transformer import SwinTransformer
from torch import nn

from snnet.stitching.adapter import NHWC, AnchorAdapter, Unit, head_unit, module_unit, register_adapter, stage_units

from .convert import RELEASE_KEY, snnet_to_ours


def _stem(model: SwinTransformer, x):
    return model.patch_embed(x)  # NHWC; timm's Swin has no absolute position embedding


@register_adapter
class SwinTransformerAdapter(AnchorAdapter):
    family = "swin"
    default_stitch_stages = (0, 1, 2)  # SN-Net never stitches the last stage (docs/snnet_compat.md, C5)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        # the exact class: SwinTransformerV2 / V2Cr are other classes with other block layouts
        return isinstance(model, SwinTransformer)

    @classmethod
    def release_keys_match(cls, keys) -> bool:
        # Microsoft Swin's relative-position tables; ResNet keys (the R18 -> Swin family) match nothing here
        return any(RELEASE_KEY.search(k) for k in keys)

    @classmethod
    def convert_release_state(cls, state_dict, stage_depths=None):
        return snnet_to_ours(state_dict)

    def units(self, model: SwinTransformer) -> list[Unit]:
        return [Unit("patch_embed", "stem", _stem, ("patch_embed",)), *stage_units(model, "layers"),
                module_unit("norm", "norm"), head_unit(("head",))]

    def stage_depths(self, model: SwinTransformer) -> list[int]:
        return [len(stage.blocks) for stage in model.layers]

    def stage_width(self, model: SwinTransformer, stage: int) -> int:
        return model.feature_info[stage]["num_chs"]

    def stage_layout(self, model: SwinTransformer, stage: int) -> str:
        return NHWC
