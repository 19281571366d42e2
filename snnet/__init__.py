"""snnet: a family-agnostic library for Stitchable Neural Networks (SN-Net) over timm models.

See snnet/README.md for the architecture and how to add a model family.
"""
from snnet.core.adapter import AnchorAdapter, AnchorError, Unit, register_adapter
from snnet.core.build import build_snnet, create_anchor, plan_for
from snnet.core.config import ConfigError, StitchConfig, load_stitch_config, parse_stitch_config
from snnet.core.layers import StitchingLayer, create_stitch_layer, register_stitch_layer
from snnet.core.model import PlainNet, RoutedNet, SNNet
from snnet.core.plan import (
    PlanError,
    Route,
    Stitch,
    StitchPlan,
    deit_plan,
    paired_positions,
    stagewise_plan,
    unpaired_positions,
)

__all__ = [
    "AnchorAdapter", "AnchorError", "Unit", "register_adapter", "build_snnet", "create_anchor", "plan_for",
    "ConfigError", "StitchConfig", "load_stitch_config", "parse_stitch_config", "StitchingLayer", "create_stitch_layer",
    "register_stitch_layer", "SNNet", "RoutedNet", "PlainNet",
    "PlanError", "Route", "Stitch", "StitchPlan", "deit_plan", "paired_positions", "stagewise_plan",
    "unpaired_positions",
]
