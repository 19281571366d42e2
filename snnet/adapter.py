"""How a family package cuts one timm model into units the SN-Net can run piece by piece.

A unit is a contiguous piece of an anchor's forward: the stem/embedding, one block, a transition between stages
(downsampling), the final norm, the head. Units never own modules: they run the anchor's own submodules, so the
SN-Net's state dict keeps timm's names (``anchors.<i>.<timm name>``) and SN-Net checkpoints load strictly.

Adding a timm family is a subclass of `AnchorAdapter` (see snnet/README.md) registered with `register_adapter`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

#: feature layouts a unit boundary can have
TOKENS = "tokens"  # (B, N, C), spatial tokens row-major over (h, w), prefix tokens (cls) first
NHWC = "nhwc"      # (B, H, W, C)
NCHW = "nchw"      # (B, C, H, W)
LAYOUTS = (TOKENS, NHWC, NCHW)

UNIT_KINDS = ("stem", "block", "transition", "norm", "head")


class AnchorError(ValueError):
    """Anchors that cannot be built or stitched."""


@dataclass(frozen=True)
class Unit:
    name: str                      # readable, e.g. "blocks.3" or "layers.2.downsample"
    kind: str                      # one of UNIT_KINDS
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # run(anchor_model, x) -> y
    modules: tuple[str, ...]       # names of the anchor's submodules/parameters this unit executes (for params)
    stage: int | None = None       # for blocks: the stage and the block index inside it
    index: int | None = None


class AnchorAdapter:
    """Family-specific knowledge about one kind of timm model. Subclasses override the methods below."""

    #: short family name used in messages and configs
    family: str = ""
    #: stages SN-Net stitches for this family by default (hierarchical families only)
    default_stitch_stages: tuple[int, ...] = ()

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def units(self, model: nn.Module) -> list[Unit]:
        """Units in execution order; running them all in turn equals ``model(x)`` in eval mode."""
        raise NotImplementedError

    def stage_depths(self, model: nn.Module) -> list[int]:
        """Blocks per stage (one stage for plain ViTs)."""
        raise NotImplementedError

    def stage_width(self, model: nn.Module, stage: int) -> int:
        """Channels of the features inside `stage`."""
        raise NotImplementedError

    def stage_layout(self, model: nn.Module, stage: int) -> str:
        """Layout of the features inside `stage` (one of LAYOUTS)."""
        raise NotImplementedError

    @property
    def hierarchical(self) -> bool:
        return bool(self.default_stitch_stages)


_ADAPTERS: list[type[AnchorAdapter]] = []


def register_adapter(cls: type[AnchorAdapter]) -> type[AnchorAdapter]:
    """Class decorator: make an adapter available to `adapter_for`."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def load_family_packages() -> None:
    """Import the family packages declared under the ``snnet.families`` entry-point group (pyproject.toml).

    Each package registers its adapters on import. Third-party packages can add families the same way.
    """
    from importlib.metadata import entry_points
    for ep in entry_points(group="snnet.families"):
        ep.load()


def adapter_for(model: nn.Module, name: str = "") -> AnchorAdapter:
    load_family_packages()
    for cls in _ADAPTERS:
        if cls.supports(model):
            return cls()
    known = ", ".join(c.family for c in _ADAPTERS) or "none registered"
    raise AnchorError(f"no stitching adapter for anchor {name or type(model).__name__!r} "
                      f"({type(model).__name__}); supported families: {known}")


def module_param_count(model: nn.Module, names: Sequence[str]) -> int:
    """Number of parameters under the given submodule/parameter names of `model` (each counted once)."""
    seen: set[int] = set()
    total = 0
    params = dict(model.named_parameters())
    for pname, p in params.items():
        if any(pname == n or pname.startswith(n + ".") for n in names) and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
