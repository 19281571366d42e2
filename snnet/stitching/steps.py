"""Route steps: what a compiled route runs, one step at a time (`snnet.stitching.model`). Pure data, no torch.

    UnitStep("unit", anchor, unit)          run one unit of one anchor            (`unit_step(anchor, unit)`)
    UnitStep("unit", anchor, unit, stats)   the same with the BatchNorm statistics kept for the stitches before it
                                            (`SNNet` with ``"bn_stats": "per_stitch"``: a key of `StitchStats`)
    StitchStep("stitch", address)           run the stitching layer at `address`  (`stitch_step(address)`)

Both are tuples whose first field is the tag: a step equals (and hashes as) its plain-tuple form, which is how
export files and JSON keep it (`as_step` reads one back)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias


class UnitStep(tuple):
    """Run unit `unit` of anchor `anchor`; with `stats`, its BatchNorm layers use the running statistics kept under
    that key instead of the anchor's own. The plain form has 3 items, or 4 with `stats`."""

    def __new__(cls, kind: str, anchor: int, unit: int, stats: str | None = None) -> UnitStep:
        return tuple.__new__(cls, (kind, anchor, unit) if stats is None else (kind, anchor, unit, stats))

    def __getnewargs__(self) -> tuple:  # copy and pickle rebuild it from its items
        return tuple(self)

    kind = property(lambda self: self[0])
    anchor = property(lambda self: self[1])
    unit = property(lambda self: self[2])
    stats = property(lambda self: self[3] if len(self) > 3 else None)


class StitchStep(NamedTuple):
    """Run the stitching layer at `address` (SNNet: a layer key; ComposedNet: (edge index,))."""
    kind: str  # "stitch"
    address: Any


Step: TypeAlias = UnitStep | StitchStep


def unit_step(anchor: int, unit: int, stats: str | None = None) -> UnitStep:
    return UnitStep("unit", anchor, unit, stats)


def stitch_step(address: Any) -> StitchStep:
    return StitchStep("stitch", address)


def as_step(raw: Sequence[Any]) -> Step:
    """A step from its plain form (a tuple or a JSON list): ("unit", anchor, unit[, stats]) or ("stitch", address)."""
    if raw[0] == "unit":
        return unit_step(int(raw[1]), int(raw[2]), str(raw[3]) if len(raw) > 3 and raw[3] is not None else None)
    if raw[0] == "stitch":
        return stitch_step(tuple(raw[1]) if isinstance(raw[1], list) else raw[1])
    raise ValueError(f"not a route step: {raw!r}")
