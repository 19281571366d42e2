"""`snnet serve` on one machine without Ray: `ServeCore` (handler.py) behind aiohttp's HTTP server, in this process.

Ray Serve (app.py) is the engine for several machines and replicas; on one machine its proxy, its hand-offs
between processes and its runtime cost a request tens of ms and the server about 1 GB before the network runs
(docs/serving.md has the breakdown). Here a request goes from the socket to the handler in the same event loop:
the body is read (refused from Content-Length when over the limit), the image is decoded in the handler's thread
pool and the batch runs in the scheduler's worker thread, so the loop only parses HTTP and moves bytes.
"""
from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from snnet.serve import check_port
from snnet.serve.handler import ServeCore, ServeSpec


def make_app(core: ServeCore) -> web.Application:
    """An aiohttp application that hands every request (any path, any method) to `core.handle`."""
    limit = core.spec.max_body_bytes

    async def answer(request: web.Request) -> web.Response:
        declared = request.content_length
        if declared is not None and declared > limit:
            body = b"\0" * (limit + 1)  # refused as over-size without reading it
        else:  # chunked or declared: read until the end, or one byte past the limit (then 413, nothing more read)
            parts, size = [], 0
            try:
                while size <= limit:
                    part = await request.content.read(limit + 1 - size)
                    if not part:
                        break
                    parts.append(part)
                    size += len(part)
            except ConnectionError:  # the client left before sending its whole body: nobody to answer
                return web.Response(status=400)
            body = b"".join(parts)
        status, payload = await core.handle(request.method, request.path, body)
        return web.json_response(payload, status=status)

    app = web.Application(client_max_size=limit + 1)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def _serve(core: ServeCore, host: str, port: int, ready: Callable[[], None] | None,
                 stopped: asyncio.Event) -> None:
    runner = web.AppRunner(make_app(core), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    try:
        if ready is not None:
            ready()
        await stopped.wait()
    finally:
        await runner.cleanup()
        core.scheduler.close()
        core.decoder.shutdown(wait=False, cancel_futures=True)


def serve_until_stopped(spec: ServeSpec, host: str, port: int, ready: Callable[[], None] | None = None) -> None:
    """What `snnet serve --engine local` runs: load, measure, listen, call `ready`, then serve until Ctrl-C or
    SIGTERM."""
    check_port(host, port)
    core = ServeCore.build(spec)

    async def main() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopped.set)
        await _serve(core, host, port, ready, stopped)

    asyncio.run(main())
    print("snnet serve: stopped", file=sys.stderr, flush=True)
