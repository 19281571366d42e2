"""The stitched network of one stitch-train run, on the core's one cut mechanism.

    front anchor, from its input up to and including its block i  ->  stitch  ->  end anchor from block j on

Blocks (stitch-train's vocabulary: numbered flat over the stages) are mapped onto the adapters' units: the front's
cut point is the output of block i's unit; the end's is the output of the unit before block j's (the stem for j = 0,
a transition, or block j-1; with j = the end anchor's depth, its last block), which is what block j reads. Everything
else is `snnet.core`: `probe` finds the cut points (layout, channels, extent, prefix tokens),
`why_not_stitchable` is the stitchability rule, `CutStitch` is the stitch (the stitching layer on the spatial
positions with the layout bridge, and the prefix-token bridge: a class-token ViT <-> CNN pair drops or predicts the
class token) with its least-squares fit (`NormalEquations`, reporting the error of the map the layer holds), and the
network is a `ComposedNet` of one `Composition`: two segments joined by that stitch. `snnet search` builds its
networks the same way.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from snnet.explore.stitch_train.sweep import SweepError
from snnet.stitching.adapter import AnchorAdapter, Unit, entry_unit
from snnet.stitching.cost import CostTable, eval_mode
from snnet.stitching.cut import CutPoint, CutStitch, probe, why_not_stitchable
from snnet.stitching.lstsq import NormalEquations
from snnet.stitching.maps import anchors_net
from snnet.stitching.model import ComposedNet
from snnet.stitching.plan import Composition, Edge, Segment


@dataclass
class AnchorProbe:
    """One anchor's cut points at one input size (the core's probe, `snnet.stitching.cut.probe`) and its units, read in
    stitch-train's vocabulary: blocks numbered flat over the stages."""
    cuts: list[CutPoint]
    units: list[Unit]

    @property
    def blocks(self) -> list[int]:
        """The unit index of each block, flat over stages."""
        return [u for u, unit in enumerate(self.units) if unit.kind == "block"]

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def front_unit(self, i: int) -> int:
        """The unit whose output a front cut after block i maps: block i."""
        return self.blocks[i]

    def entry_unit(self, j: int) -> int:
        """The unit where the end anchor continues from block j (`snnet.stitching.adapter.entry_unit`: block j, or one
        past the last block for j = depth, i.e. its final norm and head)."""
        unit = self.units[self.blocks[min(j, self.depth - 1)]]
        # a block unit always has its stage and its index in it
        stage, index = cast(int, unit.stage), cast(int, unit.index)
        return entry_unit(self.units, stage, index + (j >= self.depth))


def probe_anchor(model: nn.Module, adapter: AnchorAdapter, label: str, size: tuple[int, int],
                 in_chans: int = 3) -> AnchorProbe:
    """The anchor's cut points at input `size` (the anchor's index in them is 0; `build_stitched` renumbers)."""
    net = anchors_net([model], [adapter], [label])
    return AnchorProbe(probe(net, size, in_chans)[0], net.units[0])


class StitchedNet(ComposedNet):
    """A `ComposedNet` whose anchors are frozen: they get no gradient and stay in eval mode whatever ``train()`` is
    called with (BatchNorm statistics, dropout and drop-path as in the given weights), so only the stitch trains.
    (`AnchorsNet.freeze_anchors`, the rule SN-Net's --freeze-anchors uses too.)"""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.freeze_anchors()


@dataclass
class Stitched:
    """One run's network: route 0 of `net` is front[..block i] -> `stitch` -> end[block j..]."""
    net: StitchedNet
    stitch: CutStitch
    edge: Edge           # (front anchor, front unit, end anchor, end unit) in `net`
    front: CutPoint
    end: CutPoint


def build_stitched(models: Sequence[nn.Module], adapters: Sequence[AnchorAdapter], labels: Sequence[str],
                   probes: Sequence[AnchorProbe], cut: int, end_block: int, layer: dict[str, Any]) -> Stitched:
    """The network of one run (front = models[0], end = models[1]; one anchor when the labels are equal:
    self-stitching), the stitch not yet fitted. Refuses (SweepError) a cut whose two sides cannot be stitched
    (`why_not_stitchable`: different resolution or token count) and a layer type's bad options."""
    same = labels[0] == labels[1]
    fa, ea = 0, 0 if same else 1
    fp, ep = probes
    fu, eu = fp.front_unit(cut), ep.entry_unit(end_block) - 1
    where = f"cannot stitch {labels[0]!r} block {cut} to {labels[1]!r} block {end_block}"
    if eu < 0:
        raise SweepError(f"{where}: {labels[1]!r} has no unit before its block {end_block} whose output the stitch "
                         f"could produce; pick a later end block")
    front, end = dataclasses.replace(fp.cuts[fu], anchor=fa), dataclasses.replace(ep.cuts[eu], anchor=ea)
    reason = why_not_stitchable(front, end, f"{labels[0]!r} block {cut}", f"{labels[1]!r} block {end_block}")
    if reason is not None:
        raise SweepError(f"cannot stitch: {reason}; pick blocks whose features have the same resolution (same "
                         f"image size, patch size and strides)")
    try:
        stitch = CutStitch(front, end, layer)
    except ValueError as e:  # a layer type's own option check (e.g. a rank above the widths): plain ValueError
        raise SweepError(f"stitching layer {layer}: {e}") from None
    edge = (fa, fu, ea, eu)
    composition = Composition((Segment(fa, 0, fu), Segment(ea, eu + 1, len(ep.cuts) - 1)))
    net = StitchedNet(list(models[:1 if same else 2]), [composition], {edge: stitch},
                      list(labels[:1 if same else 2]), list(adapters[:1 if same else 2]))
    return Stitched(net, stitch, edge, front, end)


@torch.no_grad()
def fit_stitch(st: Stitched, batches: Iterable[torch.Tensor], device: torch.device,
               rcond: float | None = None) -> tuple[float | None, int]:
    """The least-squares init: the stitch fitted to map the front's cut-point features onto the end anchor's own
    features there, on `batches` (clean images; anchors in eval mode), float64 normal equations. Returns (the
    relative error of the map the stitch now holds, e.g. a low-rank layer's own rank-r map; the rows fitted), or
    (None, 0) without images."""
    (fa, fu, ea, eu) = st.edge
    points: dict[int, set[int]] = {}
    points.setdefault(fa, set()).add(fu)
    points.setdefault(ea, set()).add(eu)
    stats = NormalEquations()
    with eval_mode(st.net):
        for x in batches:
            feats = st.net.capture(x.to(device), points)
            stats.new_batch()
            st.stitch.add_rows(stats, (fa, fu), st.edge, feats[(fa, fu)], feats[(ea, eu)])
    if not stats.rows:
        return None, 0
    return st.stitch.fit(stats, (fa, fu), st.edge, rcond)


def stitch_flops(st: Stitched, table: CostTable) -> int:
    """FLOPs of the stitch for one image: its entry in the net's cost table (the cost model traces every stitching
    module; a layer type with ``merged()``, lora, is counted as the plain layer it deploys as)."""
    return table.layer_flops[(0,)]


def stitch_state(st: Stitched) -> dict[str, torch.Tensor]:
    """The trained stitch's weights: the stitching layer's own keys (``transform.*``, as a stitching layer in an
    SN-Net checkpoint) and, when the end has prefix tokens the front lacks, ``prefix.{weight,bias}``."""
    state = dict(st.stitch.layer.state_dict())
    if st.stitch.prefix is not None:
        state.update({f"prefix.{k}": v for k, v in st.stitch.prefix.state_dict().items()})
    return state
