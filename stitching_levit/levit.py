"""Cut timm ``Levit`` / ``LevitDistilled`` anchors (levit_192, levit_256, any depth) into units.

timm nests what SN-Net's LeViT kept in one flat ``blocks`` list: stage s is ``stages[s]``, SN-Net's attention/MLP
residual pair b of that stage is ``stages[s].blocks[b]``, and the attention-subsample + MLP between stages is
``stages[s].downsample`` (a "transition" unit). Units are read from that structure, so every depth works, not only
SN-Net's hard-coded 4-4-4 (docs/snnet_compat.md, C10).

The distillation head: SN-Net's LeViT returns (head, head_dist) in training and their mean in evaluation
(docs/snnet_compat.md, C10).
timm does the same once ``set_distilled_training(True)`` is called, which this adapter does for each anchor;
call ``anchor.set_distilled_training(False)`` to train on the averaged logits instead.
"""
from __future__ import annotations

from timm.models.levit import Levit
from torch import nn

from snnet.stitching.adapter import NCHW, TOKENS, AnchorAdapter, Unit, head_unit, register_adapter, stage_units

from .convert import RELEASE_KEY, snnet_to_ours


def _stem(model: Levit, x):
    x = model.stem(x)
    return x if model.use_conv else x.flatten(2).transpose(1, 2)


@register_adapter
class LevitAdapter(AnchorAdapter):
    family = "levit"
    default_stitch_stages = (0, 1)  # SN-Net never stitches the last stage (docs/snnet_compat.md, C5)

    @classmethod
    def release_keys_match(cls, keys) -> bool:
        return any(RELEASE_KEY.search(k) for k in keys)

    @classmethod
    def convert_release_state(cls, state_dict, stage_depths=None):
        return snnet_to_ours(state_dict, tuple(stage_depths) if stage_depths else None)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, Levit)

    def units(self, model: Levit) -> list[Unit]:
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # both heads in training, as SN-Net (see module docstring)
        # the head: mean over tokens, then head (and head_dist: a tuple in training, their mean in eval)
        return [Unit("stem", "stem", _stem, ("stem",)), *stage_units(model, "stages"),
                head_unit(("head", "head_dist"))]

    def stage_depths(self, model: Levit) -> list[int]:
        return [len(stage.blocks) for stage in model.stages]

    def stage_width(self, model: Levit, stage: int) -> int:
        return model.feature_info[stage]["num_chs"]

    def stage_layout(self, model: Levit, stage: int) -> str:
        return NCHW if model.use_conv else TOKENS
