"""snnet: a family-agnostic library for Stitchable Neural Networks (SN-Net) over timm models.

See snnet/README.md for the architecture and how to add a model family, docs/python_api.md for the Python API
(`snnet.create_snnet`, `snnet.ls_init_from_images`, `snnet.evaluate`, `snnet.stitch_for`, `snnet.load`,
`snnet.export`, `snnet.predict`: snnet/api.py).
"""
from typing import TYPE_CHECKING

#: where each name of the package lives; imported on first use (PEP 562), so that `import snnet.x` is as light as
#: snnet.x itself: train.py installs its Slurm signal handlers (snnet.train.preempt, no torch) before torch loads
_CORE = {
    "snnet.stitching.adapter": ("AnchorAdapter", "AnchorError", "Unit", "register_adapter"),
    "snnet.stitching.build": ("build_snnet", "create_anchor", "plan_for"),
    "snnet.stitching.config": ("ConfigError", "StitchConfig", "load_stitch_config", "parse_stitch_config"),
    "snnet.stitching.layers": ("StitchingLayer", "create_stitch_layer", "register_stitch_layer"),
    "snnet.stitching.model": ("PlainNet", "RoutedNet", "SNNet"),
    "snnet.stitching.plan": ("PlanError", "Route", "Junction", "StitchPlan", "deit_plan", "paired_positions",
                        "stagewise_plan", "unpaired_positions"),
}
_WHERE = {name: module for module, names in _CORE.items() for name in names}

if TYPE_CHECKING:
    from snnet.stitching.adapter import AnchorAdapter, AnchorError, Unit, register_adapter
    from snnet.stitching.build import build_snnet, create_anchor, plan_for
    from snnet.stitching.config import ConfigError, StitchConfig, load_stitch_config, parse_stitch_config
    from snnet.stitching.layers import StitchingLayer, create_stitch_layer, register_stitch_layer
    from snnet.stitching.model import PlainNet, RoutedNet, SNNet
    from snnet.stitching.plan import (
        Junction,
        PlanError,
        Route,
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
    "PlanError", "Route", "Junction", "StitchPlan", "deit_plan", "paired_positions", "stagewise_plan",
    "unpaired_positions",
    *("create_snnet", "ls_init_from_images", "evaluate", "stitch_for", "load", "export", "predict", "data_config"),
]

#: the Python API (snnet/api.py) imports the train and deploy layers; loaded on first use so that `import snnet`
#: stays the core alone
_API = ("create_snnet", "ls_init_from_images", "evaluate", "stitch_for", "load", "export", "predict", "data_config")


def __getattr__(name: str):
    if name in _WHERE:
        import importlib
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    if name in _API:
        import snnet.api as api  # lazy: see _API
        return getattr(api, name)
    raise AttributeError(f"module 'snnet' has no attribute {name!r}")
