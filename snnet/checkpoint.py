"""Pickle-free checkpoints: tensors and plain types only, written atomically, read with weights_only=True.

Layout follows timm's CheckpointSaver (``state_dict``, ``optimizer``, ``amp_scaler``, ``epoch``, ``metric``,
``version``) plus ``global_step`` and the run's arguments and stitch config as JSON text (SN-Net pickled an argparse
Namespace or a yacs CfgNode there, spec 6.3 item 22).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .fileio import atomic_path

VERSION = 3
LAST, BEST = "last.pth.tar", "model_best.pth.tar"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the fix."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    state = {**state, "version": VERSION}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give the path of a .pth.tar this tool wrote")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (an interrupted copy?); use another checkpoint")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        code = foreign_globals(path)
        if code:  # a pickle that references code: never unpickled
            raise CheckpointError(f"checkpoint {str(path)!r} holds pickled Python objects, which could run code "
                                  f"({', '.join(code[:3])}); it was refused unread. If it is an SN-Net release you "
                                  f"trust, convert it: snnet convert {path} OUT.pth.tar --trust") from None
        lines = [l for l in str(e).splitlines() if l.strip() and "documentation" not in l]
        reason = lines[-1].strip()[:160] if lines else type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be read ({reason}); it is corrupt or not a "
                              f"checkpoint: give a .pth.tar written by train.py") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a checkpoint dict")
    if "state_dict" not in state and all(isinstance(v, torch.Tensor) for v in state.values()):
        state = {"state_dict": state}  # a bare state dict
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            sd = state[key]
            state["state_dict"] = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
            break
    else:
        raise CheckpointError(f"checkpoint {str(path)!r} has no 'state_dict'; it is not a model checkpoint")
    return state


_SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.slice")


def foreign_globals(path: str | os.PathLike) -> list[str]:
    """Names of classes/functions a pickle references beyond what torch's weights-only loader allows, read with
    pickletools (which parses opcodes and executes nothing); [] for files that are not pickles at all."""
    import pickletools
    import zipfile
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = Path(path).read_bytes()
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle (garbage, JSON, safetensors, truncated)
        return []
    return [n for n in dict.fromkeys(names) if not n.startswith(_SAFE_GLOBAL_PREFIXES)]


def json_field(state: dict[str, Any], key: str) -> Any:
    raw = state.get(key)
    return json.loads(raw) if isinstance(raw, str) else raw


class CheckpointKeeper:
    """Writes ``last.pth.tar`` every epoch and ``model_best.pth.tar`` whenever the metric improves."""

    def __init__(self, out_dir: str | os.PathLike, higher_is_better: bool = True):
        self.out_dir = Path(out_dir)
        self.higher = higher_is_better
        self.best: float | None = None

    def save(self, state: dict[str, Any], metric: float | None) -> bool:
        improved = metric is not None and (self.best is None or (metric > self.best if self.higher
                                                                  else metric < self.best))
        if improved:
            self.best = metric
        last = self.out_dir / LAST
        save_checkpoint(last, {**state, "metric": metric, "best_metric": self.best})
        if improved:
            with atomic_path(self.out_dir / BEST) as tmp:
                shutil.copyfile(last, tmp)
        return improved
