"""`snnet serve`: one trained SN-Net behind an HTTP endpoint that picks the stitch per request.

    policy.py     the served stitches, their ranking (select's rule) and batch latencies: `StitchMenu`
    scheduler.py  deadline-ordered batching with late binding (the stitch chosen at dispatch): `DeadlineScheduler`
    handler.py    the engine-free request path (body -> checked request -> scheduler -> JSON): `ServeCore`
    local.py      the one-machine engine (aiohttp in one process; `snnet serve`'s default)
    app.py        the Ray Serve deployment around `ServeCore` (`--engine ray`: replicas, clusters)

The layer sits beside deploy/ (it may import core, results, train and deploy; only the CLI imports it).
docs/serving.md has the commands, the request format and the measured numbers. `check_port` is here, free of torch:
the command refuses a port in use before it imports anything heavy.
"""
from __future__ import annotations

import socket

from snnet.utils.errors import UsageError


def check_port(host: str, port: int) -> None:
    """Refuse a port another program holds before anything loads (Ray's proxy would retry it in a loop)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); pass a free --port or another "
                             f"--host") from None
