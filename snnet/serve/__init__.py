"""`snnet serve`: one trained SN-Net behind an HTTP endpoint that picks the stitch per request.

    policy.py     the served stitches, their ranking (select's rule) and batch latencies: `StitchMenu`
    scheduler.py  deadline-ordered batching with late binding (the stitch chosen at dispatch): `DeadlineScheduler`
    handler.py    the engine-free request path (body -> checked request -> scheduler -> JSON): `ServeCore`
    local.py      the one-machine engine (aiohttp in one process; `snnet serve`'s default)
    app.py        the Ray Serve deployment around `ServeCore` (`--engine ray`: replicas, clusters)

The layer sits beside deploy/ (it may import core, results, train and deploy; only the CLI imports it).
docs/serving.md has the commands, the request format and the measured numbers. The checks of what a server is
given are here, free of torch (`check_port`, `exported_stitches`): the command refuses a port in use, or export
folders that do not fit the results, before it imports anything heavy.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from snnet.results.records import check_checkpoint_sha
from snnet.utils.errors import SNNetError, UsageError
from snnet.utils.fileio import export_spec


def check_port(host: str, port: int) -> None:
    """Refuse a port another program holds before anything loads (Ray's proxy would retry it in a loop)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); pass a free --port or another "
                             f"--host") from None


def exported_stitches(folders: Sequence[str | os.PathLike], records: list[dict[str, Any]], source: str
                      ) -> list[dict[str, Any]]:
    """The specs (model.json) of the export folders to serve, in order, checked against the results file's
    `records`: each stitch once, and each measured there (its cfg_id, its route, the checkpoint it was exported
    from)."""
    specs: list[dict[str, Any]] = []
    seen: dict[int, str] = {}
    by_id = {r["cfg_id"]: r for r in records}
    for folder in folders:
        spec = export_spec(folder)
        cfg_id = spec["cfg_id"]
        check_checkpoint_sha([r for r in records if r.get("cfg_id") == cfg_id], spec.get("source", {}).get(
            "checkpoint_sha256"), f"the checkpoint export folder {str(folder)!r} was exported from", source)
        if cfg_id not in by_id or by_id[cfg_id].get("route", spec["route"]) != spec["route"]:
            raise SNNetError(f"export of cfg_id {cfg_id} ({spec['route']!r}) is not in {source}; pass the results of "
                             f"the SN-Net it was exported from")
        if cfg_id in seen:
            raise UsageError(f"--exported {seen[cfg_id]!r} and {str(folder)!r} both hold cfg_id {cfg_id}; give each "
                             f"stitch once")
        seen[cfg_id] = str(folder)
        specs.append(spec)
    return specs
