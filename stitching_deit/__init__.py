"""SN-Net's plain-ViT family: DeiT / ViT anchors from timm (see README.md)."""
from .vit import VisionTransformerAdapter

__all__ = ["VisionTransformerAdapter"]
