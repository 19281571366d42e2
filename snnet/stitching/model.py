"""Networks with numbered routes: ``forward(x, cfg_id)`` runs route `cfg_id`.

`SNNet` holds anchors + stitching layers; `PlainNet` holds one timm model (``train.py --model``) with its single
route, so the training and evaluation loops treat both alike. There are no random numbers in here: which route runs
is the caller's argument (training draws it with `snnet.train.sampler`). Each route is compiled once into a flat tuple
of steps (`snnet.stitching.steps`: `UnitStep` runs one unit of one anchor, `StitchStep` the stitching layer at an
address), pure data that the evaluator and the cost model reuse.

An input is one image tensor, read by every anchor (SN-Net: one data config for the whole network), or a sequence
of tensors of the same images preprocessed several ways, one per *input group*: anchor a reads
``x[input_groups[a]]`` (`RoutedNet.anchor_input`), so anchors with their own preprocessing (`snnet similarity`,
`snnet search`: snnet.data.transforms.anchor_data_configs) each see their own, and a route reads its first anchor's.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from snnet.stitching.adapter import AnchorAdapter, Unit, adapter_for, block_units, entry_unit, module_param_count
from snnet.stitching.layers import create_stitch_layer
from snnet.stitching.plan import Composition, Edge, Junction, LayerSpec, PlanError, Route, StitchPlan
from snnet.stitching.steps import Step, UnitStep, stitch_step, unit_step
from snnet.utils.checkpoint import classifier_keys, load_fitting

#: where a feature is read: (anchor, unit index); its value is that unit's output
FeaturePoint = tuple[int, int]


class RoutedNet(nn.Module):
    """What the loops, the evaluator, the cost model and the checkpoints need of a network: anchors cut into units,
    routes as tuples of steps, and the state dict that goes into a checkpoint."""

    names: list[str]
    plan: StitchPlan
    units: list[list[Unit]]
    routes: list[tuple[Step, ...]]
    _unit_params: list[list[int]] | None = None  # cached by unit_params()
    grad_checkpointing: bool = False             # set_grad_checkpointing(): recompute blocks in the backward pass
    input_groups: list[int] | None = None        # anchor -> index of its tensor in a sequence input (None: all 0)
    class_names: list[str] | None = None         # the training data's name of each class (snnet.load sets it)
    built_img_size: tuple[int, int] | None = None  # the input size it was built for (CNN anchors keep none)
    bn_stats: StitchStats | None                 # SNNet with "bn_stats": "per_stitch": the stitches' BatchNorm stats
    compile_backend: str | None = None           # compile_routes(): the torch.compile backend of training routes

    def anchor(self, index: int) -> nn.Module:
        raise NotImplementedError

    @property
    def n_anchors(self) -> int:
        return len(self.units)

    @property
    def num_configs(self) -> int:
        return len(self.routes)

    def check_cfg_id(self, cfg_id) -> int:
        if isinstance(cfg_id, torch.Tensor):
            cfg_id = int(cfg_id)
        self.plan.route(cfg_id)  # the plan's range check
        return cfg_id

    def stitch_layer(self, address: Sequence[int]) -> nn.Module:
        raise PlanError(f"{type(self).__name__} has no stitching layer {tuple(address)}")

    def stitch_inputs(self) -> dict[tuple[int, ...], tuple[int, int] | None]:
        """Per stitching module (its address): the feature point (anchor, unit) whose output it maps, or None for
        a module no route uses. The cost model traces each module on that unit's output shape."""
        return {}

    def run_step(self, step: Step, x: torch.Tensor) -> torch.Tensor:
        if isinstance(step, UnitStep):
            unit = self.units[step.anchor][step.unit]
            run = unit.run
            if step.stats is not None:  # the unit's BatchNorm layers read and update the stitch's statistics
                stats = self.bn_stats
                assert stats is not None, "a step with stats in a network that keeps none"

                def run(model: nn.Module, h: torch.Tensor, unit: Unit = unit, step: UnitStep = step) -> torch.Tensor:
                    with stats.swapped(self, step):
                        return unit.run(model, h)
            if self.grad_checkpointing and self.training and unit.kind == "block" and torch.is_grad_enabled():
                # keep only the block's input; its activations are recomputed in the backward pass (the RNG state
                # is replayed, so drop-path draws the same masks)
                return torch.utils.checkpoint.checkpoint(run, self.anchor(step.anchor), x, use_reentrant=False)
            return run(self.anchor(step.anchor), x)
        return self.stitch_layer(step.address)(x)

    def unit_batchnorms(self, anchor: int, unit: int) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        """The BatchNorm layers unit `unit` of anchor `anchor` runs, with their names in the anchor (looked up each
        time: --sync-bn replaces them after the network is built)."""
        model, out = self.anchor(anchor), []
        for name in self.units[anchor][unit].modules:
            try:
                sub = model.get_submodule(name)
            except AttributeError:  # a parameter's name
                continue
            out += [(f"{name}.{n}" if n else name, m) for n, m in sub.named_modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's method name (``--grad-checkpointing``): while training, every ``block`` unit runs under
        torch.utils.checkpoint (non-reentrant), trading a second forward of each block for its activation memory.
        Evaluation and the least-squares init are unaffected."""
        self.grad_checkpointing = bool(enable)

    def compile_routes(self, backend: str = "inductor") -> None:
        """``--torchcompile``: from now on each route trains as one torch.compile'd graph, compiled at its first
        training step (`forward` in training mode with gradients). A route is a fixed tuple of steps, so its graph is
        straight-line code: the anchor routes are timm's models step for step, and a step pays one compiled call, not
        one per block. Evaluation and anything else without gradients run the routes eagerly (one pass over every
        route does not repay their compile time)."""
        self.compile_backend = backend
        self._compiled_routes: dict[int, Any] = {}
        _raise_recompile_limit(self.num_configs)

    def run_steps(self, steps: Sequence[Step], x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = self.run_step(step, x)
        return x

    def anchor_input(self, x: torch.Tensor | Sequence[torch.Tensor], anchor: int) -> torch.Tensor:
        """The tensor anchor `anchor` reads of input `x`: `x` itself, or of a sequence (one tensor per input group)
        the one of the anchor's group."""
        if isinstance(x, torch.Tensor):
            return x
        group = self.input_groups[anchor] if self.input_groups is not None else 0
        if not 0 <= group < len(x):
            raise PlanError(f"anchor {anchor} ({self.names[anchor]!r}) reads input {group}, but the input holds "
                            f"{len(x)} tensor(s): give one tensor per input group {self.input_groups}")
        return x[group]

    def route_input(self, x: torch.Tensor | Sequence[torch.Tensor], first_step: Step) -> torch.Tensor:
        """The tensor a route beginning with `first_step` (a unit of its front anchor) reads of input `x`."""
        if isinstance(x, torch.Tensor):
            return x
        if not isinstance(first_step, UnitStep):
            raise PlanError(f"a route begins with a unit of an anchor, not with {first_step!r}")
        return self.anchor_input(x, first_step.anchor)

    def forward(self, x: torch.Tensor, cfg_id: int = 0) -> torch.Tensor:
        cfg_id = self.check_cfg_id(cfg_id)
        if self.compile_backend is None or not (self.training and torch.is_grad_enabled()):
            return self.run_steps(self.routes[cfg_id], x)
        run = self._compiled_routes.get(cfg_id)
        if run is None:
            run = torch.compile(_route_function(self, cfg_id), backend=self.compile_backend)
            self._compiled_routes[cfg_id] = run
        return run(x)

    def describe(self, cfg_id: int) -> str:
        raise NotImplementedError

    def unit_params(self) -> list[list[int]]:
        if self._unit_params is None:
            self._unit_params = [[module_param_count(self.anchor(a), u.modules) for u in units]
                                 for a, units in enumerate(self.units)]
        return self._unit_params

    def params(self, cfg_id: int) -> int:
        """Parameters of exactly the modules route `cfg_id` executes (SN-Net counted otherwise:
        docs/snnet_compat.md, C22)."""
        counts = self.unit_params()
        total = 0
        for step in self.routes[self.check_cfg_id(cfg_id)]:
            if isinstance(step, UnitStep):
                total += counts[step.anchor][step.unit]
            else:
                total += sum(p.numel() for p in self.stitch_layer(step.address).parameters())
        return total

    # ------------------------------------------------------------------------------------------- features
    def capture(self, x: torch.Tensor | Sequence[torch.Tensor], points: dict[int, set[int]]
                ) -> dict[FeaturePoint, torch.Tensor]:
        """Run each anchor in `points` ({anchor: unit indices}) on its input of `x` (`anchor_input`) as far as
        needed, keeping those units' outputs: the features the least-squares init, the stitchability checks and the
        compatibility maps compare."""
        out = {}
        for a, wanted in points.items():
            h = self.anchor_input(x, a)
            weight = next(self.anchor(a).parameters(), None)
            if weight is not None and h.device != weight.device:  # images from a CPU loader, the network on a GPU
                h = h.to(weight.device, non_blocking=True)
            for u in range(max(wanted) + 1):
                h = self.units[a][u].run(self.anchor(a), h)
                if u in wanted:
                    out[(a, u)] = h
        return out

    # ------------------------------------------------------------------------------------------- checkpoints
    def _anchor_prefix(self, index: int) -> str:
        raise NotImplementedError

    def is_anchor_parameter(self, name: str) -> bool:
        """Whether parameter `name` (as ``named_parameters`` gives it) belongs to an anchor, not a stitching module:
        the optimizer's rule for anchor LR scale and layer decay."""
        return any(name.startswith(self._anchor_prefix(a)) for a in range(self.n_anchors))

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The state dict a checkpoint stores."""
        return self.state_dict()

    def checkpoint_heads(self) -> set[str]:
        """The `checkpoint_state` keys of the anchors' classifiers (whose size the data decides)."""
        return {f"{self._anchor_prefix(a)}{k}" for a in range(self.n_anchors) for k in classifier_keys(self.anchor(a))}

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's state dict strictly; `StateDictMismatch` says what does not fit."""
        load_fitting(self, state)

    def no_weight_decay(self) -> set[str]:
        """The anchors' own no-weight-decay names, prefixed (SN-Net dropped them: docs/snnet_compat.md, C18)."""
        out: set[str] = set()
        for a in range(self.n_anchors):
            nwd = getattr(self.anchor(a), "no_weight_decay", None)
            if nwd is not None:
                out.update(f"{self._anchor_prefix(a)}{n}" for n in nwd())
        return out

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """Data config of the largest anchor (timm's resolve_data_config reads this)."""
        return getattr(self.anchor(self.n_anchors - 1), "pretrained_cfg", {}) or {}


def _route_function(net: RoutedNet, cfg_id: int):
    """Route `cfg_id` of `net` as a function of the input alone, for torch.compile. Dynamo keeps its compiled graphs
    on the function's code object and checks a call against each graph's guards in turn; every route gets a code
    object of its own (named route_<cfg_id>), so a call checks one graph's guards, not those of every route
    trained so far."""
    steps = net.routes[cfg_id]

    def route(x: torch.Tensor) -> torch.Tensor:
        return net.run_steps(steps, x)
    route.__code__ = route.__code__.replace(co_name=f"route_{cfg_id}")
    route.__name__ = route.__qualname__ = f"route_{cfg_id}"
    return route


def _raise_recompile_limit(modules: int) -> None:
    """Where a compiled route breaks its graph (an eager-only step), dynamo compiles the rest of it in code that
    every route shares (run_steps, a unit's run), specialised per route; let each route have its own entries there
    before dynamo gives up and runs that code eagerly."""
    import torch._dynamo  # heavy (the compiler); only a --compile run reaches it
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), 2 * modules + 8))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * modules + 64)


