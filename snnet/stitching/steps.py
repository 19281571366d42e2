"""Route steps: what a compiled route runs, one step at a time (`snnet.stitching.model`). Pure data, no torch.

    UnitStep("unit", anchor, unit)   run one unit of one anchor            (`unit_step(anchor, unit)`)
    StitchStep("stitch", address)    run the stitching layer at `address`  (`stitch_step(address)`)

Both are named tuples whose first field is the tag: a step equals (and hashes as) its plain-tuple form, which is how
export files and JSON keep it (`as_step` reads one back)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, TypeAlias


class UnitStep(NamedTuple):
    """Run unit `unit` of anchor `anchor`."""
    kind: str  # "unit"
    anchor: int
    unit: int


class StitchStep(NamedTuple):
    """Run the stitching layer at `address` (SNNet: a layer key; ComposedNet: (edge index,))."""
    kind: str  # "stitch"
    address: Any


Step: TypeAlias = UnitStep | StitchStep


def unit_step(anchor: int, unit: int) -> UnitStep:
    return UnitStep("unit", anchor, unit)


def stitch_step(address: Any) -> StitchStep:
    return StitchStep("stitch", address)


def as_step(raw: Sequence[Any]) -> Step:
    """A step from its plain form (a tuple or a JSON list): ("unit", anchor, unit) or ("stitch", address)."""
    if raw[0] == "unit":
        return unit_step(int(raw[1]), int(raw[2]))
    if raw[0] == "stitch":
        return stitch_step(tuple(raw[1]) if isinstance(raw[1], list) else raw[1])
    raise ValueError(f"not a route step: {raw!r}")
