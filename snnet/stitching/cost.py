"""Cost model: FLOPs in SN-Net's convention and params of exactly what a route executes.

FLOPs follow fvcore (the numbers SN-Net published): one multiply-add counts 1, LayerNorm 5 per element, eval
BatchNorm 2 per element, and so on (docs/snnet_compat.md, C21). timm now computes attention with
``F.scaled_dot_product_attention``, which fvcore does not count; the handler below counts its two matmuls (q·kᵀ and
attn·v) as SN-Net's traces did.

Each distinct unit (one anchor's stem, block, transition, norm or head; one stitching layer) is priced once for a
single image, and units of one structure (the same module types, settings and parameter shapes, run on the same
input shape: a ViT's identical blocks, one pair's stitching layers) are traced once between them; a route's FLOPs
are the sum over its steps. `trace_route_flops` traces a whole route for checking.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch import nn

from snnet.stitching.steps import UnitStep

if TYPE_CHECKING:  # hints only: a runtime import made model.py and cost.py import each other
    from snnet.stitching.model import RoutedNet as SNNet


def _fvcore_nn() -> Any:
    """fvcore.nn, imported on first use: heavy (it scripts a function at import), and only pricing needs it. That
    import calls torch.jit.script, which torch 2.14 deprecates with a FutureWarning in every process that prices a
    network; the call is fvcore's (its last release predates the deprecation), so that one warning is silenced
    here, around the import, and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import fvcore.nn
        import fvcore.nn.jit_handles
    return fvcore.nn


def _sdpa_flop_handler(inputs: list[Any], outputs: list[Any]) -> int:
    get_shape = _fvcore_nn().jit_handles.get_shape
    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, n_q, d = q
    n_k, d_v = k[-2], v[-1]
    b = 1
    for s in batch:
        b *= s
    return b * n_q * n_k * d + b * n_q * n_k * d_v


FLOP_HANDLES = {"aten::scaled_dot_product_attention": _sdpa_flop_handler}


class _Call(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module):
        super().__init__()
        self.owner = owner  # registered so fvcore sees the modules
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], owner: nn.Module, x: torch.Tensor) -> int:
    """fvcore FLOPs of ``fn(x)`` (SN-Net's convention), with the SDPA handler, warnings off."""
    FlopCountAnalysis = _fvcore_nn().FlopCountAnalysis  # noqa: N806 (fvcore's class)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    analysis = FlopCountAnalysis(_Call(fn, owner), (x,)).set_op_handle(**FLOP_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings_off():
        return int(analysis.total())


@contextlib.contextmanager
def warnings_off():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class CostTable:
    img_size: tuple[int, int]             # the input size (the first anchor's when they differ: `sizes`)
    unit_flops: list[list[int]]           # [anchor][unit]
    layer_flops: dict[tuple[int, ...], int]
    unit_outputs: list[list[torch.Size]]  # [anchor][unit] output shape for one image
    sizes: list[tuple[int, int]] | None = None  # [anchor] input size, when anchors read their own (None: img_size)

    def route_flops(self, steps) -> int:
        return sum(self.unit_flops[s.anchor][s.unit] if isinstance(s, UnitStep) else self.layer_flops[s.address]
                   for s in steps)


Size: TypeAlias = "int | tuple[int, int] | list[tuple[int, int]]"


def _sizes(model: SNNet, img_size) -> list[tuple[int, int]]:
    """Per anchor, its input size (H, W): one size for every anchor, or a list with each anchor's own."""
    def one(s) -> tuple[int, int]:
        if isinstance(s, int):
            return s, s
        *_, h, w = (int(v) for v in s)
        return h, w
    if isinstance(img_size, list):
        if len(img_size) != model.n_anchors:
            raise ValueError(f"{len(img_size)} input sizes for {model.n_anchors} anchors")
        return [one(s) for s in img_size]
    return [one(img_size)] * model.n_anchors


def structure(module: nn.Module) -> tuple | None:
    """What fixes `module`'s FLOPs for a given input shape: per submodule its name, type, plain attributes (a
    block's settings: its fused attention, a stitching layer's layouts) and its parameters' and buffers' shapes and
    dtypes. None (never priced by another's trace) when a submodule has a hook, which may run anything."""
    parts = []
    for name, m in module.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return None
        attrs = tuple(sorted((k, repr(v)) for k, v in vars(m).items()
                             if not k.startswith("_") and k != "training"
                             and not isinstance(v, (torch.Tensor, nn.Module))))
        tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in [*m.named_parameters(recurse=False),
                                                                   *m.named_buffers(recurse=False)])
        parts.append((name, type(m), attrs, tensors))
    return tuple(parts)


