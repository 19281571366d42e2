"""SN-Net's LeViT family: timm LeViT anchors (see README.md)."""
from .convert import ours_to_snnet, snnet_to_ours
from .levit import LevitAdapter

__all__ = ["LevitAdapter", "snnet_to_ours", "ours_to_snnet"]
