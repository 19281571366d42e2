"""Route steps are small named types that keep their plain-tuple form: equal, same hash, same JSON."""
from __future__ import annotations

import json

import pytest
from helpers import TINY

from snnet.stitching.build import build_snnet
from snnet.stitching.config import parse_stitch_config
from snnet.stitching.steps import StitchStep, UnitStep, as_step, stitch_step, unit_step


def test_steps_are_named_and_equal_their_plain_form():
    u, s = unit_step(1, 4), stitch_step("0_1")
    assert (u.kind, u.anchor, u.unit) == ("unit", 1, 4) and (s.kind, s.address) == ("stitch", "0_1")
    assert u == ("unit", 1, 4) and hash(u) == hash(("unit", 1, 4)) and {("unit", 1, 4): 1}[u] == 1
    assert json.loads(json.dumps([u, s])) == [["unit", 1, 4], ["stitch", "0_1"]]  # export files keep this form


def test_a_step_with_statistics_has_four_items_and_survives_copies():
    import copy
    import pickle
    u = unit_step(1, 4, "0_1_2")
    assert u == ("unit", 1, 4, "0_1_2") and u.stats == "0_1_2" and unit_step(1, 4).stats is None
    assert as_step(json.loads(json.dumps(u))) == u and isinstance(as_step(list(u)), UnitStep)
    assert copy.deepcopy(u) == u and pickle.loads(pickle.dumps(u)).stats == "0_1_2"


def test_as_step_reads_the_plain_form_back():
    assert isinstance(as_step(["unit", 0, 2]), UnitStep) and as_step(["unit", 0, 2]) == unit_step(0, 2)
    assert isinstance(as_step(("stitch", [3])), StitchStep) and as_step(("stitch", [3])).address == (3,)
    with pytest.raises(ValueError, match="not a route step"):
        as_step(("jump", 1))


def test_compiled_routes_hold_named_steps():
    net = build_snnet(parse_stitch_config({"anchors": TINY}), pretrained=False, num_classes=10, img_size=16)
    kinds = {type(s) for route in net.routes for s in route}
    assert kinds == {UnitStep, StitchStep}
