"""The SN-Net module: anchors + stitching layers; ``forward(x, cfg_id)`` runs one route.

There are no random numbers in here: which route runs is the caller's argument (training draws it with
`snnet.sampler`). Each route is compiled once into a flat tuple of steps, pure data that the evaluator and the cost
model reuse:

    ("unit", anchor, unit_index)   run one unit of one anchor
    ("stitch", address)            run the stitching layer at `address`
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .adapter import AnchorAdapter, Unit, adapter_for, module_param_count
from .layers import StitchingLayer
from .plan import LayerSpec, PlanError, Route, StitchPlan

Step = tuple


class SNNet(nn.Module):
    def __init__(self, anchors: Sequence[nn.Module], plan: StitchPlan, names: Sequence[str] | None = None,
                 adapters: Sequence[AnchorAdapter] | None = None, skip_final_norm: bool = False):
        super().__init__()
        if len(anchors) != plan.n_anchors:
            raise PlanError(f"the plan is for {plan.n_anchors} anchors but {len(anchors)} were given")
        self.anchors = nn.ModuleList(anchors)
        self.names = list(names) if names is not None else [type(m).__name__ for m in anchors]
        self.adapters = list(adapters) if adapters is not None else [
            adapter_for(m, n) for m, n in zip(anchors, self.names)]
        self.plan = plan
        self.skip_final_norm = skip_final_norm
        self.units: list[list[Unit]] = [ad.units(m) for ad, m in zip(self.adapters, anchors)]
        self._block_unit = [{(u.stage, u.index): i for i, u in enumerate(units) if u.kind == "block"}
                            for units in self.units]
        self.stitch_layers = _nested_module_list([(spec.address, self._make_layer(spec)) for spec in plan.layers])
        self.routes: list[tuple[Step, ...]] = [self._compile(route) for route in plan.routes]
        self._unit_params: list[list[int]] | None = None
        self._cost_tables: dict = {}            # img_size -> CostTable, for stitch_for (plain data, no tensors)
        self._results: dict[int, dict] | None = None

    # ------------------------------------------------------------------------------------------------ construction
    def _make_layer(self, spec: LayerSpec) -> StitchingLayer:
        fa, ea = self.anchors[spec.front], self.anchors[spec.end]
        fad, ead = self.adapters[spec.front], self.adapters[spec.end]
        return StitchingLayer(fad.stage_width(fa, spec.stage), ead.stage_width(ea, spec.stage),
                              fad.stage_layout(fa, spec.stage), ead.stage_layout(ea, spec.stage))

    def _block(self, anchor: int, stage: int, block: int) -> int:
        try:
            return self._block_unit[anchor][(stage, block)]
        except KeyError:
            raise PlanError(f"anchor {self.names[anchor]!r} has no block {block} in stage {stage}") from None

    def _compile(self, route: Route) -> tuple[Step, ...]:
        if route.is_anchor:
            a = route.anchors[0]
            return tuple(("unit", a, u) for u in range(len(self.units[a])))
        steps: list[Step] = []
        start = 0
        for st in route.stitches:
            stop = self._block(st.front, st.stage, st.j)
            steps.extend(("unit", st.front, u) for u in range(start, stop + 1))
            steps.append(("stitch", st.layer))
            start = self._block(st.end, st.stage, st.k)
        last = route.stitches[-1].end
        for u in range(start, len(self.units[last])):
            # SN-Net's stitched DeiT routes call the head on the last block output ([compat], spec 2.1)
            if not (self.skip_final_norm and self.units[last][u].kind == "norm"):
                steps.append(("unit", last, u))
        return tuple(steps)

    # ------------------------------------------------------------------------------------------------- running
    @property
    def num_configs(self) -> int:
        return len(self.routes)

    def check_cfg_id(self, cfg_id) -> int:
        if isinstance(cfg_id, torch.Tensor):
            cfg_id = int(cfg_id)
        if isinstance(cfg_id, bool) or not isinstance(cfg_id, int) or not 0 <= cfg_id < len(self.routes):
            raise PlanError(f"cfg_id {cfg_id!r} is out of range: this SN-Net has cfg_ids 0..{len(self.routes) - 1}")
        return cfg_id

    def stitch_layer(self, address: Sequence[int]) -> StitchingLayer:
        layer = self.stitch_layers
        for i in address:
            layer = layer[i]
        return layer

    def run_step(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        if step[0] == "unit":
            return self.units[step[1]][step[2]].run(self.anchors[step[1]], x)
        return self.stitch_layer(step[1])(x)

    def run_steps(self, steps: Sequence[Step], x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = self.run_step(step, x)
        return x

    def forward(self, x: torch.Tensor, cfg_id: int) -> torch.Tensor:
        return self.run_steps(self.routes[self.check_cfg_id(cfg_id)], x)

    # ------------------------------------------------------------------------------------------------- describing
    def describe(self, cfg_id: int) -> str:
        return self.plan.route(cfg_id).describe(self.names, self.plan.hierarchical)

    def unit_params(self) -> list[list[int]]:
        if self._unit_params is None:
            self._unit_params = [[module_param_count(m, u.modules) for u in units]
                                 for m, units in zip(self.anchors, self.units)]
        return self._unit_params

    def params(self, cfg_id: int) -> int:
        """Parameters of exactly the modules route `cfg_id` executes (unlike SN-Net, spec 6.1 item 3)."""
        counts = self.unit_params()
        total = 0
        for step in self.routes[self.check_cfg_id(cfg_id)]:
            if step[0] == "unit":
                total += counts[step[1]][step[2]]
            else:
                total += sum(p.numel() for p in self.stitch_layer(step[1]).parameters())
        return total

    # ------------------------------------------------------------------------------------------------- switching
    def attach_results(self, records: Sequence[dict] | None) -> None:
        """Accuracy per cfg_id (stitches_res.txt records) for `stitch_for` to rank routes by; None detaches."""
        if records is None:
            self._results = None
            return
        results = {}
        for r in records:
            cfg_id = self.check_cfg_id(r["cfg_id"])
            if "route" in r and r["route"] != self.describe(cfg_id):
                raise PlanError(f"result for cfg_id {cfg_id} is route {r['route']!r} but this SN-Net's cfg_id "
                                f"{cfg_id} is {self.describe(cfg_id)!r}; attach the results of this SN-Net")
            results[cfg_id] = dict(r)
        self._results = results

    def cost_table(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3):
        """FLOPs of every unit and stitching layer for one image of `img_size` (traced once, then cached)."""
        from .cost import measure
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if (size, in_chans) not in self._cost_tables:
            self._cost_tables[(size, in_chans)] = measure(self, size, in_chans)
        return self._cost_tables[(size, in_chans)]

    def stitch_for(self, max_flops: float | None = None, max_params: float | None = None,
                   img_size: int | tuple[int, int] = 224) -> int:
        """The best cfg_id within a budget, to pass to ``forward(x, cfg_id)`` (switching allocates nothing).

        Best = the highest attached top-1 (`attach_results`; routes without a result are not candidates), else the
        route with the most FLOPs that fits (then the most params): within one SN-Net cost and accuracy go
        together, and it is the only ranking available without an evaluation.
        """
        table = self.cost_table(img_size)
        cost = {c: (table.route_flops(steps), self.params(c)) for c, steps in enumerate(self.routes)}
        fits = [c for c, (f, p) in cost.items() if (max_flops is None or f <= max_flops)
                and (max_params is None or p <= max_params) and (self._results is None or c in self._results)]
        if not fits:
            budget = " and ".join(f"{k} <= {v:g}" for k, v in (("flops", max_flops), ("params", max_params))
                                  if v is not None)
            cheapest = min(cost, key=lambda c: cost[c] if max_flops is not None else cost[c][::-1])
            raise PlanError(f"no stitch fits {budget}: the cheapest is cfg_id {cheapest} ({self.describe(cheapest)}, "
                            f"{cost[cheapest][0]} FLOPs, {cost[cheapest][1]} params); raise the budget")
        if self._results is None:  # the most expensive, the lowest cfg_id on ties
            return max(fits, key=lambda c: (*cost[c], -c))
        return max(fits, key=lambda c: (self._results[c]["acc1"], -cost[c][0], -cost[c][1], -c))

    def no_weight_decay(self) -> set[str]:
        """The anchors' own no-weight-decay names, prefixed (SN-Net dropped them, spec 6.1 item 7)."""
        out = set()
        for i, m in enumerate(self.anchors):
            if hasattr(m, "no_weight_decay"):
                out.update(f"anchors.{i}.{n}" for n in m.no_weight_decay())
        return out

    @property
    def pretrained_cfg(self) -> dict:
        """Data config of the largest anchor (timm's resolve_data_config reads this)."""
        return getattr(self.anchors[-1], "pretrained_cfg", {}) or {}


def _nested_module_list(items: list[tuple[tuple[int, ...], nn.Module]]) -> nn.ModuleList:
    """Build nested ModuleLists so that the module at address (a, b, c) is ``root[a][b][c]``."""
    if not items:
        return nn.ModuleList()
    if len(items[0][0]) == 1:
        by_index = {addr[0]: m for addr, m in items}
        if sorted(by_index) != list(range(len(by_index))):
            raise PlanError(f"stitching layer addresses are not dense: {sorted(by_index)}")
        return nn.ModuleList([by_index[i] for i in range(len(by_index))])
    groups: dict[int, list] = {}
    for addr, m in items:
        groups.setdefault(addr[0], []).append((addr[1:], m))
    if sorted(groups) != list(range(len(groups))):
        raise PlanError(f"stitching layer addresses are not dense: {sorted(groups)}")
    return nn.ModuleList([_nested_module_list(groups[i]) for i in range(len(groups))])

