"""SN-Net's CNN and CNN -> ViT family: timm ResNet anchors, stitched to each other or to timm Swin (README.md).

The Swin adapter and the Swin key map are stitching_swin's, imported (not copied) so that this package is enough
for an R18 -> Swin-Ti SN-Net.
"""
from stitching_swin import SwinTransformerAdapter, ours_to_snnet, snnet_to_ours

from .resnet import ResNetAdapter

__all__ = ["ResNetAdapter", "SwinTransformerAdapter", "snnet_to_ours", "ours_to_snnet"]
