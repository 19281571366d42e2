"""State-dict keys: SN-Net's LeViT checkpoints (facebookresearch LeViT names; docs/snnet_compat.md, C29) <->
ours (timm 1.0).

SN-Net's LeViT keeps one flat ``blocks`` list: for each stage s, ``depth[s]`` pairs (attention residual, MLP
residual), then, between stages, an attention-subsample and an MLP residual. For depths 4-4-4 that is stage 0 at
0..7, subsample 8, MLP 9, stage 1 at 10..17, subsample 18, MLP 19, stage 2 at 20..27. timm nests the same modules:

===========================================  =================================================================
SN-Net (``anchors.{a}.`` + ...)              ours (``anchors.{a}.`` + ...)
===========================================  =================================================================
``patch_embed.{0,2,4,6}.c.weight``           ``stem.conv{1,2,3,4}.linear.weight``
``patch_embed.{0,2,4,6}.bn.*``               ``stem.conv{1,2,3,4}.bn.*``
``blocks.{i}.m.qkv.{c,bn}`` (pair b, attn)   ``stages.{s}.blocks.{b}.attn.qkv.{linear,bn}``
``blocks.{i}.m.proj.1.{c,bn}``               ``stages.{s}.blocks.{b}.attn.proj.ln.{linear,bn}``
``blocks.{i}.m.attention_biases``            ``stages.{s}.blocks.{b}.attn.attention_biases``
``blocks.{i+1}.m.{0,2}.{c,bn}`` (pair b)     ``stages.{s}.blocks.{b}.mlp.{ln1,ln2}.{linear,bn}``
``blocks.{8,18}.{kv,q.1,proj.1}.{c,bn}``     ``stages.{s+1}.downsample.attn_downsample.{kv,q.ln,proj.ln}.{linear,bn}``
``blocks.{8,18}.attention_biases``           ``stages.{s+1}.downsample.attn_downsample.attention_biases``
``blocks.{9,19}.m.{0,2}.{c,bn}``             ``stages.{s+1}.downsample.mlp.{ln1,ln2}.{linear,bn}``
``head.{bn,l}``, ``head_dist.{bn,l}``        ``head.{bn,linear}``, ``head_dist.{bn,linear}``
``...attention_bias_idxs``                   dropped: a non-persistent buffer in timm, rebuilt from the resolution
``stitch_layers.{stage}.0.{layer}.*``        same
===========================================  =================================================================

The attention-bias tables have the same shape and order in both (offset (dy, dx) -> dy * resolution + dx), so no
tensor changes. Indices depend on the depths, which each anchor's keys encode (`release_depths`: the subsample
blocks are the ones without ``.m.``), so anchors of different LeViT variants convert alike.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import torch

DERIVED_BUFFERS = ("attention_bias_idxs",)
#: SN-Net's LeViT numbers its residual blocks flat (``blocks.<i>.m.``); timm nests them in stages
RELEASE_KEY = re.compile(r"(^|\.)blocks\.\d+\.m\.")

_ATTN = {"qkv.c.": "qkv.linear.", "qkv.bn.": "qkv.bn.", "proj.1.c.": "proj.ln.linear.", "proj.1.bn.": "proj.ln.bn.",
         "attention_biases": "attention_biases"}
_SUBSAMPLE = {"kv.c.": "kv.linear.", "kv.bn.": "kv.bn.", "q.1.c.": "q.ln.linear.", "q.1.bn.": "q.ln.bn.",
              "proj.1.c.": "proj.ln.linear.", "proj.1.bn.": "proj.ln.bn.", "attention_biases": "attention_biases"}
_MLP = {"0.c.": "ln1.linear.", "0.bn.": "ln1.bn.", "2.c.": "ln2.linear.", "2.bn.": "ln2.bn."}
_HEAD = {"bn.": "bn.", "l.": "linear."}


def flat_layout(depths: Sequence[int]) -> list[tuple[str, str, dict[str, str]]]:
    """Per flat SN-Net block index: (SN-Net prefix, our prefix, inner-name map)."""
    out = []
    for s, depth in enumerate(depths):
        if s > 0:  # the transition into stage s: subsample, then an MLP residual
            down = f"stages.{s}.downsample."
            out.append((f"blocks.{len(out)}.", down + "attn_downsample.", _SUBSAMPLE))
            out.append((f"blocks.{len(out)}.m.", down + "mlp.", _MLP))
        for b in range(depth):
            out.append((f"blocks.{len(out)}.m.", f"stages.{s}.blocks.{b}.attn.", _ATTN))
            out.append((f"blocks.{len(out)}.m.", f"stages.{s}.blocks.{b}.mlp.", _MLP))
    return out


def _table(depths: Sequence[int]) -> list[tuple[str, str]]:
    """(SN-Net name prefix, our name prefix) for every parameter of one anchor."""
    pairs = []
    for i in range(4):  # Stem16: conv-BN at 0, 2, 4, 6 with activations between
        pairs += [(f"patch_embed.{2 * i}.c.", f"stem.conv{i + 1}.linear."),
                  (f"patch_embed.{2 * i}.bn.", f"stem.conv{i + 1}.bn.")]
    pairs += [(f"{h}.{a}", f"{h}.{b}") for h in ("head", "head_dist") for a, b in _HEAD.items()]
    for theirs, ours, inner in flat_layout(depths):
        pairs += [(theirs + a, ours + b) for a, b in inner.items()]
    return pairs


_ANCHOR = re.compile(r"^(anchors\.\d+\.)(.*)$")
_FLAT = re.compile(r"^blocks\.(\d+)\.(m\.)?")


def release_depths(names: Iterable[str]) -> tuple[int, ...]:
    """The stage depths one LeViT's flat SN-Net keys (its ``anchors.{a}.`` prefix removed) encode: stage s is
    2 x depth[s] residual blocks, and a subsample block (keys without ``.m.``) and an MLP residual lie between two
    stages. ValueError when the keys follow no such layout."""
    blocks, subsample = set(), set()
    for name in names:
        m = _FLAT.match(name)
        if m:
            blocks.add(int(m[1]))
            if m[2] is None:
                subsample.add(int(m[1]))
    if not blocks:
        raise ValueError("no flat LeViT blocks (blocks.<i>.m.) among its keys")
    edges = [0, *[i for s in sorted(subsample) for i in (s, s + 2)], max(blocks) + 1]
    spans = [b - a for a, b in zip(edges[::2], edges[1::2])]
    if blocks != set(range(max(blocks) + 1)) or any(n <= 0 or n % 2 for n in spans):
        raise ValueError(f"its flat blocks 0..{max(blocks)} (subsample blocks {sorted(subsample)}) follow no LeViT "
                         f"layout of stages")
    return tuple(n // 2 for n in spans)


def _convert(state_dict: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in DERIVED_BUFFERS:
            continue
        if key.startswith("stitch_layers."):
            out[key] = value
            continue
        m = _ANCHOR.match(key)
        prefix, name = m.groups() if m else ("", key)
        src = next((p for p in pairs if name.startswith(p[0])), None)
        if src is None:
            raise KeyError(f"{key!r} is not a LeViT key of the expected layout; check the depths argument")
        out[prefix + src[1] + name[len(src[0]):]] = value
    return out


def snnet_to_ours(state_dict: dict[str, torch.Tensor], depths: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """An SN-Net LeViT state dict (``anchors.{a}.`` prefixed or a bare LeViT) with timm 1.0 keys; each anchor's
    depths read from its keys (`release_depths`). `depths`: what they must be; ValueError naming the anchor and its
    depths when they are not."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _ANCHOR.match(key)
        groups.setdefault("" if key.startswith("stitch_layers.") else m[1] if m else "", {})[key] = value
    out = {}
    for prefix, part in groups.items():
        names = [k[len(prefix):] for k in part]
        if prefix == "" and not any(_FLAT.match(n) for n in names):  # the stitching layers, nothing of an anchor
            out.update(_convert(part, []))
            continue
        try:
            found = release_depths(names)
        except ValueError as e:
            raise ValueError(f"{prefix or 'the network'} {e}") from None
        if depths is not None and tuple(depths) != found:
            raise ValueError(f"{prefix or 'the network'} holds a LeViT of stage depths {'-'.join(map(str, found))}, "
                             f"not {'-'.join(map(str, depths))}")
        out.update(_convert(part, _table(found)))
    return out


def ours_to_snnet(state_dict: dict[str, torch.Tensor], depths: Sequence[int] = (4, 4, 4)) -> dict[str, torch.Tensor]:
    """The inverse map (without the derived ``attention_bias_idxs`` buffers; SN-Net's loader needs them back)."""
    return _convert(state_dict, [(b, a) for a, b in _table(depths)])
