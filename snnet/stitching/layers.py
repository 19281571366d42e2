"""Stitching layers: map the front anchor's features to the width and layout the end anchor expects.

Stitching-layer types are registered by name (`register_stitch_layer`) and built from the stitch config's
``"stitch_layer": {"type": NAME, ...options}`` by `create_stitch_layer`. A type is an ``nn.Module`` with

    __init__(in_channels, out_channels, in_layout, out_layout, **options)
    forward(x)                        front features (in_layout) -> end features (out_layout)
    set_affine(weight, bias)          set the map to y = W x + b (the least-squares init calls this)
    affine() -> (W, b)                the affine map the layer computes now (float64): the least-squares fit
                                      reports the error of this map, so a layer that cannot hold the solution
                                      (``lowrank``) reports its own error; optional for a type that is not affine
    spec() -> dict                    {"type": NAME, in/out channels and layouts, options}: rebuilds it (export)
    in_layout, out_layout             attributes

The default type ``linear`` keeps its learnable part in the sub-module ``transform`` (``nn.Linear`` on
channels-last features, ``nn.Conv2d`` 1x1 on NCHW feature maps), so checkpoint keys are SN-Net's
``...<layer>.transform.{weight,bias}``. The type ``lora`` (SN-Netv2's low-rank layer) adds a trainable rank-r update to
a frozen least-squares W; an optional ``merged()`` returns an equivalent plain layer, which export writes instead.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from snnet.stitching.adapter import LAYOUTS, NCHW, NHWC, TOKENS


def to_rows(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Features as a 2-D (rows, channels) matrix, channels last, rows in (batch, h, w) / (batch, token) order."""
    if layout == NCHW:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _grid(n_tokens: int) -> tuple[int, int]:
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"cannot lay {n_tokens} tokens out as a square feature map")
    return side, side


def convert_layout(x: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Convert between TOKENS (B,N,C), NHWC (B,H,W,C) and NCHW (B,C,H,W); token grids are square, row-major."""
    if src == dst:
        return x
    if src == NCHW:  # -> channels last first
        x = x.permute(0, 2, 3, 1)
        src = NHWC
        if dst == NHWC:
            return x
    if src == NHWC:
        if dst == TOKENS:
            return x.reshape(x.shape[0], -1, x.shape[-1])
        return x.permute(0, 3, 1, 2)  # dst NCHW
    # src == TOKENS
    h, w = _grid(x.shape[1])
    x = x.reshape(x.shape[0], h, w, x.shape[-1])
    return x if dst == NHWC else x.permute(0, 3, 1, 2)


_STITCH_LAYERS: dict[str, type[nn.Module]] = {}


def register_stitch_layer(name: str):
    """Class decorator: make a stitching-layer type available to configs as ``{"type": name}``."""
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        cls.layer_type = name
        _STITCH_LAYERS[name] = cls
        return cls
    return add


def stitch_layer_types() -> list[str]:
    return sorted(_STITCH_LAYERS)


def create_stitch_layer(spec: dict[str, Any] | None, in_channels: int, out_channels: int, in_layout: str = TOKENS,
                        out_layout: str = TOKENS) -> nn.Module:
    """A stitching layer of the type `spec` names (``{"type": "linear"}`` when None), with `spec`'s options."""
    options = dict(spec or {})
    kind = options.pop("type", "linear")
    if kind not in _STITCH_LAYERS:
        raise ValueError(f"stitching layer type {kind!r} is not known; use one of {', '.join(stitch_layer_types())}")
    try:
        return _STITCH_LAYERS[kind](in_channels, out_channels, in_layout, out_layout, **options)
    except TypeError as e:
        raise ValueError(f"stitching layer {spec!r}: {e}; see the type's arguments") from None


def stitch_layer_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a layer from its ``spec()`` (export folders store it)."""
    options = dict(spec)
    shape = [options.pop(k) for k in ("in_channels", "out_channels", "in_layout", "out_layout")]
    return create_stitch_layer(options, *shape)


@register_stitch_layer("linear")
class StitchingLayer(nn.Module):
    """One stitching layer: Linear on channels-last features, or 1x1 Conv on NCHW maps, then a layout change."""

    def __init__(self, in_channels: int, out_channels: int, in_layout: str = TOKENS, out_layout: str = TOKENS):
        super().__init__()
        if in_layout not in LAYOUTS or out_layout not in LAYOUTS:
            raise ValueError(f"unknown feature layout {in_layout!r} -> {out_layout!r}; use one of {LAYOUTS}")
        self.in_layout, self.out_layout = in_layout, out_layout
        if in_layout == NCHW:
            self.transform = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        else:
            self.transform = nn.Linear(in_channels, out_channels, bias=True)

    @property
    def out_conv_layout(self) -> str:
        return NCHW if isinstance(self.transform, nn.Conv2d) else self.in_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return convert_layout(self.transform(x), self.out_conv_layout, self.out_layout)

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set the map y = W x + b from a (out, in) matrix and an (out,) vector."""
        w = self.transform.weight
        self.transform.weight.copy_(weight.reshape(w.shape).to(w.dtype))
        self.transform.bias.copy_(bias.to(w.dtype))

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W (out, in), b) in float64: the map this layer computes."""
        w = self.transform.weight
        return w.detach().double().reshape(w.shape[0], -1).clone(), self.transform.bias.detach().double().clone()

    def spec(self) -> dict[str, Any]:
        t = self.transform
        cin, cout = (t.in_channels, t.out_channels) if isinstance(t, nn.Conv2d) else (t.in_features, t.out_features)
        return {"type": self.layer_type, "in_channels": cin, "out_channels": cout, "in_layout": self.in_layout,
                "out_layout": self.out_layout}

    def extra_repr(self) -> str:
        return f"{self.in_layout} -> {self.out_layout}"


class LoRALinear(nn.Module):
    """SN-Netv2's LoRA linear map ``x Wᵀ + b + scaling · (x Aᵀ) Bᵀ`` on channels-last rows; W is frozen.

    Parameters (SN-Netv2's keys): ``weight`` [out, in] (requires_grad False), ``bias`` [out], ``lora_A`` [rank, in]
    (kaiming-uniform, a=sqrt(5)), ``lora_B`` [out, rank] (zeros). The low-rank term is always computed, never merged
    into W in place (SN-Netv2 merged on eval() and lost track of it across --resume); `merged_affine` gives W + s·B·A.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.scaling = in_features, out_features, rank, alpha / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features))
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init (the LS init overwrites W and b)
        bound = 1 / math.sqrt(in_features)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # W.detach(): frozen even when a caller flips requires_grad on every stitching-layer parameter
        # (train.py's `fulltune: false` does), so W is never updated, whatever the flag says
        low_rank = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return nn.functional.linear(x, self.weight.detach(), self.bias) + self.scaling * low_rank

    @torch.no_grad()
    def merged_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W + scaling · B A, b), computed in float64, in W's dtype."""
        w = self.weight.double() + self.scaling * (self.lora_B.double() @ self.lora_A.double())
        return w.to(self.weight.dtype), self.bias.detach().clone()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, " \
               f"scaling={self.scaling:g}"


