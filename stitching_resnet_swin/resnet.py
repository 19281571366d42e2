"""Cut timm ``ResNet`` anchors (resnet18, resnet50, and the other timm ResNet variants) into units.

SN-Net's stage s is timm's ``layer{s+1}``. Each stage's downsampling (strided conv + projection shortcut) lives
inside its block 0, and SN-Net's stitches always enter the end anchor at a block k >= 1, so no stitch crosses a
resolution change; the least-squares target of block k is the output of block k-1 at the same resolution.
Features are NCHW, so stitching layers are 1x1 convolutions (docs/snnet_compat.md, C8).

Units call the anchor's modules by attribute at run time, so replacing modules in place afterwards (timm's
``convert_splitbn_model`` for ``--split-bn``, ``convert_sync_batchnorm``) keeps the SN-Net working.
"""
from __future__ import annotations

from timm.models.resnet import ResNet
from torch import nn

from snnet.stitching.adapter import NCHW, AnchorAdapter, Unit, head_unit, module_unit, register_adapter

_STEM_MODULES = ("conv1", "bn1", "act1", "maxpool")


def _stem(model: ResNet, x):
    return model.maxpool(model.act1(model.bn1(model.conv1(x))))


def _stages(model: ResNet) -> list[nn.Sequential]:
    stages = []
    while hasattr(model, f"layer{len(stages) + 1}"):
        stages.append(getattr(model, f"layer{len(stages) + 1}"))
    return stages


@register_adapter
class ResNetAdapter(AnchorAdapter):
    family = "resnet"
    default_stitch_stages = (1, 2)  # SN-Net skips stage 0 and the last stage (docs/snnet_compat.md, C5)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return isinstance(model, ResNet)

    def units(self, model: ResNet) -> list[Unit]:
        units = [Unit("stem", "stem", _stem, _STEM_MODULES)]
        for s, stage in enumerate(_stages(model)):
            units += [module_unit(f"layer{s + 1}.{b}", "block", s, b) for b in range(len(stage))]
        units.append(head_unit(("global_pool", "fc")))
        return units

    def stage_depths(self, model: ResNet) -> list[int]:
        return [len(stage) for stage in _stages(model)]

    def stage_width(self, model: ResNet, stage: int) -> int:
        return model.feature_info[stage + 1]["num_chs"]  # feature_info[0] is the stem

    def stage_layout(self, model: ResNet, stage: int) -> str:
        return NCHW
