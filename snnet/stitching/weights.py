"""Whether timm's pretrained weights of an anchor can be had here, decided in seconds and without a download.

A pretrained anchor whose weights are neither in a local cache nor reachable would otherwise make every rank spend a
minute in huggingface_hub's retries before failing. `check_pretrained` is what the preflight (train.py,
distributed_train.sh's launcher, --dry-run) asks first: the weights' file in the Hugging Face hub cache, or the old
torch hub cache for a URL; if absent, HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set means no download, and otherwise
one TCP connection to the host, given CONNECT_SECONDS, says whether a download could start.
"""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from snnet.stitching.adapter import AnchorError

CONNECT_SECONDS = 3.0
#: the files timm reads from an anchor's hub repository (a safetensors file first)
HF_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


class WeightsUnavailable(AnchorError):
    """Pretrained weights neither cached on this machine nor reachable; the message names the fixes."""


def _source(name: str) -> tuple[str, str, str]:
    """(kind 'hf' or 'url', repository id or URL, file name override) of timm's pretrained weights of `name`, or
    kind '' when timm loads them otherwise (a local file in the pretrained config)."""
    import timm
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return "", "", ""
    c = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if c.get("file") or c.get("state_dict"):
        return "", "", ""
    if c.get("hf_hub_id"):
        return "hf", str(c["hf_hub_id"]), str(c.get("hf_hub_filename") or "")
    if c.get("url"):
        return "url", str(c["url"]), ""
    return "", "", ""


def _hf_cached(repo: str, filename: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache
    repo_id, _, revision = repo.partition("@")
    for f in ([filename] if filename else HF_FILES):
        found = try_to_load_from_cache(repo_id, f, revision=revision or None)
        if isinstance(found, str) and os.path.exists(found):
            return found
    return None


def _url_cached(url: str) -> str | None:
    import torch
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    return path if os.path.exists(path) else None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


_REACHED: dict[tuple[str, int], bool] = {}  # one answer per host and port for the process (several anchors)


def reachable(url: str, timeout: float = CONNECT_SECONDS) -> bool:
    """Whether one TCP connection to the URL's host and port opens within `timeout` seconds, name lookup included
    (no request sent). The lookup cannot be given a timeout of its own (a machine without a network can block in
    it for many seconds), so the attempt runs in a thread that is waited for `timeout` seconds at most."""
    parts = urlparse(url)
    key = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    if key not in _REACHED:
        answer = [False]

        def attempt() -> None:
            try:
                with socket.create_connection(key, timeout=timeout):
                    answer[0] = True
            except OSError:
                pass

        worker = threading.Thread(target=attempt, daemon=True)
        worker.start()
        worker.join(timeout)
        _REACHED[key] = answer[0]
    return _REACHED[key]


def cache_dir() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE
    return str(HF_HUB_CACHE)


#: the refusal's first fix where a stitch config names the model (train.py, the tools)
LOCAL_WEIGHTS = "give it local weights (the anchor's \"checkpoint\" in the stitch config, e.g. a train.py last.pth.tar)"


def check_pretrained(name: str, where: str = "anchor", local: str = LOCAL_WEIGHTS) -> str:
    """Refuse, in one line, timm's pretrained weights of `name` when they are neither cached here nor reachable
    (nothing is downloaded); `where` names the model in the message (e.g. "anchor 0"), `local` the way this command
    takes local weights instead. A model timm loads from a local file, or whose weights are cached or reachable,
    passes: returns "", "cached" or "reachable"."""
    kind, loc, filename = _source(name)
    if not kind:
        return ""
    if kind == "hf":
        if _hf_cached(loc, filename):
            return "cached"
        from huggingface_hub.constants import ENDPOINT
        host, looked = ENDPOINT, f"the Hugging Face cache {cache_dir()} (repository {loc})"
    else:
        if _url_cached(loc):
            return "cached"
        import torch
        host, looked = loc, f"torch's hub cache {os.path.join(torch.hub.get_dir(), 'checkpoints')}"
    if _offline():
        why = "HF_HUB_OFFLINE is set"
    elif reachable(host):
        return "reachable"
    else:
        why = f"{urlparse(host).hostname}: no connection in {CONNECT_SECONDS:g} s"
    fetch = f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\""
    raise WeightsUnavailable(
        f"{where} {name!r} needs timm's pretrained weights, which are not in {looked} and cannot be downloaded "
        f"({why}); {local}, or fetch them on a connected machine with `{fetch}` and copy its cache here, or pass "
        f"--no-pretrained to train from random weights")
