"""A scheduler replayed on a virtual clock: the dispatch's own steps (`admit`, `take`, `done_batch`) run on arrival
times, every batch charged a service time, nothing run.

`replay` is the loop; its callers say what a batch costs and what an answer earns: the server's `mode_table`
(switching or one stitch, per measured load) charges its latency table times its measured noise,
benchmarks/serve_replay.py the costs calibrated on this machine. `arrival_times` (gamma: Poisson or bursty) and
`onoff_times` (on/off bursts) draw the arrivals a load is simulated on.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from snnet.serve.policy import ModeTable, StitchMenu
from snnet.utils.errors import UsageError


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


#: the loads a mode table is simulated at: multiples of what the fastest candidate sustains in full batches, and
#: the arrivals' squared coefficient of variation (1: Poisson; gamma above it: bursts)
LOADS = tuple(0.02 * 1.5 ** k for k in range(12))
CV2S = (1.0, 4.0, 8.0)
#: and on/off bursts: ON and OFF periods of these many budgets on average (`onoff_times`)
ONOFF = (20.0, 40.0)
MODE_REQUESTS = 1000  # arrivals per simulated load of a mode table (a smoke run may lower it)
OWN_RATIOS = 20  # a stitch measured fewer times draws its noise from every stitch's ratios


def mode_table(menu: StitchMenu, candidates: Sequence[int], budget_ms: float, max_batch: int,
               make: Callable[[VirtualClock], Any], make_job: Callable[[Sequence[int], float, float], Any],
               before_ms: float = 0.0, ratios: Mapping[int, Sequence[float]] | None = None, gaps: int = 2048,
               requests: int | None = None, seed: int = 0,
               pause: Callable[[], Any] | None = None) -> ModeTable:
    """Which serves each load best: switching among all `candidates`, one of them always, or switching among the
    fastest few (the 2, 3, ... fastest at full batches)? Each load of `LOADS` is replayed on gamma arrivals of each
    CV^2 of `CV2S` and on on/off bursts (`ONOFF`; `requests` arrivals, the same for every system) and scored by the
    expected correct answers within `budget_ms` (real ms, from arrival to the batch's end): top-1 x met. A batch
    takes the latency table's time x a
    ratio (measured / table) drawn from its stitch's own measured `ratios` (cfg_id -> ratios: stitches differ in
    their tails; all stitches' together for a stitch measured fewer than `OWN_RATIOS` times; none: the table's time)
    at the quantile of its first request's draw, the same draws for every system. Each request is queued
    `before_ms` after it arrived or after the previous one was queued, whichever is later (the decoding).
    `make(clock)`: a scheduler of the server's rule without modes that spends all of a budget on queueing and the
    batch; `make_job(candidates, arrival, deadline)`: its request. Ties go to switching among all, then to the
    earlier system (single stitches by rank, then the fewest fast ones).

    Each cell is placed at the rate and CV^2 the server *measures* on its arrivals (`estimates.Arrivals.load`, over
    `gaps` gaps: the medians of that estimate over the trace), where the lookup looks. `pause`: called before each
    system's simulation (a server's builder waits there while requests are being served)."""
    requests = requests or MODE_REQUESTS
    ids = list(candidates)
    b_max = max(1, max_batch)
    fastest = min(ids, key=lambda c: (menu.batch_ms(c, b_max), ids.index(c)))
    capacity = b_max / menu.batch_ms(fastest, b_max) * 1e3  # requests per second it sustains (table speed)
    acc = {c: float(menu.by_id[c]["acc1"]) / 100.0 for c in ids}
    measured = {c: sorted(v) for c, v in (ratios or {}).items() if v}
    pooled = sorted(r for v in measured.values() for r in v) or [1.0]
    noise = {c: measured[c] if len(measured.get(c, ())) >= OWN_RATIOS else pooled for c in ids}
    by_speed = sorted(ids, key=lambda c: (menu.batch_ms(c, b_max), ids.index(c)))
    fast_few = [tuple(c for c in ids if c in by_speed[:k]) for k in range(2, len(ids))]
    systems: list[tuple[int, ...]] = [tuple(ids)] + [(c,) for c in ids] + fast_few
    modes: list[tuple[int, ...] | None] = []
    cells: list[tuple[float, float]] = []  # the rate and CV^2 the server would measure, per cell
    rows: list[float | str] = [*CV2S, "on/off"]
    for i, load in enumerate(LOADS):
        for j, row in enumerate(rows):
            if isinstance(row, str):
                times = onoff_times(requests, load * capacity, ONOFF[0] * budget_ms / 1e3,
                                    ONOFF[1] * budget_ms / 1e3, seed + 1000 * i + j)
            else:
                times = arrival_times(requests, load * capacity, row, seed + 1000 * i + j)
            est = measured_load(np.diff(times), gaps)
            cells.append((float(np.median([r for r, _ in est])) if est else load * capacity,
                          float(np.median([c for _, c in est])) if est else 1.0))
            u = np.random.default_rng(seed + 1000 * i + j).random(requests).tolist()
            scores = []
            for system in systems:
                if pause is not None:
                    pause()
                clock = VirtualClock()
                jobs, free, index = [], 0.0, {}
                for k, t in enumerate(times.tolist()):
                    free = max(free, t) + before_ms / 1e3
                    job = make_job(system, t, t + budget_ms / 1e3)
                    index[id(job)] = k
                    jobs.append((free, k, job))
                earned = [0.0]

                def answered(job: Any, cfg_id: int, end: float, earned: list[float] = earned) -> None:
                    if end <= job.deadline:
                        earned[0] += acc[cfg_id]

                def service_ms(c: int, batch: list, index: dict = index, u: list[float] = u) -> float:
                    own = noise[c]
                    return menu.batch_ms(c, len(batch)) * own[min(int(u[index[id(batch[0])]] * len(own)),
                                                                  len(own) - 1)]

                replay(make(clock), clock, jobs, service_ms, answered)
                scores.append(earned[0])
            best = max(range(len(systems)), key=lambda k: (scores[k], -k))
            modes.append(None if best == 0 else systems[best])
    return ModeTable([load * capacity for load in LOADS], rows, modes, cells)


def measured_load(gaps: np.ndarray, window: int) -> list[tuple[float, float]]:
    """The rate and CV^2 `estimates.Arrivals` measures over `window` consecutive gaps, at windows a quarter
    apart."""
    if len(gaps) < 8 or np.mean(gaps) <= 0:
        return []
    out = []
    for start in range(0, max(1, len(gaps) - window + 1), max(1, window // 4)):
        g = gaps[start:start + window]
        out.append((1.0 / float(np.mean(g)), float(np.var(g) / np.mean(g) ** 2)))
    return out


__all__ = ["CV2S", "ONOFF", "Dispatch", "LOADS", "MODE_REQUESTS", "OWN_RATIOS", "VirtualClock", "arrival_times",
           "measured_load", "mode_table", "onoff_times", "replay"]