def _run_whole(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


class PlainNet(RoutedNet):
    """One timm model as a network with one route (``train.py --model NAME``, as SN-Net's main.py could train one
    model). Its checkpoint holds the model's own timm keys, so it can serve as an anchor checkpoint."""

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model
        self.names = [name]
        owned = tuple(n for n, _ in model.named_children()) + tuple(n for n, _ in model.named_parameters(recurse=False))
        self.units = [[Unit(name, "model", _run_whole, owned)]]
        self.routes = [(unit_step(0, 0),)]
        self.plan = StitchPlan((Route(0, (0,)),), (), 1)

    def anchor(self, index: int) -> nn.Module:
        return self.model

    def _anchor_prefix(self, index: int) -> str:
        return "model."

    def describe(self, cfg_id: int) -> str:
        return self.names[self.check_cfg_id(cfg_id)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """One timm model runs as one unit: its own set_grad_checkpointing does the work."""
        super().set_grad_checkpointing(enable)
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)

    def compile_routes(self, backend: str = "inductor") -> None:
        """One route: the whole timm model is compiled in place, for training and evaluation alike."""
        self.model.compile(backend=backend)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def checkpoint_heads(self) -> set[str]:
        return classifier_keys(self.model)

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        load_fitting(self.model, state)


class AnchorsNet(RoutedNet):
    """A routed network over several anchors held at ``anchors.<i>`` (checkpoint keys ``anchors.<i>.<timm name>``):
    SN-Net's and the composed networks of search and stitch-train."""
    anchors: nn.ModuleList
    anchors_frozen = False

    def anchor(self, index: int) -> nn.Module:
        return self.anchors[index]

    def _anchor_prefix(self, index: int) -> str:
        return f"anchors.{index}."

    def freeze_anchors(self) -> None:
        """Train only the stitching modules: the anchors' parameters get no gradient and the anchors stay in eval
        mode whatever ``train()`` is called with (BatchNorm statistics and dropout as in the pretrained model)."""
        self.anchors_frozen = True
        for p in self.anchors.parameters():
            p.requires_grad = False
        self.train(self.training)

    def train(self, mode: bool = True) -> AnchorsNet:
        super().train(mode)
        if self.anchors_frozen:
            self.anchors.eval()
        return self


class SNNet(AnchorsNet):
    """Anchors + stitching layers. `stitch_layer` is the config's stitching-layer spec, e.g. ``{"type": "linear"}``
    (the default; see `snnet.stitching.layers.register_stitch_layer` for other types)."""

    def __init__(self, anchors: Sequence[nn.Module], plan: StitchPlan, names: Sequence[str] | None = None,
                 adapters: Sequence[AnchorAdapter] | None = None, skip_final_norm: bool = False,
                 stitch_layer: dict[str, Any] | None = None, bn_stats: str = "shared"):
        super().__init__()
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats {bn_stats!r} is not known: use {' or '.join(BN_STATS)}")
        self.per_stitch_stats = bn_stats == "per_stitch"
        if len(anchors) != plan.n_anchors:
            raise PlanError(f"the plan is for {plan.n_anchors} anchors but {len(anchors)} were given")
        self.anchors = nn.ModuleList(anchors)
        self.names = list(names) if names is not None else [type(m).__name__ for m in anchors]
        self.adapters = list(adapters) if adapters is not None else [
            adapter_for(m, n) for m, n in zip(anchors, self.names)]
        self.plan = plan
        self.skip_final_norm = skip_final_norm
        self.units: list[list[Unit]] = [ad.units(m) for ad, m in zip(self.adapters, anchors)]
        self._block_unit = [block_units(units) for units in self.units]
        self.stitch_layer_spec = dict(stitch_layer or {"type": "linear"})
        self.stitch_layers = _nested_module_list([(spec.address, self._make_layer(spec)) for spec in plan.layers])
        self.routes: list[tuple[Step, ...]] = [self._compile(route) for route in plan.routes]
        self.bn_stats = StitchStats(self) if self.per_stitch_stats else None

    # ------------------------------------------------------------------------------------------------ construction
    def _make_layer(self, spec: LayerSpec) -> nn.Module:
        fa, ea = self.anchors[spec.front], self.anchors[spec.end]
        fad, ead = self.adapters[spec.front], self.adapters[spec.end]
        return create_stitch_layer(self.stitch_layer_spec, fad.stage_width(fa, spec.stage),
                                   ead.stage_width(ea, spec.stage), fad.stage_layout(fa, spec.stage),
                                   ead.stage_layout(ea, spec.stage))

    def entry_unit(self, anchor: int, stage: int, block: int) -> int:
        """The unit where anchor `anchor` continues from block `block` of `stage` (`adapter.entry_unit`)."""
        try:
            return entry_unit(self.units[anchor], stage, block, self._block_unit[anchor])
        except KeyError:
            raise PlanError(f"anchor {self.names[anchor]!r} has no block {block} in stage {stage}") from None

    def block_unit(self, anchor: int, stage: int, block: int) -> int:
        """Index in ``units[anchor]`` of block `block` of `stage`."""
        try:
            return self._block_unit[anchor][(stage, block)]
        except KeyError:
            raise PlanError(f"anchor {self.names[anchor]!r} has no block {block} in stage {stage}") from None

    def _compile(self, route: Route) -> tuple[Step, ...]:
        if route.is_anchor:
            a = route.anchors[0]
            return tuple(unit_step(a, u) for u in range(len(self.units[a])))
        steps: list[Step] = []
        start = 0
        stats: str | None = None  # per_stitch: the key of the stitches passed so far
        for st in route.stitches:
            stop = self.block_unit(st.front, st.stage, st.j)
            steps.extend(unit_step(st.front, u, stats) for u in range(start, stop + 1))
            steps.append(stitch_step(st.layer))
            start = self.entry_unit(st.end, st.stage, st.k)
            if self.per_stitch_stats:
                key = "_".join(map(str, st.layer))
                stats = key if stats is None else f"{stats}-{key}"
        last = route.stitches[-1].end
        for u in range(start, len(self.units[last])):
            # SN-Net's stitched DeiT routes call the head on the last block output (docs/snnet_compat.md, C7)
            if not (self.skip_final_norm and self.units[last][u].kind == "norm"):
                steps.append(unit_step(last, u, stats))
        return tuple(steps)

    # ------------------------------------------------------------------------------------------------- running
    def stitch_layer(self, address: Sequence[int]) -> nn.Module:
        layer = self.stitch_layers
        for i in address:
            layer = layer[i]
        return layer

    def stitch_inputs(self) -> dict[tuple[int, ...], tuple[int, int] | None]:
        out = {}
        for spec in self.plan.layers:
            positions = self.plan.positions_of_layer(spec.address)  # none: allocated but unused (interpolation)
            st = positions[0] if positions else None
            out[spec.address] = None if st is None else (st.front, self.block_unit(st.front, st.stage, st.j))
        return out

    # ------------------------------------------------------------------------------------------------- describing
    def describe(self, cfg_id: int) -> str:
        return self.plan.route(cfg_id).describe(self.names, self.plan.hierarchical)

    def feature_points(self, positions: Sequence[Junction]) -> tuple[dict[int, set[int]], dict[tuple, tuple]]:
        """For stitches (front j -> end k): the unit outputs to `capture` per anchor, and per position key
        (front, end, stage, j, k) the feature points of its input X (front block j's output) and its target Y (the
        end anchor's input to block k, i.e. the output of the unit before it)."""
        need: dict[int, set[int]] = {}
        where = {}
        for st in positions:
            ux = self.block_unit(st.front, st.stage, st.j)
            uy = self.entry_unit(st.end, st.stage, st.k) - 1
            need.setdefault(st.front, set()).add(ux)
            need.setdefault(st.end, set()).add(uy)
            where[(st.front, st.end, st.stage, st.j, st.k)] = ((st.front, ux), (st.end, uy))
        return need, where


#: where the BatchNorm layers of an anchor's blocks after a stitch keep their running statistics: ``shared`` (SN-Net's:
#: the anchor's own, updated by every route that runs them) or ``per_stitch`` (`StitchStats`)
BN_STATS = ("shared", "per_stitch")


class StitchStats(nn.Module):
    """Running statistics of BatchNorm, one set per stitch: the blocks an anchor runs after a stitching layer see
    that layer's outputs, whose mean and variance are not the anchor's own features'. With one set shared by every
    route (SN-Net's), each route's updates pull the others' statistics and the anchors' own towards a blend that fits
    none of them. Here the units after a stitch (steps with ``stats``) read and update their own copy, initialised
    from the anchor's statistics when the network is built; the BatchNorm weights stay shared. Buffers:
    ``sets.<stats key>.<anchor>-<BatchNorm name, dots as dashes>-running_mean`` (and ``-running_var``)."""

    def __init__(self, net: SNNet):
        super().__init__()
        self.sets = nn.ModuleDict()
        #: per (anchor, unit): (BatchNorm name in the anchor, its buffers' names here), found once: the names stay
        #: when --sync-bn replaces the layers, so each swap looks the layers up by name without walking the unit
        self.layers: dict[tuple[int, int], list[tuple[str, str, str]]] = {}
        for route in net.routes:
            for step in route:
                if not isinstance(step, UnitStep) or step.stats is None:
                    continue
                if step.stats not in self.sets:
                    self.sets[step.stats] = nn.Module()
                holder = self.sets[step.stats]
                found = [(name, bn) for name, bn in net.unit_batchnorms(step.anchor, step.unit)
                         if bn.running_mean is not None]  # a layer without running statistics keeps nothing
                self.layers[(step.anchor, step.unit)] = [
                    (name, self.buffer_name(step.anchor, name, "running_mean"),
                     self.buffer_name(step.anchor, name, "running_var")) for name, _ in found]
                for name, bn in found:
                    for stat in ("running_mean", "running_var"):
                        holder.register_buffer(self.buffer_name(step.anchor, name, stat),
                                               getattr(bn, stat).detach().clone())

    @staticmethod
    def buffer_name(anchor: int, bn_name: str, stat: str) -> str:
        return f"{anchor}-{bn_name.replace('.', '-')}-{stat}"

    def of(self, net: SNNet, step: UnitStep) -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
        """(name, BatchNorm layer, running mean, running var) of each BatchNorm layer `step`'s unit runs, with the
        statistics it runs with there."""
        buffers, model = self.sets[step.stats]._buffers, net.anchor(step.anchor)
        return [(name, model.get_submodule(name), buffers[mean], buffers[var])
                for name, mean, var in self.layers[(step.anchor, step.unit)]]

    @contextlib.contextmanager
    def swapped(self, net: SNNet, step: UnitStep) -> Iterator[None]:
        """While inside, the unit's BatchNorm layers hold `step`'s statistics (read in eval mode, updated in place in
        training); the anchor's own are put back after."""
        kept = []
        for _, bn, mean, var in self.of(net, step):
            kept.append((bn, bn._buffers["running_mean"], bn._buffers["running_var"]))
            bn._buffers["running_mean"], bn._buffers["running_var"] = mean, var
        try:
            yield
        finally:
            for bn, mean, var in kept:
                bn._buffers["running_mean"], bn._buffers["running_var"] = mean, var


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


class ComposedNet(AnchorsNet):
    """Anchors of any families joined at unit granularity: route `cfg_id` runs the `Composition`
    ``compositions[cfg_id]`` (plan.py), each of its edges through the stitching module ``stitches[edge]``
    (any module mapping the front unit's output onto the end anchor's features; `snnet.stitching.cut.CutStitch` builds
    them).
    The networks `snnet search` composes; the evaluator, the cost model and `params` run it as any routed network.
    Stitch steps are ``("stitch", (i,))`` with i the edge's index in `edges`.

    `input_groups` (anchor -> input group; None: every anchor reads the one input) says which tensor of a sequence
    input each anchor reads: anchors of different families have different preprocessing
    (snnet.data.transforms.anchor_data_configs), and a route reads its front anchor's. A single tensor input is read by
    every anchor."""

    def __init__(self, anchors: Sequence[nn.Module], compositions: Sequence[Composition],
                 stitches: dict[Edge, nn.Module], names: Sequence[str] | None = None,
                 adapters: Sequence[AnchorAdapter] | None = None, input_groups: Sequence[int] | None = None):
        super().__init__()
        if input_groups is not None:
            input_groups = [int(g) for g in input_groups]
            if len(input_groups) != len(anchors) or any(g < 0 for g in input_groups):
                raise PlanError(f"input_groups {input_groups} must give each of the {len(anchors)} anchors an "
                                f"input index >= 0")
        self.input_groups = input_groups
        self.anchors = nn.ModuleList(anchors)
        self.names = list(names) if names is not None else [type(m).__name__ for m in anchors]
        self.adapters = list(adapters) if adapters is not None else [
            adapter_for(m, n) for m, n in zip(anchors, self.names)]
        self.units: list[list[Unit]] = [ad.units(m) for ad, m in zip(self.adapters, anchors)]
        self.compositions = list(compositions)
        used = list(dict.fromkeys(e for c in self.compositions for e in c.edges))
        missing = [e for e in used if e not in stitches]
        if missing:
            raise PlanError(f"no stitching module for edge(s) {missing} (front anchor, unit, end anchor, unit)")
        self.edges: list[Edge] = used
        self.stitches = nn.ModuleList([stitches[e] for e in used])
        self.plan = StitchPlan((), (), len(anchors))  # no stage-wise stitching layers: the stitches are above
        for c in self.compositions:
            c.check([len(u) for u in self.units])
        address = {e: (i,) for i, e in enumerate(used)}
        self.routes = [self._compile(c, address) for c in self.compositions]

    @staticmethod
    def _compile(c: Composition, address: dict) -> tuple[Step, ...]:
        steps: list[Step] = []
        for s, edge in zip(c.segments, c.edges + (None,)):
            steps.extend(unit_step(s.anchor, u) for u in range(s.first, s.last + 1))
            if edge is not None:
                steps.append(stitch_step(address[edge]))
        return tuple(steps)

    def check_cfg_id(self, cfg_id) -> int:
        if isinstance(cfg_id, torch.Tensor):
            cfg_id = int(cfg_id)
        if isinstance(cfg_id, bool) or not isinstance(cfg_id, int) or not 0 <= cfg_id < len(self.routes):
            raise PlanError(f"cfg_id {cfg_id!r} is out of range: this network has cfg_ids 0..{len(self.routes) - 1}")
        return cfg_id

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], cfg_id: int = 0) -> torch.Tensor:
        steps = self.routes[self.check_cfg_id(cfg_id)]
        return self.run_steps(steps, self.route_input(x, steps[0]))

    def stitch_layer(self, address: Sequence[int]) -> nn.Module:
        return self.stitches[address[0]]

    def stitch_inputs(self) -> dict[tuple[int, ...], tuple[int, int] | None]:
        return {(i,): (a, u) for i, (a, u, _, _) in enumerate(self.edges)}

    def describe(self, cfg_id: int) -> str:
        return self.compositions[self.check_cfg_id(cfg_id)].describe(
            self.names, [[u.name for u in units] for units in self.units])