class _PerPixelMap(nn.Module):
    """A stitching layer whose `transform` maps channels-last rows: NCHW front features are mapped per pixel
    (channels last, the map, then the layout change), i.e. a 1x1 conv."""
    in_layout: str
    out_layout: str
    transform: nn.Module

    @property
    def rows_layout(self) -> str:
        """The layout the map runs in: the input's, NHWC for NCHW inputs."""
        return NHWC if self.in_layout == NCHW else self.in_layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = convert_layout(x, self.in_layout, self.rows_layout)
        return convert_layout(self.transform(x), self.rows_layout, self.out_layout)


@register_stitch_layer("lora")
class LoRAStitchingLayer(_PerPixelMap):
    """SN-Netv2's low-rank stitching layer: the least-squares linear map W, b (W frozen) plus a trainable rank-r
    update, ``y = x Wᵀ + b + (alpha / rank) · (x Aᵀ) Bᵀ``; b, A and B train. Checkpoint keys are SN-Netv2's
    ``...<layer>.transform.{weight, bias, lora_A, lora_B}``.

    NCHW front features are mapped per pixel (channels last, the linear map, then the layout change): a 1x1 conv, with
    W kept as SN-Netv2's [out, in] matrix. `merged()` is the equivalent plain ``linear`` layer (export uses it).
    """

    def __init__(self, in_channels: int, out_channels: int, in_layout: str = TOKENS, out_layout: str = TOKENS,
                 rank: int = 64, alpha: float = 1.0):
        super().__init__()
        if in_layout not in LAYOUTS or out_layout not in LAYOUTS:
            raise ValueError(f"unknown feature layout {in_layout!r} -> {out_layout!r}; use one of {LAYOUTS}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank {rank!r} must be a positive integer (SN-Netv2's default: 64)")
        if rank > min(in_channels, out_channels):  # B·A of a larger rank is no low-rank update, only more parameters
            raise ValueError(f"rank {rank} is above the smaller width of {in_channels} -> {out_channels}; use a rank "
                             f"in 1..{min(in_channels, out_channels)}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha {alpha!r} must be a positive number (SN-Netv2's default: 1; scale = alpha / rank)")
        self.in_layout, self.out_layout = in_layout, out_layout
        self.rank, self.alpha = rank, float(alpha)
        self.transform = LoRALinear(in_channels, out_channels, rank, self.alpha)

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set W and b from a (out, in) matrix and an (out,) vector (the least-squares init); A and B are kept."""
        w = self.transform.weight
        w.copy_(weight.reshape(w.shape).to(w.dtype))
        self.transform.bias.copy_(bias.to(w.dtype))

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W + (alpha / rank) · B A, b) in float64: the map this layer computes (= W, b while B is zero)."""
        t = self.transform
        w = t.weight.double() + t.scaling * (t.lora_B.double() @ t.lora_A.double())
        return w, t.bias.detach().double().clone()

    def merged(self) -> StitchingLayer:
        """The equivalent plain ``linear`` StitchingLayer, weight W + (alpha / rank) · B A (a copy; self unchanged)."""
        t = self.transform
        layer = StitchingLayer(t.in_features, t.out_features, self.in_layout, self.out_layout)
        layer.to(device=t.weight.device, dtype=t.weight.dtype).train(self.training)
        layer.set_affine(*t.merged_affine())
        return layer

    def spec(self) -> dict[str, Any]:
        t = self.transform
        return {"type": self.layer_type, "in_channels": t.in_features, "out_channels": t.out_features,
                "in_layout": self.in_layout, "out_layout": self.out_layout, "rank": self.rank, "alpha": self.alpha}

    def extra_repr(self) -> str:
        return f"{self.in_layout} -> {self.out_layout}"


