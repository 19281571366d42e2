"""A bounded load generator for `snnet serve`: a fixed number of requests from a few client threads, stopped by a
time limit whatever the server does (benchmarks/serve_load.py and the tests use it).

Each thread keeps one HTTP/1.1 connection and sends the next request as soon as its previous answer arrived
(closed loop), so the concurrency is the number of threads. Latency is measured by the client, from sending the
request to reading the whole answer.
"""
from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)


@dataclass
class Reply:
    index: int
    status: int  # 0: no answer (connection error or the time limit)
    ms: float
    body: dict[str, Any] = field(default_factory=dict)


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
