"""Bounded load generators for `snnet serve`, 127.0.0.1 only (benchmarks/serve_live.py and the tests use them).

* **Open loop** (`arrival_times`, `run_open_loop`): the arrival time of every request is fixed in advance (Poisson,
  or bursty: gamma inter-arrival times with a squared coefficient of variation CV^2 above 1) and each request is
  sent at its time whatever the server has answered so far, as serving research measures (a slow server does not
  slow the arrivals down, so bursts queue up as they would in production). Latency runs from the request's
  scheduled time to the end of its answer, so a client that sends late counts against the server, never for it.
  Built on asyncio and aiohttp's client (one event loop schedules thousands of requests on one core; a thread per
  request or locust's user model would spend the client's CPU, on a machine the server shares, on threads).
* **Closed loop** (`run_load`): a fixed number of requests from a few threads, each sending its next request when
  its previous answer arrived; the concurrency is the number of threads (a load that throttles itself).

Both stop after a fixed number of requests or a time limit, whatever the server does.
"""
from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from snnet.utils.errors import UsageError


def check_loopback(url: str) -> None:
    """Refuse a target off this machine: load is sent to the loopback addresses only."""
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"load target {url!r} is not on this machine; the load generators send to 127.0.0.1, ::1 "
                         f"or localhost only")


def arrival_times(n: int, rate: float, cv2: float = 1.0, seed: int = 0) -> np.ndarray:
    """`n` arrival times in seconds from 0, `rate` requests/s on average: gamma inter-arrival times of shape
    1/cv2 (cv2 = 1: Poisson; 4 or 8: bursts of many requests close together, then long gaps)."""
    if n < 1 or not rate > 0 or not cv2 > 0:
        raise UsageError(f"arrivals need n >= 1, rate > 0 and cv2 > 0 (got {n}, {rate}, {cv2})")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(1.0 / cv2, cv2 / rate, n)
    return np.cumsum(gaps) - gaps[0]


def onoff_times(n: int, rate: float, on_s: float, off_s: float, seed: int = 0) -> np.ndarray:
    """`n` arrival times in seconds from 0, `rate` requests/s on average, in bursts: Poisson at
    rate x (on_s + off_s) / on_s during ON periods (exponential, `on_s` seconds on average), none during OFF periods
    (exponential, `off_s` on average)."""
    if n < 1 or not rate > 0 or not on_s > 0 or not off_s >= 0:
        raise UsageError(f"on/off arrivals need n >= 1, rate > 0, on_s > 0 and off_s >= 0 "
                         f"(got {n}, {rate}, {on_s}, {off_s})")
    rng = np.random.default_rng(seed)
    peak = rate * (on_s + off_s) / on_s
    out: list[float] = []
    t = 0.0
    while len(out) < n:
        on = rng.exponential(on_s)
        k = rng.poisson(peak * on)
        out.extend(np.sort(t + rng.uniform(0, on, k)).tolist())
        t += on + rng.exponential(off_s)
    times = np.array(out[:n])
    return times - times[0]


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)


@dataclass
class Reply:
    index: int
    status: int  # 0: no answer (connection error or the time limit)
    ms: float
    body: dict[str, Any] = field(default_factory=dict)
    late_send_ms: float = 0.0  # open loop: how much later than scheduled the client sent it


def run_open_loop(url: str, bodies: Sequence[bytes], times: Sequence[float], time_limit: float = 120.0,
                  timeout: float = 30.0, stamp: bool = False) -> list[Reply]:
    """POST `bodies[i]` at `times[i]` seconds after the start, each on its own schedule (open loop). Requests whose
    time falls after `time_limit`, or whose answer has not come `timeout` s after their time, get status 0. With
    `stamp`, each body (a JSON object) gets `"sent_at"`: the Unix time it was due, so that `snnet serve` counts its
    latency budget from then (the same clock: this loop runs on 127.0.0.1 only)."""
    check_loopback(url)
    if len(bodies) != len(times):
        raise UsageError(f"{len(bodies)} bodies for {len(times)} arrival times; pass one time per body")
    if stamp and not all(b.rstrip().endswith(b"}") and b.lstrip().startswith(b"{") for b in bodies):
        raise UsageError("stamp=True adds sent_at to each body, which must then be a JSON object; send objects")
    return asyncio.run(_open_loop(url, bodies, times, time_limit, timeout, stamp))


async def _open_loop(url: str, bodies: Sequence[bytes], times: Sequence[float], time_limit: float,
                     timeout: float, stamp: bool = False) -> list[Reply]:
    import aiohttp  # the open loop's client (installed with Ray Serve's and the local engine's aiohttp)
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


def post(url: str, body: bytes, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """One request on a fresh connection: (status, JSON answer)."""
    parts = urlsplit(url)
    conn = _connect(url, timeout)
    try:
        conn.request("POST", parts.path or "/", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def get(url: str, timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    parts = urlsplit(url)
    conn = _connect(url, timeout)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def run_load(url: str, bodies: Sequence[bytes], concurrency: int = 8, time_limit: float = 60.0,
             timeout: float = 10.0) -> list[Reply]:
    """Send every body of `bodies` once (in order, `concurrency` at a time); requests not sent when `time_limit`
    seconds have passed are dropped (status 0). Returns one Reply per body, by index."""
    parts = urlsplit(url)
    replies: list[Reply] = [Reply(i, 0, float("nan")) for i in range(len(bodies))]
    lock = threading.Lock()
    state = {"next": 0}
    deadline = time.monotonic() + time_limit

    def worker() -> None:
        conn = _connect(url, timeout)
        while time.monotonic() < deadline:
            with lock:
                i = state["next"]
                state["next"] += 1
            if i >= len(bodies):
                break
            t0 = time.perf_counter()
            try:
                conn.request("POST", parts.path or "/", bodies[i], {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                replies[i] = Reply(i, resp.status, (time.perf_counter() - t0) * 1e3, json.loads(data or b"{}"))
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()  # a broken connection: the next request opens a new one
                conn = _connect(url, timeout)
        conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + timeout + 1)
    return replies


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation (statistics.quantiles' 'inclusive' method)."""
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return float(values[0]) if q <= 0 else float(max(values)) if q >= 100 else cuts[int(q) - 1]
