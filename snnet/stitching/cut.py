"""The one way to cut an anchor at a unit and stitch it to another anchor's unit.

A *cut point* is the output of one unit (stem, block, transition, norm, head) of one anchor, as the family's
adapter cuts it: its layout (tokens, NHWC, NCHW maps, or a flat pooled vector), channels, spatial extent and prefix
tokens (timm's ``num_prefix_tokens``: class, distillation, register tokens). `cut_points` probes them from the
units' outputs on one batch; `why_not_stitchable` is the one stitchability rule; `CutStitch` is the one stitch
between two cut points (the library's stitching layer on the spatial positions with the layout bridge, plus the
prefix-token bridge). SN-Net's routes, the compatibility maps, `snnet search` and `snnet stitch-train` all cut and
stitch through this module.
"""
from __future__ import annotations

import copy
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from snnet.stitching.adapter import NCHW, NHWC, TOKENS, AnchorError
from snnet.stitching.layers import create_stitch_layer, to_rows
from snnet.stitching.lstsq import NormalEquations, affine_of, as_affine, from_affine

FLAT = "flat"  # (B, C): a pooled output (the head's logits)


@dataclass(frozen=True)
class CutPoint:
    """The output of unit `unit` of anchor `anchor`, for one image: layout, channels, spatial extent (tokens: their
    count without the prefix tokens; maps: (H, W); flat: ()), prefix tokens."""
    anchor: int
    unit: int
    name: str
    kind: str
    layout: str
    channels: int
    extent: tuple[int, ...]
    prefix: int = 0

    @property
    def positions(self) -> int:
        return math.prod(self.extent) if self.extent else 1

    def to_json(self) -> dict[str, Any]:
        return {"index": self.unit, "name": self.name, "kind": self.kind, "layout": self.layout,
                "channels": self.channels, "extent": list(self.extent), "prefix_tokens": self.prefix}


def _unit_layout(net, a: int, u: int, ndim: int) -> str:
    """Layout of unit u's output: flat for (B, C), tokens for (B, N, C); a 4-D map takes the layout of the stage of
    the nearest block unit (the unit's own, else the next, else the previous): the adapter says it per stage."""
    if ndim == 2:
        return FLAT
    if ndim == 3:
        return TOKENS
    units, model, adapter = net.units[a], net.anchor(a), net.adapters[a]
    order = [u] + list(range(u + 1, len(units))) + list(range(u - 1, -1, -1))
    for v in order:
        if units[v].kind == "block" and units[v].stage is not None:
            return adapter.stage_layout(model, units[v].stage)
    raise AnchorError(f"anchor {net.names[a]!r} has no block units: the layout of its 4-D unit outputs is unknown")


def cut_points(net, outputs: dict[tuple[int, int], torch.Tensor]) -> list[list[CutPoint]]:
    """Every unit's cut point, from the units' outputs on a batch (``net.capture`` of every unit)."""
    cuts = []
    for a, units in enumerate(net.units):
        prefix = int(getattr(net.anchor(a), "num_prefix_tokens", 0) or 0)
        row = []
        for u, unit in enumerate(units):
            x = outputs[(a, u)]
            layout = _unit_layout(net, a, u, x.dim())
            extent: tuple[int, ...]
            if layout == FLAT:
                channels, extent, pre = x.shape[1], (), 0
            elif layout == TOKENS:
                channels, extent, pre = x.shape[2], (x.shape[1] - prefix,), prefix
            elif layout == NCHW:
                channels, extent, pre = x.shape[1], tuple(x.shape[2:4]), 0
            else:
                channels, extent, pre = x.shape[3], tuple(x.shape[1:3]), 0
            row.append(CutPoint(a, u, unit.name, unit.kind, layout, int(channels), tuple(int(e) for e in extent),
                                pre))
        cuts.append(row)
    return cuts


def joint_tokens(front: CutPoint, end: CutPoint) -> bool:
    """Both sides are tokens with the same number of prefix tokens: one linear map for every token (SN-Net's)."""
    return front.layout == end.layout == TOKENS and front.prefix == end.prefix


def describe(cut: CutPoint) -> str:
    """One image's output at a cut point in words: '197 tokens' (prefix tokens counted), '14x14', 'a pooled vector'."""
    if cut.layout == TOKENS:
        return f"{cut.positions + cut.prefix} tokens"
    if cut.layout == FLAT:
        return "a pooled vector"
    return f"{cut.extent[0]}x{cut.extent[1]}"


