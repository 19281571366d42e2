"""SN-Net's Swin family: timm Swin Transformer anchors (see README.md)."""
from .convert import ours_to_snnet, snnet_to_ours
from .swin import SwinTransformerAdapter

__all__ = ["SwinTransformerAdapter", "snnet_to_ours", "ours_to_snnet"]
