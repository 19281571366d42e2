"""Stitch plans as pure data: which networks one SN-Net holds, in SN-Net's cfg_id order.

Nothing here imports torch. A plan is a tuple of routes (cfg_id -> which anchor runs which blocks, joined by which
stitching layer) plus the stitching layers those routes need. The enumerators reproduce the official SN-Net code
exactly (docs/snnet_compat.md, C1-C5) and are the single source of cfg_id order in this project.

Vocabulary:
  anchor    one pretrained network, index 0..n-1, ordered small to large.
  position  (j, k) inside one stage: the front anchor runs up to and including its block j, the stitching layer
            maps its features, the end anchor continues from its block k.
  junction  one place a route crosses from a front anchor to an end anchor (`Junction`: the two anchors, the stage,
            the position and the address of the stitching layer that maps the features there); a route of SN-Net
            has one, of SN-Netv2's two-way plan up to two.
  address   where a stitching layer lives in ``SNNet.stitch_layers`` (a path of ModuleList indices); the shape of
            the address is what makes checkpoint keys identical to SN-Net's.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from snnet.utils.errors import SNNetError


class PlanError(SNNetError):
    """A stitch plan cannot be built from the given anchors or options."""


@dataclass(frozen=True)
class Junction:
    """Where a route crosses from anchor `front` to anchor `end`: at position (j, k) of `stage`, through the
    stitching layer at address `layer`."""
    front: int
    end: int
    stage: int
    j: int  # last block of the front anchor that runs (index inside `stage`)
    k: int  # first block of the end anchor that runs (index inside `stage`)
    layer: tuple[int, ...]  # address of the stitching layer

    @property
    def position(self) -> tuple[int, int]:
        return (self.j, self.k)


@dataclass(frozen=True)
class Route:
    cfg_id: int
    anchors: tuple[int, ...]  # anchors used, front first
    stitches: tuple[Junction, ...] = ()

    @property
    def is_anchor(self) -> bool:
        return not self.stitches

    def describe(self, names: Sequence[str] | None = None, hierarchical: bool = False) -> str:
        """Human-readable route, e.g. ``deit_tiny[..b3] -(0.2)-> deit_small[b4..]``."""
        def name(a: int) -> str:
            return names[a] if names is not None else f"anchor{a}"

        if self.is_anchor:
            return name(self.anchors[0])
        parts = []
        start = None
        for st in self.stitches:
            where = f"s{st.stage}." if hierarchical else ""
            first = "" if start is None else start
            parts.append(f"{name(st.front)}[{first}..{where}b{st.j}]")
            parts.append(f"-({'.'.join(map(str, st.layer))})->")
            start = f"{where}b{st.k}"
        parts.append(f"{name(self.stitches[-1].end)}[{start}..]")
        return " ".join(parts)


@dataclass(frozen=True)
class LayerSpec:
    address: tuple[int, ...]
    front: int
    end: int
    stage: int


@dataclass(frozen=True)
class StitchPlan:
    routes: tuple[Route, ...]
    layers: tuple[LayerSpec, ...]
    n_anchors: int
    hierarchical: bool = False
    _by_address: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_address.update({spec.address: spec for spec in self.layers})

    def __len__(self) -> int:
        return len(self.routes)

    def route(self, cfg_id: int) -> Route:
        if isinstance(cfg_id, bool) or not isinstance(cfg_id, int) or not 0 <= cfg_id < len(self.routes):
            raise PlanError(f"cfg_id {cfg_id!r} is out of range: this network has cfg_ids 0..{len(self.routes) - 1}")
        return self.routes[cfg_id]

    def layer(self, address: tuple[int, ...]) -> LayerSpec:
        return self._by_address[tuple(address)]

    def positions_of_layer(self, address: tuple[int, ...]) -> list[Junction]:
        """Distinct stitches (front, end, stage, j, k) that use the layer at `address`, in cfg_id order."""
        seen: dict[tuple, Junction] = {}
        for route in self.routes:
            for st in route.stitches:
                if st.layer == tuple(address):
                    seen.setdefault((st.front, st.end, st.stage, st.j, st.k), st)
        return list(seen.values())


# ---------------------------------------------------------------------------------------------------------------------
# Enumeration primitives (docs/snnet_compat.md, C2, C3)

def paired_positions(depth: int, kernel: int = 2, stride: int = 1,
                     forward_only: bool = False) -> tuple[list[tuple[int, int]], list[int], int]:
    """Sliding-window positions for two anchors of equal depth.

    Returns (positions, layer id per position, number of layers). Each window of `kernel` blocks gets one shared
    stitching layer; positions already produced by an earlier window are skipped. `forward_only` keeps only j < k
    (Swin, LeViT, CNN); the all-pairs variant (DeiT) also keeps j >= k, which makes deeper networks.
    """
    _check_int("depth", depth, 1, None)
    _check_int("stitch_kernel_size", kernel, 1, depth, f"between 1 and the anchors' depth {depth}")
    _check_int("stitch_stride", stride, 1, depth, f"between 1 and the anchors' depth {depth}")
    positions: list[tuple[int, int]] = []
    layer_of: list[int] = []
    seen: set[tuple[int, int]] = set()
    next_id = 0
    for start in range(0, depth, stride):
        window = range(start, min(start + kernel, depth))
        added = False
        for a in window:
            for b in window:
                if (a, b) in seen or (forward_only and a >= b):
                    continue
                seen.add((a, b))
                positions.append((a, b))
                layer_of.append(next_id)
                added = True
        if added:
            next_id += 1
    return positions, layer_of, next_id


def unpaired_positions(front_depth: int, end_depth: int) -> tuple[list[tuple[int, int]], list[int], int]:
    """Depth interpolation for a shallower front anchor (docs/snnet_compat.md, C3).

    Front block f is matched to the end blocks e whose nearest-interpolated index floor(e*Df/De) is f, keeping
    f < e. The layer id of the p-th position is that interpolated index *at list position p* (SN-Net zips the
    length-De mapping with the shorter position list); this shift is reproduced so SN-Net checkpoints load.
    """
    _check_int("front depth", front_depth, 1, None)
    if end_depth <= front_depth:
        raise PlanError(f"unpaired stitching needs a deeper end anchor: got depths {front_depth} -> {end_depth}")
    mapping = [e * front_depth // end_depth for e in range(end_depth)]
    positions = [(f, e) for f in range(front_depth) for e in range(end_depth) if mapping[e] == f and f < e]
    layer_of = [mapping[p] for p in range(len(positions))]
    return positions, layer_of, front_depth


# ---------------------------------------------------------------------------------------------------------------------
# Whole plans

def anchor_combinations(n_anchors: int, nearest: bool) -> list[tuple[int, ...]]:
    """SN-Net's DeiT anchor combinations, generalised to any number of anchors.

    All subsets by size, then lexicographically (SN-Net: size 1, size 2, size 3 of three anchors). With
    `nearest`, only neighbouring pairs (i, i+1) are stitched and chains of three or more are dropped; for three
    anchors this removes exactly (0, 2) and (0, 1, 2), as SN-Net's hard-coded removal does.
    """
    _check_int("number of anchors", n_anchors, 1, None)
    combos = []
    for size in range(1, n_anchors + 1):
        for comb in itertools.combinations(range(n_anchors), size):
            if nearest and (size > 2 or (size == 2 and comb[1] != comb[0] + 1)):
                continue
            combos.append(comb)
    return combos


def deit_plan(n_anchors: int, depth: int, kernel: int = 2, stride: int = 1, nearest: bool = True) -> StitchPlan:
    """Plan of SN-Net's plain-ViT family (docs/snnet_compat.md, C4): all-pairs sliding window, multi-anchor chains.

    Layers live at ``stitch_layers.<c>.<layer id>`` where c indexes the stitched anchor pairs in combination order.
    """
    positions, layer_of, num_layers = paired_positions(depth, kernel, stride, forward_only=False)
    combos = anchor_combinations(n_anchors, nearest)
    pairs = [c for c in combos if len(c) == 2]
    pair_index = {pair: c for c, pair in enumerate(pairs)}
    layers = tuple(LayerSpec((c, lid), pair[0], pair[1], 0)
                   for c, pair in enumerate(pairs) for lid in range(num_layers))

    routes: list[Route] = []
    for comb in combos:
        if len(comb) == 1:
            routes.append(Route(len(routes), comb))
            continue
        # one position per consecutive pair of the chain; each next position must start at or after the block
        # where the previous end anchor took over (p_next.j >= p_prev.k)
        for chain in _chains(positions, len(comb) - 1):
            stitches = []
            for hop, p in enumerate(chain):
                front, end = comb[hop], comb[hop + 1]
                lid = layer_of[p]
                stitches.append(Junction(front, end, 0, positions[p][0], positions[p][1],
                                       (pair_index[(front, end)], lid)))
            routes.append(Route(len(routes), comb, tuple(stitches)))
    return StitchPlan(tuple(routes), layers, n_anchors, hierarchical=False)


def positions_plan(depths: Sequence[int], pairs: Sequence[Sequence[Sequence[int]]]) -> StitchPlan:
    """Plan of given stitch positions for plain ViTs of `depths` blocks (the stitch config's ``"positions"``:
    explicit, or chosen from a compatibility map by snnet/train/positions.py), in place of SN-Net's sliding window.

    `pairs[c]` lists the positions (j, k) of neighbouring anchors (c, c+1): the front runs up to and including its
    block j (0..depths[c]-1), the end continues from its block k (0..depths[c+1]; depths[c+1]: only its final norm
    and head).
    cfg_id order: the anchors 0..n-1, then pair (0, 1)'s positions in the order listed, then pair (1, 2)'s, and so
    on. Every position has its own stitching layer (SN-Netv2's rule, no sharing), at ``stitch_layers.<c>.<p>`` for
    the p-th position of pair c, so the least-squares init fits each layer on its one position.
    """
    n_anchors = len(depths)
    if n_anchors < 2:
        raise PlanError(f"positions need at least 2 anchors to stitch, got {n_anchors}")
    for d in depths:
        _check_int("depth", d, 1, None)
    if len(pairs) != n_anchors - 1:
        raise PlanError(f"positions: {n_anchors} anchors have {n_anchors - 1} neighbouring pair(s) but {len(pairs)} "
                        f"position list(s) were given; give one list of [j, k] per pair (0, 1), (1, 2), ...")
    routes = [Route(a, (a,)) for a in range(n_anchors)]
    layers: list[LayerSpec] = []
    for c, positions in enumerate(pairs):
        if not positions:
            raise PlanError(f"positions of pair ({c}, {c + 1}): the list is empty; give at least one [j, k] (an "
                            f"anchor pair without stitches has no layers to address)")
        seen: set[tuple[int, int]] = set()
        for p, pos in enumerate(positions):
            if len(pos) != 2:
                raise PlanError(f"positions of pair ({c}, {c + 1}): {list(pos)!r} is not a [j, k] pair; write [j, k]")
            j, k = pos
            df, de = depths[c], depths[c + 1]
            _check_int(f"positions of pair ({c}, {c + 1}): front block j of {list(pos)}", j, 0, df - 1,
                       f"0..{df - 1} (the front anchor's blocks)")
            _check_int(f"positions of pair ({c}, {c + 1}): end block k of {list(pos)}", k, 0, de,
                       f"0..{de} (the end anchor's blocks; {de}: only its final norm and head)")
            if (j, k) in seen:
                raise PlanError(f"positions of pair ({c}, {c + 1}): [{j}, {k}] is listed twice; list each once")
            seen.add((j, k))
            layers.append(LayerSpec((c, p), c, c + 1, 0))
            routes.append(Route(len(routes), (c, c + 1), (Junction(c, c + 1, 0, j, k, (c, p)),)))
    return StitchPlan(tuple(routes), tuple(layers), n_anchors, hierarchical=False)


def _chains(positions: list[tuple[int, int]], hops: int, after_k: int = 0) -> list[list[int]]:
    out = []
    for p, (j, k) in enumerate(positions):
        if j < after_k:
            continue
        if hops == 1:
            out.append([p])
        else:
            out.extend([p] + rest for rest in _chains(positions, hops - 1, k))
    return out


def stagewise_plan(stage_depths: Sequence[Sequence[int]], stitch_stages: Sequence[int], kernel: int = 2,
                   stride: int = 1, names: Sequence[str] | None = None, small_front: bool = True,
                   large_front: bool = False) -> StitchPlan:
    """Plan of SN-Net's hierarchical families (stage-wise; docs/snnet_compat.md, C1, C5).

    Neighbouring anchors (i-1, i) are stitched inside each stage of `stitch_stages`: forward-only sliding window
    when their depths in that stage are equal, depth interpolation when the end anchor is deeper. Layers live at
    ``stitch_layers.<index of the stage in stitch_stages>.<i-1>.<layer id>``.

    `small_front` routes are SN-Net's (the smaller anchor in front). `large_front` (SN-Netv2's other way, for
    hierarchical anchors, one hop per route) stitches each stage's positions the other way too: the larger anchor i
    in front, the smaller i-1 at the end, one stitching layer per position at ``stitch_layers.<stage index>.<pair>.
    <position>`` with pair n-1 + i-1 beside SN-Net's routes (i-1 without them), listed after that stage's SN-Net
    routes. Anchors whose depths differ in a stitched stage are refused there (no interpolation back).

    SN-Net sorts the depths but indexes anchors by position, silently stitching the wrong anchors when they are not
    ordered small to large (docs/snnet_compat.md, C6); here that is refused.
    """
    n = len(stage_depths)
    label = (lambda a: f"{names[a]!r}") if names else (lambda a: f"anchor {a}")
    if n < 1:
        raise PlanError("a stitch plan needs at least one anchor")
    n_stages = len(stage_depths[0])
    for a, depths in enumerate(stage_depths):
        if len(depths) != n_stages:
            raise PlanError(f"anchors have different numbers of stages: {label(0)} has {n_stages}, {label(a)} has "
                            f"{len(depths)}; stitch anchors of one family with the same stage layout")
    for s in stitch_stages:
        if not 0 <= s < n_stages:
            raise PlanError(f"stitch stage {s} is out of range: the anchors have stages 0..{n_stages - 1}")
    if not (small_front or large_front):
        raise PlanError("a stage-wise plan stitches the smaller anchor in front, the larger, or both; got neither")
    routes = [Route(a, (a,)) for a in range(n)]
    layers: list[LayerSpec] = []
    for s_idx, s in enumerate(stitch_stages):
        for i in range(1 if small_front else n, n):
            df, de = stage_depths[i - 1][s], stage_depths[i][s]
            if de < df:
                raise PlanError(f"anchors are not ordered small to large: stage {s} has {df} blocks in {label(i - 1)} "
                                f"but {de} in {label(i)}; list the anchors from smallest to largest")
            if df == de:
                positions, layer_of, num_layers = paired_positions(df, kernel, stride, forward_only=True)
            else:
                positions, layer_of, num_layers = unpaired_positions(df, de)
            layers.extend(LayerSpec((s_idx, i - 1, lid), i - 1, i, s) for lid in range(num_layers))
            for (j, k), lid in zip(positions, layer_of):
                routes.append(Route(len(routes), (i - 1, i), (Junction(i - 1, i, s, j, k, (s_idx, i - 1, lid)),)))
        for i in range(1 if large_front else n, n):
            df, de = stage_depths[i - 1][s], stage_depths[i][s]
            if df != de:
                raise PlanError(f"the larger anchor in front needs equal depths in each stitched stage: stage {s} has "
                                f"{df} blocks in {label(i - 1)} but {de} in {label(i)}; stitch other stages or use "
                                f"the sliding window (the smaller anchor in front)")
            positions, _, _ = paired_positions(de, kernel, stride, forward_only=True)
            pair = (n - 1 if small_front else 0) + i - 1
            layers.extend(LayerSpec((s_idx, pair, p), i, i - 1, s) for p in range(len(positions)))
            for p, (j, k) in enumerate(positions):
                routes.append(Route(len(routes), (i, i - 1), (Junction(i, i - 1, s, j, k, (s_idx, pair, p)),)))
    return StitchPlan(tuple(routes), tuple(layers), n, hierarchical=True)


def _check_int(what: str, value, low: int, high: int | None, valid: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        valid = valid or (f"an integer >= {low}" if high is None else f"an integer in {low}..{high}")
        raise PlanError(f"{what} {value!r} is out of range: use {valid}")


def two_way_plan(front_depth: int, end_depth: int) -> StitchPlan:
    """SN-Netv2's two-way plan for two plain ViTs (small anchor 0 of depth d0, large anchor 1 of depth d1 = r·d0):

    ids 0, 1: the anchors; then SL: 0→1 at (i, (i+1)·r), layer (0, i), for i = 0…d0−1; LS: 1→0 at
    (j, ⌊j·d0/d1⌋+1), layer (1, ⌊j/r⌋), for j = 0…d1−2 with j mod r = r−1; LSL: each LS then each SL whose front
    block i starts at or after the LS's entry block and is not the last (i < d0−1); SLS: each SL then each LS whose
    front block j is at or after the SL's entry block (i+1)·r. One stitching layer per position (no sharing): a
    position's layer lives at ``stitch_layers.<front anchor>.<index>``. SN-Netv2's released files leave out id 13
    (the SL route whose stitch follows the last small block, d0 = 12); it is kept here as a real network, so every
    other id is SN-Netv2's (docs/snnet_compat.md, C36).
    """
    _check_int("front depth", front_depth, 1, None)
    if end_depth % front_depth:
        raise PlanError(f"two-way stitching needs the large anchor's depth to be a multiple of the small one's: "
                        f"{front_depth} and {end_depth}")
    r = end_depth // front_depth
    sl = [Junction(0, 1, 0, i, (i + 1) * r, (0, i)) for i in range(front_depth)]
    ls = [Junction(1, 0, 0, j, j * front_depth // end_depth + 1, (1, j // r)) for j in range(end_depth - 1)
          if j % r == r - 1]
    routes = [Route(0, (0,)), Route(1, (1,))]
    routes += [Route(0, (0, 1), (st,)) for st in sl]
    routes += [Route(0, (1, 0), (st,)) for st in ls]
    routes += [Route(0, (1, 0, 1), (a, b)) for a in ls for b in sl if b.j < front_depth - 1 and b.j >= a.k]
    routes += [Route(0, (0, 1, 0), (a, b)) for a in sl for b in ls if b.j >= a.k]
    routes = [Route(i, r_.anchors, r_.stitches) for i, r_ in enumerate(routes)]
    layers = tuple([LayerSpec(st.layer, 0, 1, 0) for st in sl] + [LayerSpec(st.layer, 1, 0, 0) for st in ls])
    return StitchPlan(tuple(routes), layers, 2, hierarchical=False)


# ---------------------------------------------------------------------------------------------------------------------
# Compositions: networks cut at unit granularity across anchors of any family (`snnet search`)

#: a stitch between two unit outputs: (front anchor, front unit, end anchor, end unit); the end anchor continues at
#: end unit + 1 from the mapped features
Edge = tuple[int, int, int, int]


@dataclass(frozen=True)
class Segment:
    """Units `first`..`last` (inclusive; indices into the anchor's unit list) of anchor `anchor`."""
    anchor: int
    first: int
    last: int


@dataclass(frozen=True)
class Composition:
    """A network of anchor segments: the first starts at unit 0, the last ends at its anchor's last unit (the head),
    and between two segments a stitch maps the output of the front segment's last unit onto the features the next
    segment's anchor has before its first unit. One segment is an anchor on its own. Unlike a `Route`, the cuts are
    anywhere in the units (stem, blocks, transitions, norm), not only inside a stage."""
    segments: tuple[Segment, ...]

    @property
    def edges(self) -> tuple[Edge, ...]:
        return tuple((s.anchor, s.last, t.anchor, t.first - 1) for s, t in zip(self.segments, self.segments[1:]))

    @property
    def is_anchor(self) -> bool:
        return len(self.segments) == 1

    def check(self, unit_counts: Sequence[int]) -> None:
        """Refuse a composition the anchors (with `unit_counts` units each) cannot run."""
        segs = self.segments
        if not segs:
            raise PlanError("a composition needs at least one segment")
        for s in segs:
            if not 0 <= s.anchor < len(unit_counts):
                raise PlanError(f"segment {s} names anchor {s.anchor}; there are {len(unit_counts)} anchors")
            if not 0 <= s.first <= s.last < unit_counts[s.anchor]:
                raise PlanError(f"segment {s}: units must satisfy 0 <= first <= last < {unit_counts[s.anchor]}")
        if segs[0].first != 0 or segs[-1].last != unit_counts[segs[-1].anchor] - 1:
            raise PlanError(f"composition {self.describe()}: it must start at unit 0 and end at the last unit")
        for _s, t in zip(segs, segs[1:]):
            if t.first < 1:
                raise PlanError(f"composition {self.describe()}: a stitch cannot enter anchor {t.anchor} before its "
                                f"first unit")

    def describe(self, names: Sequence[str] | None = None, unit_names: Sequence[Sequence[str]] | None = None) -> str:
        """E.g. ``deit_tiny[embed..blocks.5] -> resnet18[layer3.1..head]``; an anchor's own route is its name."""
        name = (lambda a: names[a]) if names is not None else (lambda a: f"anchor{a}")
        unit = (lambda a, u: unit_names[a][u]) if unit_names is not None else (lambda a, u: f"u{u}")
        if self.is_anchor:
            return name(self.segments[0].anchor)
        return " -> ".join(f"{name(s.anchor)}[{unit(s.anchor, s.first)}..{unit(s.anchor, s.last)}]"
                           for s in self.segments)