def _priced(cache: dict, module: nn.Module | None, x: torch.Tensor, price: Callable[[], int]) -> int:
    """`price()`, once for every module of one `structure` run on one input shape (`module` None: not shared)."""
    key = structure(module) if module is not None else None
    if key is None:
        return price()
    key = (key, tuple(x.shape), x.dtype)
    if key not in cache:
        cache[key] = price()
    return cache[key]


@torch.no_grad()
def measure(model: SNNet, img_size: Size = 224, in_chans: int = 3) -> CostTable:
    """Trace every unit of every anchor and every stitching module once, for one image: any network the library
    builds (SN-Net's stitching layers, `snnet search`'s stitches), through its `stitch_inputs`. `img_size` is one size,
    or a list of each anchor's own input size (anchors with their own preprocessing): each anchor's units are
    priced at its size, and a stitch on its front unit's output there."""
    sizes = _sizes(model, img_size)
    device = next(model.parameters()).device
    unit_flops, unit_outputs = [], []
    cache: dict = {}  # structure and input shape -> FLOPs (`_priced`)
    with eval_mode(model):
        for a, units in enumerate(model.units):
            anchor = model.anchor(a)
            x = torch.zeros(1, in_chans, *sizes[a], device=device)
            flops, shapes = [], []
            for unit in units:
                module = anchor.get_submodule(unit.submodule) if unit.submodule is not None else None
                flops.append(_priced(cache, module, x, partial(count_flops, partial(unit.run, anchor), anchor, x)))
                x = unit.run(anchor, x)
                shapes.append(x.shape)
            unit_flops.append(flops)
            unit_outputs.append(shapes)
        layer_flops = {}
        for address, feed in model.stitch_inputs().items():
            if feed is None:  # allocated but unused by any route (possible with depth interpolation)
                layer_flops[address] = 0
                continue
            x = torch.zeros(unit_outputs[feed[0]][feed[1]], device=device)  # FLOPs depend on the shape only
            layer = model.stitch_layer(address)
            # a low-rank layer runs as its merged linear map once deployed (SN-Netv2 counted that one too)
            layer = layer.merged() if hasattr(layer, "merged") else layer
            layer_flops[address] = _priced(cache, layer, x, partial(count_flops, layer, layer, x))
    return CostTable(sizes[0], unit_flops, layer_flops, unit_outputs, None if len(set(sizes)) == 1 else sizes)


# net -> {(sizes, in_chans): CostTable}; weak keys, so a net's tables go when the net does
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# (a network's structure, sizes, in_chans) -> CostTable, for another network of one structure in this process (a
# run's preflight builds the network it then builds again; a dry run describes and checks it): the newest few
_BY_STRUCTURE: dict[tuple, CostTable] = {}
_BY_STRUCTURE_KEPT = 4


def _table_key(model: SNNet) -> tuple | None:
    """`structure(model)` less the network's adapter objects (one per build, with the anchor types already in the
    key), or None where a hook makes the structure unknown."""
    parts = structure(model)
    if parts is None:
        return None
    (name, kind, attrs, tensors), *rest = parts
    return ((name, kind, tuple(a for a in attrs if a[0] != "adapters"), tensors), *rest)


def cost_table(model: SNNet, img_size: Size, in_chans: int = 3) -> CostTable:
    """`measure` of one network at one image size (or per-anchor sizes), traced once and then cached (FLOPs depend on
    the architecture and the input size, not on the weights, so training does not invalidate it), for this network
    and for any other of the same structure."""
    sizes = tuple(_sizes(model, img_size))
    tables = _TABLES.setdefault(model, {})
    if (sizes, in_chans) not in tables:
        key = _table_key(model)
        key = None if key is None else (key, sizes, in_chans)
        table = _BY_STRUCTURE.pop(key, None) if key is not None else None
        tables[(sizes, in_chans)] = table = table or measure(model, list(sizes), in_chans)
        if key is not None:
            _BY_STRUCTURE[key] = table  # the newest last
            while len(_BY_STRUCTURE) > _BY_STRUCTURE_KEPT:
                del _BY_STRUCTURE[next(iter(_BY_STRUCTURE))]
    return tables[(sizes, in_chans)]
