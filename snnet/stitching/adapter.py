"""How a family package cuts one timm model into units the SN-Net can run piece by piece.

A unit is a contiguous piece of an anchor's forward: the stem/embedding, one block, a transition between stages
(downsampling), the final norm, the head. Units never own modules: they run the anchor's own submodules, so the
SN-Net's state dict keeps timm's names (``anchors.<i>.<timm name>``) and SN-Net checkpoints load strictly.

Adding a timm family is a subclass of `AnchorAdapter` (see snnet/README.md) registered with `register_adapter`.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from importlib.metadata import entry_points
from pathlib import Path

import torch
from torch import nn

from snnet.utils.errors import SNNetError

#: feature layouts a unit boundary can have
TOKENS = "tokens"  # (B, N, C), spatial tokens row-major over (h, w), prefix tokens (cls) first
NHWC = "nhwc"      # (B, H, W, C)
NCHW = "nchw"      # (B, C, H, W)
LAYOUTS = (TOKENS, NHWC, NCHW)

class AnchorError(SNNetError):
    """Anchors that cannot be built or stitched."""


@dataclass(frozen=True)
class Unit:
    name: str                      # readable, e.g. "blocks.3" or "layers.2.downsample"
    kind: str                      # stem, block, transition, norm or head
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # run(anchor_model, x) -> y
    modules: tuple[str, ...]       # names of the anchor's submodules/parameters this unit executes (for params)
    stage: int | None = None       # for blocks: the stage and the block index inside it
    index: int | None = None
    submodule: str | None = None   # the one submodule the unit runs, x -> submodule(x) (`module_unit`); else None


class AnchorAdapter:
    """Family-specific knowledge about one kind of timm model. Subclasses override the methods below."""

    #: short family name used in messages and configs
    family: str = ""
    #: stages SN-Net stitches for this family by default (hierarchical families only)
    default_stitch_stages: tuple[int, ...] = ()
    #: stitched routes skip the end anchor's final norm unless the config says otherwise (SN-Net's plain ViTs do)
    skip_final_norm_default: bool = False

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

    # --- the original SN-Net code's checkpoints of this family (`snnet convert`) -----------------------------------
    @classmethod
    def release_keys_match(cls, keys: Sequence[str]) -> bool:
        """True when `keys` (a released SN-Net state dict, ``module.`` removed) use this family's old key names
        that `convert_release_state` maps. Families whose released keys are timm 1.0's already keep False."""
        return False

    @classmethod
    def convert_release_state(cls, state_dict: dict[str, torch.Tensor],
                              stage_depths: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """A released SN-Net state dict with this project's keys (timm 1.0 names); `stage_depths` for families
        whose old keys number blocks flat across stages."""
        return state_dict


_ADAPTERS: list[type[AnchorAdapter]] = []


def block_units(units: Sequence[Unit]) -> dict[tuple[int, int], int]:
    """(stage, block index) -> the index in `units` of that block unit."""
    return {(u.stage, u.index): i for i, u in enumerate(units)  # type: ignore[misc]  # blocks have both set
            if u.kind == "block"}


def entry_unit(units: Sequence[Unit], stage: int, block: int, blocks: dict | None = None) -> int:
    """The unit where an anchor continues from block `block` of `stage`: that block's unit; one past the stage's
    last block when `block` is the stage's depth (SN-Netv2's stitch after the last small block enters the large
    anchor's final norm). The unit before it is the end side's cut point of a stitch into block `block` (what the
    least-squares init fits to). The one rule for SN-Net's routes, data-chosen positions and stitch-train.
    Raises KeyError when the anchor has no such block."""
    blocks = block_units(units) if blocks is None else blocks
    if (stage, block) not in blocks and block > 0 and (stage, block - 1) in blocks:
        return blocks[(stage, block - 1)] + 1
    return blocks[(stage, block)]


def register_adapter(cls: type[AnchorAdapter]) -> type[AnchorAdapter]:
    """Class decorator: make an adapter available to `adapter_for`."""
    if cls not in _ADAPTERS:
        _ADAPTERS.append(cls)
    return cls


def load_family_packages() -> None:
    """Import the family packages declared under the ``snnet.families`` entry-point group (pyproject.toml).

    Each package registers its adapters on import. Third-party packages can add families the same way. Run from a
    checkout that was never installed (``python train.py`` with the checkout on ``PYTHONPATH``, as
    distributed_train.sh does), there is no installed metadata: the families the checkout's own pyproject.toml
    declares are imported instead.
    """
    eps = list(entry_points(group="snnet.families"))
    for ep in eps:
        ep.load()
    if not eps:
        for module in _checkout_families():
            importlib.import_module(module)


def _checkout_families() -> list[str]:
    """The modules under ``[project.entry-points."snnet.families"]`` of the pyproject.toml beside this checkout's
    ``snnet`` package (none when there is no such file, as in an installed copy)."""
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    try:
        import tomllib  # Python 3.11+; on 3.10 a checkout must be installed (pip install -e .)
    except ModuleNotFoundError:
        return []
    if not pyproject.is_file():
        return []
    with open(pyproject, "rb") as f:
        declared = tomllib.load(f).get("project", {}).get("entry-points", {}).get("snnet.families", {})
    return [str(v).split(":")[0] for v in declared.values()]


def registered_adapters() -> list[type[AnchorAdapter]]:
    """Every adapter class the installed family packages register."""
    load_family_packages()
    return list(_ADAPTERS)


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
        if ".aux_bn." in pname:  # split-BN's auxiliary BatchNorms only run on augmented training halves
            continue
        if any(pname == n or pname.startswith(n + ".") for n in names) and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ------------------------------------------------------------------------------------------ unit builders for families
def _run_submodule(path: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # looked up at run time, so modules replaced in place later (split-BN, sync-BN) are the ones that run
    return model.get_submodule(path)(x)


def _run_forward_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(x)


def module_unit(path: str, kind: str, stage: int | None = None, index: int | None = None) -> Unit:
    """A unit that runs the anchor's submodule at `path` (e.g. ``blocks.3``, ``layers.1.downsample``)."""
    return Unit(path, kind, partial(_run_submodule, path), (path,), stage, index, submodule=path)


def head_unit(modules: Sequence[str]) -> Unit:
    """timm's ``forward_head`` (pooling, pre-logits norm, classifier), executing the named modules."""
    return Unit("head", "head", _run_forward_head, tuple(modules))


def stage_units(model: nn.Module, stages: str) -> list[Unit]:
    """Units of timm models whose ``<stages>[s]`` hold a ``downsample`` (a transition unit unless Identity) and a
    ``blocks`` list (Swin's ``layers``, LeViT's ``stages``)."""
    units = []
    for s, stage in enumerate(model.get_submodule(stages)):
        if not isinstance(stage.downsample, nn.Identity):
            units.append(module_unit(f"{stages}.{s}.downsample", "transition"))
        units += [module_unit(f"{stages}.{s}.blocks.{b}", "block", s, b) for b in range(len(stage.blocks))]
    return units