def why_not_stitchable(front: CutPoint, end: CutPoint, front_name: str = "the front", end_name: str = "the end",
                       every_token: bool = False) -> str | None:
    """The one stitchability rule: None when a linear stitch maps `front` onto `end`, else why not, as
    "<front_name> outputs 16 tokens but <end_name> takes 2x2". A stitch maps position to position, so both sides need
    the same positions (tokens and a square grid of the same count may meet: the layout bridge lays tokens out
    row-major); prefix tokens are bridged by `CutStitch`. `every_token`: the stitch is one linear map over every
    token (SN-Net's stitching layer), so token sides must also carry the same number of prefix tokens."""
    said = f"{front_name} outputs {describe(front)} but {end_name} takes {describe(end)}"
    if (front.layout == FLAT) != (end.layout == FLAT):
        return f"{said} (a pooled vector has no positions to map)"
    grids = [c.extent for c in (front, end) if c.layout in (NCHW, NHWC)]
    if front.positions != end.positions or (len(grids) == 2 and grids[0] != grids[1]):
        return said
    if len(grids) == 1 and grids[0][0] != grids[0][1]:  # tokens <-> a map: the layout bridge lays out squares
        return f"{said} (tokens map only onto a square grid)"
    if every_token and front.layout == end.layout == TOKENS and front.prefix != end.prefix:
        return f"{said} (one linear map over every token needs the same prefix tokens on both sides)"
    return None


@torch.no_grad()
def probe(net, img_size: int | tuple[int, int], in_chans: int = 3) -> list[list[CutPoint]]:
    """The one unit probe: every unit's cut point (layout, channels, spatial extent, prefix tokens) of every anchor of
    a routed network, from one zeros image of `img_size`. Architecture only (weights do not change it), so it is
    cached per network and size. Used by the build checks, the cost model's stitch inputs and the tools."""
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)[-2:]
    tables = _PROBES.setdefault(net, {})
    if (size, in_chans) not in tables:
        device = next(net.parameters()).device
        outputs = {}
        was_training = net.training
        net.eval()
        try:
            for a, units in enumerate(net.units):
                x, anchor = torch.zeros(1, in_chans, *size, device=device), net.anchor(a)
                for u, unit in enumerate(units):
                    try:
                        x = unit.run(anchor, x)
                    except RuntimeError as e:  # an input too small for a kernel, a stride or a pooling window
                        names = getattr(net, "names", None)
                        who = f"anchor {names[a]!r}" if names else f"anchor {a}"
                        raise AnchorError(f"{who} cannot run a {size[0]}x{size[1]} image: its unit {unit.name!r} "
                                          f"fails ({str(e).strip().splitlines()[0][:160]}); give a larger image "
                                          f"size (--img-size, or \"input_size\" in the stitch config)") from None
                    outputs[(a, u)] = x
        finally:
            net.train(was_training)
        tables[(size, in_chans)] = cut_points(net, outputs)
    return tables[(size, in_chans)]


# net -> {(size, in_chans): cut points}; weak keys, so a net's probes go when the net does
_PROBES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def spatial_rows(x: torch.Tensor, cut: CutPoint, keep_prefix: bool = False) -> torch.Tensor:
    """Features as (rows, channels): one row per image and position (row-major), prefix tokens dropped unless kept."""
    if cut.layout == FLAT:
        return x.reshape(x.shape[0], -1)
    if cut.layout == TOKENS:
        x = x if keep_prefix else x[:, cut.prefix:]
        return x.reshape(-1, x.shape[-1])
    return to_rows(x, cut.layout)


def pooled(x: torch.Tensor, layout: str, prefix: int = 0) -> torch.Tensor:
    """Per image, the mean over the spatial positions (prefix tokens left out): (B, channels)."""
    if layout == TOKENS:
        return x[:, prefix:].mean(1)
    if layout in (NCHW, NHWC):
        return x.mean((2, 3) if layout == NCHW else (1, 2))
    return x


