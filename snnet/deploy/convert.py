"""Convert a released SN-Net checkpoint (a pickled ``.pth``) into this project's pickle-free checkpoint.

SN-Net's files pickle an ``argparse.Namespace`` (DeiT, LeViT, CNN) or a yacs ``CfgNode`` (Swin) next to the weights
(docs/snnet_compat.md, C26), so ``train.py --resume`` refuses them. This command is the explicit way in: the user names
the file and passes ``--trust``. Even then nothing in the file runs: it is read by torch's weights-only unpickler with
exactly those two classes allowed (the CfgNode as a plain-dict stand-in), and any other object in it is refused.
The keys are mapped to timm 1.0's names where the family needs it (Swin, LeViT); the result loads strictly. A file
of one plain network (no ``anchors.<i>.`` keys: a timm or train.py --model checkpoint) is written pickle-free too,
and the summary says what it is: an anchor's weights, not an SN-Net.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from snnet.results.records import file_sha256
from snnet.stitching.adapter import AnchorAdapter, registered_adapters
from snnet.utils.checkpoint import CheckpointError, foreign_globals, save_checkpoint, strip_ddp_prefix
from snnet.utils.fileio import CONVERTED_FROM, release_paths


class _CfgNode:
    """Stand-in for yacs.config.CfgNode: unpickles as a plain OrderedDict (its items; yacs' attributes land in the
    OrderedDict's __dict__). torch's weights-only unpickler fills only exact dict/OrderedDict objects."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


_ALLOWED = [argparse.Namespace, (_CfgNode, "yacs.config.CfgNode")]


def load_release(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"SN-Net checkpoint {str(path)!r} does not exist; give the downloaded .pth file")
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        allowed = ("argparse.Namespace", "yacs.config.CfgNode")
        code = [name for name in foreign_globals(path) if name not in allowed]
        if code:  # the weights-only unpickler refused what the file references: named, never run
            raise CheckpointError(f"{str(path)!r} is not an SN-Net release checkpoint: it holds pickled objects other "
                                  f"than tensors, an argparse Namespace or a yacs CfgNode ({', '.join(code[:3])}); "
                                  f"refused unread") from None
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        reason = lines[0].split(". ")[0][:160] if lines else type(e).__name__
        raise CheckpointError(f"SN-Net checkpoint {str(path)!r} cannot be read ({reason}); it is corrupt or cut "
                              f"short (an interrupted download?): download it again") from None
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"state_dict": state}  # a bare state dict (torch.save(model.state_dict()))
    if not isinstance(state, dict) or not isinstance(state.get("model", state.get("state_dict")), dict):
        raise CheckpointError(f"{str(path)!r} has no 'model' or 'state_dict' entry; it is not an SN-Net checkpoint")
    return state


def check_weights(src: str | os.PathLike, weights: dict) -> None:
    """Refuse weights no network loads: none at all, or an entry that is not a tensor (a nested dict, a string)."""
    if not weights:
        raise CheckpointError(f"{str(src)!r} holds an empty state dict: no weights to convert; give the .pth SN-Net "
                              f"published")
    key, value = next(((k, v) for k, v in weights.items() if not isinstance(v, torch.Tensor)), (None, None))
    if key is not None:
        raise CheckpointError(f"{str(src)!r}: weight {str(key)!r} is a {type(value).__name__}, not a tensor, so it "
                              f"is no network's state dict; give the .pth SN-Net published")


def release_adapter(keys) -> type[AnchorAdapter] | None:
    """The registered family whose old SN-Net key names `keys` use; None when they are timm 1.0's already (DeiT,
    ResNet)."""
    keys = list(keys)
    return next((cls for cls in registered_adapters() if cls.release_keys_match(keys)), None)


def family_of(keys) -> str:
    cls = release_adapter(keys)
    return cls.family if cls is not None else "plain"


def convert_state_dict(state_dict: dict[str, torch.Tensor],
                       stage_depths: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """A released SN-Net state dict with this project's keys; the family's adapter owns the key map. Keys of
    another layout than the family's (another depth than `stage_depths`, a key it does not know) are one
    CheckpointError naming them."""
    sd = strip_ddp_prefix(state_dict)
    cls = release_adapter(sd)
    if cls is None:
        return sd
    try:
        return cls.convert_release_state(sd, stage_depths)
    except (KeyError, ValueError) as e:
        reason = e.args[0] if e.args else type(e).__name__
        raise CheckpointError(f"its {cls.family} keys cannot be mapped: {reason}") from None


def is_snnet(keys) -> bool:
    """Whether state-dict keys are an SN-Net's (anchors.<i>.*, stitch_layers.*), not one plain network's."""
    return any(k.startswith(("anchors.", "stitch_layers.")) for k in strip_ddp_prefix(dict.fromkeys(keys)))


def _plain(obj: Any) -> Any:
    """Namespace / CfgNode -> JSON-able data (kept as the run's recorded arguments)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else str(obj)


def convert_release(src: str | os.PathLike, dst: str | os.PathLike,
                    stage_depths: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Read `src` (SN-Net's .pth) and write our checkpoint to `dst` atomically (never onto `src` itself). Returns a
    summary."""
    release_paths(src, dst, CheckpointError)
    state = load_release(src)
    weights = state.get("model", state.get("state_dict"))
    if not isinstance(weights, dict):
        raise CheckpointError(f"{str(src)!r} holds no 'model' or 'state_dict' weights: not an SN-Net release; give "
                              f"the .pth SN-Net published")
    check_weights(src, weights)
    try:
        converted = convert_state_dict(weights, stage_depths)
    except CheckpointError as e:
        fix = ("leave out --levit-depths: each anchor's depths are read from its keys" if stage_depths else
               "it is no SN-Net release this version reads; check the file")
        raise CheckpointError(f"{str(src)!r}: {e}; {fix}") from None
    meta = state.get("args", state.get("config"))
    out = {"state_dict": converted, "epoch": int(state["epoch"]) if isinstance(state.get("epoch"), int) else -1,
           CONVERTED_FROM: json.dumps({"file": str(src), "sha256": file_sha256(src),
                                       "family": family_of(converted), "snnet_args": _plain(meta)}, default=str)}
    save_checkpoint(dst, out)
    return {"tensors": len(converted), "family": family_of(weights), "dst": str(dst), "snnet": is_snnet(converted),
            "example": next(iter(converted), "")}