@register_stitch_layer("lowrank")
class LowRankStitchingLayer(_PerPixelMap):
    """A rank-r linear map ``y = U (V x) + b`` (V: rank x in, U: out x rank), everything trainable: r·(in + out) + out
    parameters instead of in·out + out, and fewer FLOPs when r < in·out / (in + out). Keys
    ``...<layer>.transform.{0.weight (V), 1.weight (U), 1.bias (b)}``.

    `set_affine` (the least-squares init) keeps the best rank-r approximation of the given W in Frobenius norm: the
    truncated SVD W ≈ P_r S_r Q_rᵀ, split as U = P_r √S_r and V = √S_r Q_rᵀ. That is the rank-r map nearest to the
    least-squares map, not the rank-constrained least-squares optimum (which would also weigh by the features'
    covariance). NCHW front features are mapped per pixel (a 1x1 conv), as in ``lora``. Unlike ``lora`` there is no
    `merged()`: the deployed layer is the factorised one, and FLOPs are counted for it.
    """

    def __init__(self, in_channels: int, out_channels: int, in_layout: str = TOKENS, out_layout: str = TOKENS,
                 rank: int = 8):
        super().__init__()
        if in_layout not in LAYOUTS or out_layout not in LAYOUTS:
            raise ValueError(f"unknown feature layout {in_layout!r} -> {out_layout!r}; use one of {LAYOUTS}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_channels, out_channels):
            raise ValueError(f"rank {rank!r} must be an integer in 1..{min(in_channels, out_channels)} (the smaller "
                             f"width of {in_channels} -> {out_channels}); a full-rank map is the 'linear' type")
        self.in_layout, self.out_layout, self.rank = in_layout, out_layout, rank
        self.transform = nn.Sequential(nn.Linear(in_channels, rank, bias=False), nn.Linear(rank, out_channels))

    @torch.no_grad()
    def set_affine(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """The best rank-r approximation of the (out, in) matrix `weight` (truncated SVD, in float64), and `bias`."""
        down, up = self.transform
        P, S, Qh = torch.linalg.svd(weight.reshape(up.out_features, down.in_features).double().cpu(),
                                    full_matrices=False)
        root = S[:self.rank].sqrt()
        up.weight.copy_((P[:, :self.rank] * root).to(up.weight))
        down.weight.copy_((root[:, None] * Qh[:self.rank]).to(down.weight))
        up.bias.copy_(bias.to(up.bias))

    @torch.no_grad()
    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U V, b) in float64: the rank-r map this layer computes (not the full-rank map it was set from)."""
        down, up = self.transform
        return up.weight.double() @ down.weight.double(), up.bias.detach().double().clone()

    def spec(self) -> dict[str, Any]:
        down, up = self.transform
        return {"type": self.layer_type, "in_channels": down.in_features, "out_channels": up.out_features,
                "in_layout": self.in_layout, "out_layout": self.out_layout, "rank": self.rank}

    def extra_repr(self) -> str:
        return f"{self.in_layout} -> {self.out_layout}, rank={self.rank}"
