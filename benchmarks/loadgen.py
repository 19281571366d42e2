"""HTTP clients for `snnet serve`, 127.0.0.1 only: the serving benchmarks' and the serving tests' load.

* `post`, `get`: one request on a fresh connection, its status and JSON answer.
* `run_open_loop`: the arrival time of every request is fixed in advance (simulate.py `arrival_times`,
  `onoff_times`) and each request is sent at its time whatever the server has answered so far, as serving research
  measures (a slow server does not slow the arrivals down, so bursts queue up as they would in production).
  Latency runs from the request's scheduled time to the end of its answer, so a client that sends late counts
  against the server, never for it. Built on asyncio and aiohttp's client: one event loop schedules thousands of
  requests on one core, where a thread per request would spend the CPU the server shares. It stops after its
  requests or a time limit, whatever the server does.
"""
from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


def check_loopback(url: str) -> None:
    """Refuse a target off this machine: load is sent to the loopback addresses only."""
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"load target {url!r} is not on this machine; the load generator sends to 127.0.0.1, ::1 "
                         f"or localhost only")


@dataclass
class Reply:
    index: int
    status: int  # 0: no answer (connection error or the time limit)
    ms: float
    body: dict[str, Any] = field(default_factory=dict)
    late_send_ms: float = 0.0  # how much later than scheduled the client sent it


def run_open_loop(url: str, bodies: Sequence[bytes], times: Sequence[float], time_limit: float = 120.0,
                  timeout: float = 30.0, stamp: bool = False) -> list[Reply]:
    """POST `bodies[i]` at `times[i]` seconds after the start, each on its own schedule (open loop). Requests whose
    time falls after `time_limit`, or whose answer has not come `timeout` s after their time, get status 0. With
    `stamp`, each body (a JSON object) gets `"sent_at"`: the Unix time it was due, so that `snnet serve` counts its
    latency budget from then (the same clock: this loop runs on 127.0.0.1 only). Returns one Reply per body."""
    check_loopback(url)
    if len(bodies) != len(times):
        raise ValueError(f"{len(bodies)} bodies for {len(times)} arrival times; pass one time per body")
    if stamp and not all(b.rstrip().endswith(b"}") and b.lstrip().startswith(b"{") for b in bodies):
        raise ValueError("stamp=True adds sent_at to each body, which must then be a JSON object; send objects")
    return asyncio.run(_open_loop(url, bodies, times, time_limit, timeout, stamp))


async def _open_loop(url: str, bodies: Sequence[bytes], times: Sequence[float], time_limit: float,
                     timeout: float, stamp: bool) -> list[Reply]:
    import aiohttp  # the local engine's HTTP library
    replies = [Reply(i, 0, float("nan")) for i in range(len(bodies))]
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        start = time.perf_counter() + 0.05

        async def one(i: int) -> None:
            when = start + float(times[i])
            await asyncio.sleep(max(0.0, when - time.perf_counter()))
            sent = time.perf_counter()
            body = bodies[i]
            if stamp:  # the time it was due, on the wall clock the server reads too
                body = body.rstrip()[:-1] + b', "sent_at": %.6f}' % (time.time() - (sent - when))
            try:
                async with s.post(url, data=body, headers=headers) as resp:
                    data = await resp.read()
                    replies[i] = Reply(i, resp.status, (time.perf_counter() - when) * 1e3,
                                       json.loads(data or b"{}"), (sent - when) * 1e3)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                pass

        await asyncio.gather(*(one(i) for i in range(len(bodies)) if times[i] <= time_limit))
    return replies


def _request(method: str, url: str, body: bytes | None, timeout: float) -> tuple[int, dict[str, Any]]:
    check_loopback(url)
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        conn.request(method, parts.path or "/", body, {"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """POST `body` (JSON) on a fresh connection: (status, JSON answer)."""
    return _request("POST", url, body, timeout)


def get(url: str, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """GET `url` on a fresh connection: (status, JSON answer)."""
    return _request("GET", url, None, timeout)