# ---------------------------------------------------------------------------------------------------- the stitch
class CutStitch(nn.Module):
    """A stitch between two cut points: the library's stitching layer (`spec`, default ``linear``) on the spatial
    positions with the layout bridge, plus the prefix-token bridge. With `joint_tokens` the layer maps every token;
    otherwise the front's prefix tokens are dropped and, when the end has prefix tokens, ``prefix`` (a Linear)
    predicts them from the front's position-averaged features and puts them first."""

    def __init__(self, front: CutPoint, end: CutPoint, spec: dict[str, Any] | None = None):
        super().__init__()
        reason = why_not_stitchable(front, end, f"unit {front.name!r} of anchor {front.anchor}",
                                    f"unit {end.name!r} of anchor {end.anchor}")
        if reason is not None:
            raise AnchorError(f"cannot stitch: {reason}; pick units whose outputs have the same positions")
        self.front, self.end = front, end
        self.joint = joint_tokens(front, end)
        self.drop = 0 if self.joint else front.prefix
        in_layout = TOKENS if front.layout == FLAT else front.layout
        out_layout = TOKENS if end.layout == FLAT else end.layout
        self.layer = create_stitch_layer(spec, front.channels, end.channels, in_layout, out_layout)
        self.end_prefix = 0 if self.joint else end.prefix
        self.prefix = nn.Linear(front.channels, self.end_prefix * end.channels) if self.end_prefix else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop:
            x = x[:, self.drop:]
        y = self.layer(x)
        if self.prefix is None:
            return y
        mean = pooled(x, self.front.layout, self.front.prefix - self.drop)
        tokens = self.prefix(mean).reshape(x.shape[0], self.end_prefix, self.end.channels)
        return torch.cat([tokens, y], dim=1)

    def merged(self) -> CutStitch:
        """The stitch as deployed: a copy whose layer is its ``merged()`` plain layer when the type has one (lora),
        else the stitch itself (the cost model counts this one, as it counts SN-Net's layers)."""
        if not hasattr(self.layer, "merged"):
            return self
        out = copy.deepcopy(self)
        out.layer = self.layer.merged()
        return out

    def add_rows(self, stats: NormalEquations, front_key, key, fx: torch.Tensor, ex: torch.Tensor) -> None:
        """Add one batch's least-squares rows (front unit output `fx`, end unit output `ex`) to `stats`; stitches with
        the same `front_key` (the same front cut point) share its Gram matrices. Call ``stats.new_batch()`` first."""
        if self.joint:
            stats.add((front_key, "all"), spatial_rows(fx, self.front, keep_prefix=True), (key, "main"),
                      spatial_rows(ex, self.end, keep_prefix=True))
            return
        stats.add((front_key, "spatial"), spatial_rows(fx, self.front), (key, "main"), spatial_rows(ex, self.end))
        if self.end_prefix:
            stats.add((front_key, "pooled"), pooled(fx, self.front.layout, self.front.prefix), (key, "prefix"),
                      ex[:, :self.end_prefix].reshape(ex.shape[0], -1))

    @torch.no_grad()
    def fit(self, stats: NormalEquations, front_key, key, rcond: float | None = None) -> tuple[float, int]:
        """Set the stitch to the least-squares solution of its rows in `stats`. Returns (the relative error
        ||stitch(X) - Y|| / ||Y|| of the maps the stitch now holds, the rows fitted): a low-rank layer reports its
        own rank-r error, not the full-rank solution's."""
        main = stats.fit([((front_key, "all" if self.joint else "spatial"), (key, "main"))], rcond)
        self.layer.set_affine(*as_affine(main.A))
        sse, yy = main.sse(held_map(self.layer)), main.yy
        if self.prefix is not None:
            pre = stats.fit([((front_key, "pooled"), (key, "prefix"))], rcond)
            W, b = as_affine(pre.A)
            self.prefix.weight.copy_(W.to(self.prefix.weight.dtype))
            self.prefix.bias.copy_(b.to(self.prefix.bias.dtype))
            sse, yy = sse + pre.sse(), yy + pre.yy
        return (math.sqrt(sse / yy) if yy > 0 else 0.0), main.rows

    def extra_repr(self) -> str:
        return f"{self.front.name} ({self.front.layout}) -> {self.end.name} ({self.end.layout})"


def held_map(layer: nn.Module) -> torch.Tensor | None:
    """The solution-shaped matrix ((C_in + 1) x C_out) of the affine map a stitching layer holds; None for a type
    that does not say (its fit is then scored by the solution)."""
    wb = affine_of(layer)
    return None if wb is None else from_affine(*wb)
