"""A scheduler replayed on a virtual clock: the dispatch's own steps (`admit`, `take`, `done_batch`) run on arrival
times, every batch charged a service time, nothing run.

`replay` is the loop; its callers say what a batch costs and what an answer earns: benchmarks/serve_replay.py
charges the costs calibrated on this machine, the tests a latency table's.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any, Protocol


class VirtualClock:
    """The time a replay has reached (seconds); the schedulers and their estimates read it by calling it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Dispatch(Protocol):
    """What `replay` needs of a scheduler (scheduler.py `DeadlineScheduler`)."""
    queue: list

    def admit(self, job: Any, now: float) -> None: ...

    def take(self, now: float) -> Any: ...

    def done_batch(self, cfg_id: int, n: int, measured_ms: float) -> None: ...


def replay(sched: Dispatch, clock: VirtualClock, admissions: list[tuple[float, Any, Any]],
           service_ms: Callable[[int, list], float], answered: Callable[[Any, int, float], tuple | None],
           shed: Callable[[Any], None] = lambda job: None,
           choose_s: Callable[[int], float] = lambda depth: 0.0) -> None:
    """Run `sched` until every admission is answered or shed. `admissions`: (time, order, job) to admit, order any
    comparable that no two share. One worker takes batches one after another, each charged `choose_s(depth)` for
    the dispatch and then `service_ms(cfg_id, batch)` (the scheduler learns the latter, as the server's worker
    does). `answered(job, cfg_id, end)` is called for each job of a batch at its end and may return another
    admission (a cascade's next stage); `shed(job)` for each shed head."""
    heapq.heapify(admissions)
    t = 0.0
    while admissions or sched.queue:
        while admissions and admissions[0][0] <= t:
            at, _, job = heapq.heappop(admissions)
            clock.now = at
            sched.admit(job, at)
        if not sched.queue:
            t = admissions[0][0]
            continue
        clock.now = t
        depth = len(sched.queue)
        planned = sched.take(t)
        t += choose_s(depth)
        if planned is None:
            continue
        if not isinstance(planned, tuple):
            shed(planned)
            continue
        cfg_id, batch = planned
        ms = service_ms(cfg_id, batch)
        t += ms / 1e3
        clock.now = t
        sched.done_batch(cfg_id, len(batch), ms)
        for job in batch:
            again = answered(job, cfg_id, t)
            if again is not None:
                heapq.heappush(admissions, again)


__all__ = ["Dispatch", "VirtualClock", "replay"]
