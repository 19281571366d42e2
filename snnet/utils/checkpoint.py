"""Pickle-free checkpoints: tensors and plain types only, written atomically, read with weights_only=True.

Layout follows timm's CheckpointSaver (``state_dict``, ``optimizer``, ``amp_scaler``, ``epoch``, ``metric``,
``version``) plus ``global_step`` and the run's arguments and stitch config as JSON text (SN-Net pickled an argparse
Namespace or a yacs CfgNode there: docs/snnet_compat.md, C26).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import zipfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from snnet.utils.errors import SNNetError
from snnet.utils.fileio import atomic_path, checkpoint_path, pickle_ops

VERSION = 3
LAST, BEST, RECOVERY = "last.pth.tar", "model_best.pth.tar", "recovery.pth.tar"


class CheckpointError(SNNetError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


class StateDictMismatch(ValueError):
    """A state dict that does not fit a network; the message lists what differs."""


def fit_report(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """'' when `state` has exactly `own`'s keys and shapes, else a one-line summary of what differs."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    parts = [f"{len(keys)} {what} e.g. {keys[:2]}" for what, keys in
             (("missing keys", missing), ("unexpected", unexpected), ("of another shape", wrong)) if keys]
    return ", ".join(parts)


def classifier_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of a timm model's classifier (`get_classifier()`, a distilled model's heads too): what a
    fit check leaves out where the data decides the number of classes."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    heads = {id(h) for h in (heads if isinstance(heads, (tuple, list)) else (heads,))}
    return {f"{n}.{k}" if n else k for n, m in model.named_modules() if id(m) in heads for k in m.state_dict()}


