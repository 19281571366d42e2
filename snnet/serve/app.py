"""`snnet serve` on Ray Serve: `ServeCore` (handler.py) in a Ray Serve deployment behind Ray's HTTP proxy.

Why Ray Serve (docs/serving.md has the comparison): it is maintained, installs from PyPI, and the same deployment
runs on one machine (`--address local`, the default: a private Ray instance started here) or on a Ray cluster of
several machines (`ray start --head` on one, `ray start --address HEAD:6379` on the others, then
`snnet serve ... --address auto --replicas N`: replicas are placed across the nodes and the proxy balances between
them). Each replica loads the checkpoint itself from the path given (it must exist on every node) and measures its
own latency table. Batching is ours (batcher.py, one queue per stitch) rather than `serve.batch`, which batches
one method's calls regardless of the stitch they chose and hides the queue depth the choice needs.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import ray
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from snnet.serve import check_port
from snnet.serve.handler import ServeCore, ServeSpec

#: requests a replica accepts at once: they must reach its queues (the batching and the load the choice sees)
#: rather than wait in Ray's proxy, whose default (5) would hide the load
MAX_ONGOING = 1024


@serve.deployment(max_ongoing_requests=MAX_ONGOING, ray_actor_options={"num_cpus": 0})
class SNNetDeployment:
    """One replica: builds its `ServeCore` from the spec and answers every path under its route prefix."""

    def __init__(self, spec: dict[str, Any], prefix: str = "/"):
        self.core = ServeCore.build(ServeSpec(**spec))
        self.prefix = prefix.rstrip("/")

    async def __call__(self, request: Request) -> JSONResponse:
        limit = self.core.spec.max_body_bytes
        body = b""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            body = b"\0" * (limit + 1)  # refused as over-size without reading it
        else:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:  # stop reading: the answer is 413 whatever follows
                    break
        path = request.url.path[len(self.prefix):] if request.url.path.startswith(self.prefix) else \
            request.url.path
        status, payload = await self.core.handle(request.method, path or "/", body)
        return JSONResponse(payload, status_code=status)


def start(apps: dict[str, tuple[ServeSpec, str]], host: str = "127.0.0.1", port: int = 8000,
          address: str = "local", replicas: int = 1, num_cpus: int | None = None) -> None:
    """Start Ray (or join the cluster at `address`) and one application per entry of `apps`
    ({name: (spec, route prefix)}); returns when every replica is ready."""
    if address == "local":
        check_port(host, port)
        # the private instance keeps Ray's default, token authentication, without Ray's console line about it
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    serve.start(http_options={"host": host, "port": port})
    for name, (spec, prefix) in apps.items():
        app = SNNetDeployment.options(num_replicas=replicas).bind(asdict(spec), prefix)  # type: ignore[attr-defined]
        serve.run(app, name=name, route_prefix=prefix)  # returns once its replicas are up


def stop(address: str = "local") -> None:
    """Shut down the applications and the Ray instance this process started (a joined cluster keeps running).

    A local instance ends with its Ray processes, Serve's actors with them: serve.shutdown's controller kills itself
    mid-task there, which Ray reports on the console as a failed task. A joined cluster keeps running, so its
    applications are shut down first."""
    if not ray.is_initialized():  # nothing started (serve.shutdown would start Ray only to find nothing)
        return
    try:
        if address != "local":
            serve.shutdown()
    finally:
        ray.shutdown()


def serve_until_stopped(spec: ServeSpec, host: str, port: int, address: str = "local", replicas: int = 1,
                        ready: Callable[[], None] | None = None) -> None:
    """What `snnet serve` runs: start, call `ready`, then wait for Ctrl-C or SIGTERM and shut down."""
    stopped = threading.Event()
    previous = None
    try:
        start({"snnet": (spec, "/")}, host, port, address, replicas)
        # after ray.init, which installs its own fatal-signal handler for SIGTERM (it would abort the process)
        previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        if ready is not None:
            ready()
        try:
            while not stopped.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if ray.is_initialized():
            print("snnet serve: shutting down", file=sys.stderr, flush=True)
        stop(address)