def image_size_hint(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """'' or why a ViT's position embedding does not fit: another width (embed_dim), else the image size the
    checkpoint was trained at and the one the network was built for. A pos_embed of another length is what a wrong
    image-size guess gives, and the bare shapes do not name the size to use."""
    own = module.state_dict()
    for key, value in state.items():
        if not key.endswith("pos_embed") or key not in own or own[key].shape == value.shape or value.ndim != 3:
            continue
        owner = module.get_submodule(key.rpartition(".")[0]) if "." in key else module
        patch = getattr(getattr(owner, "patch_embed", None), "patch_size", None)
        if patch is None:
            continue
        if value.shape[-1] != own[key].shape[-1]:  # another width, whatever the image size: the width is the cause
            return (f"the checkpoint's width (embed_dim) is {value.shape[-1]}, the network's {own[key].shape[-1]}: "
                    f"use embed_dim={value.shape[-1]} in the anchor's model_kwargs (or the checkpoint of this width)")
        prefix = 0 if getattr(owner, "no_embed_class", False) else int(getattr(owner, "num_prefix_tokens", 0))
        saved, built = value.shape[1] - prefix, own[key].shape[1] - prefix
        grid, built_grid = math.isqrt(saved), math.isqrt(built)
        if grid * grid == saved and built_grid * built_grid == built:
            return (f"the checkpoint was trained at image size {grid * patch[0]}, the network built for "
                    f"{built_grid * patch[0]}: use img_size={grid * patch[0]} (train.py/snnet --img-size "
                    f"{grid * patch[0]}, or \"input_size\": {grid * patch[0]} in the stitch config)")
    return ""


def check_fitting(module: nn.Module, state: dict[str, torch.Tensor], skip: Collection[str] = ()) -> None:
    """Raise `StateDictMismatch` saying what differs when `state` does not fit `module` (a meta-device module too:
    shapes only); a position embedding of another image size or width is named as such. `skip`: keys compared in
    neither (a classifier whose size the data decides later)."""
    own = {k: v for k, v in module.state_dict().items() if k not in skip}
    report = fit_report(own, {k: v for k, v in state.items() if k not in skip})
    if report:
        hint = image_size_hint(module, state)
        raise StateDictMismatch(f"{hint}; {report}" if hint else report)


def load_fitting(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `state` strictly, or raise `StateDictMismatch` (`check_fitting`) before anything is copied."""
    check_fitting(module, state)
    module.load_state_dict(state, strict=True)


def strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without DistributedDataParallel's ``module.`` prefix (checkpoints saved from the wrapper have it)."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in a (nested) checkpoint: what a full disk is told the file needs (about)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    state = {**state, "version": VERSION}
    with atomic_path(path, need=tensor_bytes(state)) as tmp:
        torch.save(state, tmp)


def _lazy_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's keys, shapes and dtypes from its header, as meta tensors: no weight is read."""
    from safetensors import safe_open
    out = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            part = f.get_slice(key)
            dtype = getattr(torch, _SAFETENSORS_DTYPES.get(part.get_dtype(), "float32"))
            out[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
    return out


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read(path: Path, what: str, lazy: bool = False) -> Any:
    """The object in a safetensors file or a torch file read with weights_only=True (a pickle that references code
    is refused unread, naming what it references). `lazy`: keys and shapes without reading the weights (a torch file
    memory-mapped, a safetensors file's header as meta tensors): what the preflight compares with a network."""
    checkpoint_path(path, what, CheckpointError)
    try:
        if path.suffix == ".safetensors":
            return _lazy_safetensors(path) if lazy else load_file(str(path))
        if lazy and zipfile.is_zipfile(path):  # torch's zip format maps; a legacy file is read whole
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        code = foreign_globals(path)
        if code:  # a pickle that references code: never unpickled
            raise CheckpointError(f"{what} {str(path)!r} holds pickled Python objects, which could run code "
                                  f"({', '.join(code[:3])}); it was refused unread. If it is an SN-Net release you "
                                  f"trust, convert it: snnet convert {path} OUT.pth.tar --trust") from None
        lines = [l for l in str(e).splitlines() if l.strip() and "documentation" not in l]
        reason = lines[-1].strip()[:160] if lines else type(e).__name__
        raise CheckpointError(f"{what} {str(path)!r} cannot be read ({reason}); it is corrupt or not a checkpoint: "
                              f"give a safetensors file or a .pth(.tar) of tensors") from None


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint", lazy: bool = False) -> dict[str, Any]:
    """A checkpoint as a dict whose ``state_dict`` holds the weights (``module.`` prefixes of DDP removed).

    Accepts this project's checkpoints, timm's (``state_dict``), DeiT/SN-Net-style ``model`` entries, and bare
    state dicts (safetensors or torch). `lazy` (the preflight's fit checks): the weights memory-mapped or, for
    safetensors, meta tensors of their shapes: keys, shapes and the recorded fields, no weight read."""
    path = Path(path)
    state = _read(path, what, lazy)
    if not isinstance(state, dict):
        raise CheckpointError(f"{what} {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict")
    if "state_dict" not in state and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"state_dict": state}  # a bare state dict
    for key in ("state_dict", "model", "state_dict_ema"):
        sd = state.get(key)
        if isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values()):
            state["state_dict"] = strip_ddp_prefix(sd)
            return state
    raise CheckpointError(f"{what} {str(path)!r} has no 'state_dict' of tensors; it is not a model checkpoint")


def load_weights(module: nn.Module, path: str | os.PathLike, what: str, fix: str, check_only: bool = False,
                 skip: Collection[str] = ()) -> None:
    """Load the weights of checkpoint `path` into `module` strictly; a mismatch is one CheckpointError that says
    what differs and `fix`. `check_only` (the preflight, on a meta-device module): the fit alone, `skip` aside."""
    try:
        state = load_checkpoint(path, what, lazy=check_only)["state_dict"]
        if check_only:
            check_fitting(module, state, skip)
        else:
            load_fitting(module, state)
    except StateDictMismatch as e:
        raise CheckpointError(f"{what} {str(path)!r} does not fit ({e}); {fix}") from None


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.slice")


def foreign_globals(path: str | os.PathLike) -> list[str]:
    """Names of classes/functions a pickle references beyond what torch's weights-only loader allows, read from its
    opcodes (`pickle_ops`: nothing executed); [] for files that are not pickles at all."""
    names: list[str] = []
    strings: list[Any] = []
    for op, arg in pickle_ops(path):
        if op == "GLOBAL":
            names.append(str(arg).replace(" ", "."))
        elif op == "STACK_GLOBAL" and len(strings) >= 2:
            names.append(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return [n for n in dict.fromkeys(names) if not n.startswith(_SAFE_GLOBAL_PREFIXES)]


def json_field(state: dict[str, Any], key: str) -> Any:
    raw = state.get(key)
    return json.loads(raw) if isinstance(raw, str) else raw


def training_state(net: nn.Module, optimizer, epoch: int, global_step: int, args_json: str, config_text: str,
                   loss_scaler=None, ema: nn.Module | None = None) -> dict[str, Any]:
    """Everything a run needs to continue: weights (as the network checkpoints them), optimizer, AMP scaler, EMA
    weights, counters, and the run's arguments and identity as JSON text (no pickled objects)."""
    state = {"epoch": epoch, "global_step": global_step, "arch": "+".join(net.names),
             "state_dict": net.checkpoint_state(), "optimizer": optimizer.state_dict(), "args": args_json,
             "config": config_text}
    if loss_scaler is not None:
        state["amp_scaler"] = loss_scaler.state_dict()
    if ema is not None:  # keyed like state_dict, so either loads into the same network
        state["state_dict_ema"] = ema.checkpoint_state() if hasattr(ema, "checkpoint_state") else ema.state_dict()
    return state


class CheckpointSaver:
    """timm's CheckpointSaver semantics with atomic, pickle-free files.

    Every epoch ``last.pth.tar`` is written; when the metric improves, ``model_best.pth.tar`` is a copy of it; the
    `max_history` best epochs are kept as ``checkpoint-<epoch>.pth.tar`` (worse ones are deleted). The ranking of
    the history is recovered from the files' recorded metrics, so a resumed run keeps pruning the same way.
    """

    def __init__(self, out_dir: str | os.PathLike, higher_is_better: bool = True, max_history: int = 0):
        self.out_dir = Path(out_dir)
        self.higher = higher_is_better
        self.max_history = max_history
        self.best: float | None = None

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.higher else a < b

    def save(self, state: dict[str, Any], metric: float | None) -> bool:
        """Write the epoch's checkpoints; True when `metric` is the best so far."""
        improved = metric is not None and (self.best is None or self._better(metric, self.best))
        if improved:
            self.best = metric
        last = self.out_dir / LAST
        save_checkpoint(last, {**state, "metric": metric, "best_metric": self.best})
        if improved:
            with atomic_path(self.out_dir / BEST, need=last.stat().st_size) as tmp:
                shutil.copyfile(last, tmp)
        if self.max_history > 0 and metric is not None:
            self._update_history(last, int(state["epoch"]), metric)
        return improved

    def save_recovery(self, state: dict[str, Any]) -> None:
        """A mid-epoch checkpoint (``--recovery-interval``): `state` also holds ``batch_idx``, the batches of
        ``epoch`` already trained, and what each rank needs to continue exactly (see main.py)."""
        save_checkpoint(self.out_dir / RECOVERY, {**state, "best_metric": self.best})

    def drop_recovery(self) -> None:
        """An epoch checkpoint supersedes the recovery file."""
        (self.out_dir / RECOVERY).unlink(missing_ok=True)

    def history(self) -> list[tuple[float, Path]]:
        """(metric, file) of the kept epoch checkpoints, best first."""
        kept = []
        for f in self.out_dir.glob("checkpoint-*.pth.tar"):
            try:
                # mmap: only the small metric entry is read, not the weights
                metric = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True).get("metric")
            except Exception:  # a file this saver did not finish is not history
                continue
            if metric is not None:
                kept.append((float(metric), f))
        return sorted(kept, key=lambda t: -t[0] if self.higher else t[0])

    def _update_history(self, last: Path, epoch: int, metric: float) -> None:
        kept = self.history()
        if len(kept) >= self.max_history and not self._better(metric, kept[self.max_history - 1][0]):
            return
        with atomic_path(self.out_dir / f"checkpoint-{epoch}.pth.tar", need=last.stat().st_size) as tmp:
            shutil.copyfile(last, tmp)
        for _, f in self.history()[self.max_history:]:
            f.unlink()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict (names, dtypes, shapes and bytes, in name order): the identity of weights, whatever
    they were built from (a checkpoint file, timm's pretrained weights, a seeded random init, a least-squares fit)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
