"""Deadline-aware batching with late binding: which requests run next, and on which stitch.

Requests wait in one queue ordered by deadline (earliest first; a request without a latency budget after every
request with one, in arrival order). Whenever the worker is free (work-conserving: no batching wait unless
`max_wait_ms` asks for one) the scheduler takes the request with the earliest deadline, the head, and binds its
stitch *now*, knowing exactly how long the head has already waited and what is queued behind it:

* the candidates are the head's stitches (every served stitch within its FLOPs budget, best first by `snnet
  select`'s ranking; one stitch for a request that fixed its cfg_id; one stage for a cascade request);
* the batch is the head and the next queued requests that may run the same stitch, up to `max_batch`;
* the stitch: among the candidates after whose batch every request still queued can meet its deadline on its
  fastest stitch, *and* which the whole queue could run on in time (the slack is shared: `_all_on`), *and* which
  leave room for the requests that will arrive while it runs (below), *and* which the queue together with the
  burst that usually follows could run on in time (the burst quantile, below), the one with the
  highest expected top-1 in time: its top-1 x the chance that its batch ends before the head's deadline. The batch
  time is the latency table's as the batches served lately ran (`BatchTimes`: the median slowdown, and for the
  chance the spread of the rest), plus the measured time after the forward pass. So the most accurate stitch,
  unless it would end so close to the deadline that it is often late; then a stitch a little less accurate and
  surely in time scores more (effective accuracy counts a late answer as none), while a stitch much less accurate
  that saves a fraction of a millisecond does not (the digits stitches differ by tenths of a ms, less than one batch's
  jitter). When no stitch has room for the burst, the same choice without it; when none leaves room for the
  arrivals, among those that keep the queue feasible; when none does, among those with any chance; when none has
  one, the fastest.

The room for arrivals: a batch cannot be interrupted, so a request that arrives just after it starts waits all of
it. With the recent arrival rate λ (arrivals of the last 2 s), a batch of d ms expects ``headroom x λ x d``
arrivals (``headroom`` 2 by default: arrivals come in bursts), and a stitch is chosen only if those, arriving at its
start, could still be answered within the head's budget on the fastest stitch: ``d + fastest(k) + after <=
budget``. This is the blocking term of non-preemptive EDF, estimated from the measured rate instead of assumed.
Why (issue 38): with a menu of 71 DeiT stitches the greedy choice used every millisecond of the head's slack, and
2-3 % of a bursty trace were shed behind long batches, while the three anchors' coarse menu left slack by
accident. Measured against the greedy choice (`headroom=0`) in benchmarks/serve_load.py it has not yet been a
clear gain: the margins are a few requests either way (docs/serving.md).

Why the shared slack (issue 38): in a simulation of this scheduler on the DeiT-Ti/S/B menu (benchmarks/serve_sim.py,
the same `admit`/`take` on a virtual clock), a head allowed to spend every millisecond that the requests behind it
could make up on the fastest stitch left them exactly that: the fastest stitch, or a shed when one more request of
the burst arrived. Switching then lost to a fixed middle-sized network by up to 9.5 points of effective accuracy
on CV^2 8 traces; with the shared slack it is level with the best fixed network chosen after the fact.

Why the burst quantile (issue 38): the shared slack still spends the whole slack of the requests queued *now*; on
CV^2 8 traces (long quiet gaps, then dozens of requests) the next requests of the burst arrived behind a batch
sized for the queue alone, and switching lost to a fixed stitch between DeiT-Ti and DeiT-S by up to 3.8 points
(the same simulation). So the scheduler keeps the arrival times of the last `burst_window` seconds (30) and
counts, after each, how many more arrived within one latency budget; the `burst_q` quantile (0.6) of those counts is
the burst to expect, and the i-th of them comes at the median time the i-th next arrival came (`burst`). Those
requests, each with its own deadline, join the queue in the `_all_on` check of the first tier. It adapts to the
traffic: Poisson arrivals give a few requests spread over the budget and the big stitches stay; bursty ones many
close together and a stitch the burst can share. docs/serving.md has what it wins in the simulation and where it
does not; the quantile was chosen on the simulation's traces, and traces it was not chosen on are reported beside
them.

This is SuperServe's SlackFit idea (the slack of the most urgent request picks the network) with a feasibility
check of the queue behind it: under a burst the queue grows, the slack shrinks and the stitches get smaller, and
they grow back as the burst drains. A fixed network is the same scheduler with one candidate.

A head that cannot meet its deadline even on its fastest stitch at batch 1, at the machine's typical speed, is
*shed* when the server runs with `shed=True`: it is answered at once (the handler turns `Shed` into HTTP 503, one
line) and costs no compute (a request that would make it at the typical speed is run: half a chance is worth the
batch); without shedding it runs on its fastest stitch and its answer says the budget was missed
(`within_budget` false).

Each answer carries the prediction made at dispatch: the server time the request will have spent when its batch is
done (`predicted_ms`, the wait so far plus the batch's predicted time) and whether that meets its budget.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from snnet.serve.policy import StitchMenu

Run = Callable[[torch.Tensor, int], torch.Tensor]
NO_DEADLINE = float("inf")
#: at most one heap trim per this many seconds (when the queue runs empty)
TRIM_EVERY_S = 1.0
PROBE_AFTER_S = 1.0  # a server that took no batch for this long runs its head even if hopeless (`probing`)
_LIBC: Any = None  # glibc's malloc_trim once looked up; False where there is none


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing; True if it ran).

    Once glibc's dynamic mmap threshold has risen (it does when a large block is freed: loading a checkpoint frees
    hundreds of MiB of them), freed activations and tensors stay in the heap, so a server's memory stays at its
    peak. Measured on DeiT-Ti/S/B (issue 38): after loading and measuring latencies a trim gave back 80 and
    170 MiB. The server trims after its set-up and whenever its queue runs empty (at most once a second)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim  # opened once: the server trims at every idle second
        except (OSError, AttributeError):  # not glibc
            _LIBC = False
    if _LIBC is False:
        return False
    _LIBC(0)
    return True


class Shed(Exception):
    """A request whose deadline cannot be met even on its fastest stitch (answered at once, HTTP 503)."""

    def __init__(self, waited_ms: float, fastest_ms: float):
        super().__init__(f"{waited_ms:.1f} ms waited + {fastest_ms:.1f} ms on the fastest stitch")
        self.waited_ms, self.fastest_ms = waited_ms, fastest_ms


@dataclass
class Job:
    """One request in the queue. `candidates`: cfg_ids it may run, best first; `deadline`: perf_counter seconds."""
    x: torch.Tensor
    candidates: Sequence[int]
    arrival: float
    deadline: float = NO_DEADLINE
    future: asyncio.Future | None = None
    seq: int = 0

    def key(self) -> tuple[float, int]:
        return self.deadline, self.seq


@dataclass
class Done:
    """What a job's future resolves to: its logits row and the dispatch's facts."""
    logits: torch.Tensor
    cfg_id: int
    batch_size: int
    predicted_ms: float  # server time predicted at dispatch (from arrival to the end of the batch)
    within_budget: bool  # predicted_ms <= the budget (True without one)
    queue_depth: int  # requests queued when the batch was formed (the batch included)
    choose_us: float  # the time the dispatch took to choose the stitch and the batch
    started: float = 0.0  # perf_counter when its batch started
    finished: float = 0.0  # perf_counter when its batch's forward pass returned


class Recent:
    """The samples of the last `seconds` (at most `most`), but never fewer than the last `keep` and none older than
    `horizon`, summarised by `summarise` (recomputed at most every 50 ms: a dispatch reads it many times); `fallback`
    until `least` recent samples exist. Recent, so an estimate follows a machine whose load changes and falls back
    when samples stop coming (a server shedding every request learns nothing new and must not stay pessimistic for
    ever). Thread-safe: the decoding threads read it too (the early shed). The one window of `Quantile` and
    `BatchTimes`."""

    def __init__(self, summarise: Callable[[list[tuple[float, ...]]], Any], fallback: Any, seconds: float = 2.0,
                 least: int = 5, most: int = 400, keep: int = 0, horizon: float = math.inf,
                 clock: Callable[[], float] = time.perf_counter):
        self.summarise, self.fallback = summarise, fallback
        self.seconds, self.least, self.keep, self.horizon, self.clock = seconds, least, keep, horizon, clock
        self.samples: collections.deque[tuple[float, ...]] = collections.deque(maxlen=most)  # (time, *sample)
        self._value, self._at = fallback, -math.inf
        self._lock = threading.Lock()

    def add(self, *sample: float) -> None:
        with self._lock:
            self.samples.append((self.clock(), *sample))
            self._at = -math.inf  # recompute on the next read

    @property
    def value(self) -> Any:
        with self._lock:
            now = self.clock()
            if now - self._at > 0.05:
                old = self.seconds if len(self.samples) > self.keep else self.horizon
                while self.samples and now - self.samples[0][0] > old:
                    self.samples.popleft()
                    old = self.seconds if len(self.samples) > self.keep else self.horizon
                self._value = self.summarise([x[1:] for x in self.samples]) if len(self.samples) >= self.least \
                    else self.fallback
                self._at = now
            return self._value


class Quantile(Recent):
    """One quantile of the recent samples (`Recent`: the last `seconds`); `initial` until `least` exist."""

    def __init__(self, q: float, initial: float, seconds: float = 2.0, least: int = 5, most: int = 400,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__(lambda xs: float(np.quantile([x for x, in xs], q)), initial, seconds, least, most,
                         clock=clock)


class BatchTimes:
    """How long a batch takes now, learned from the batches served: measured ms = slowdown x the table's ms +
    jitter. The slowdown is the median of measured / table over the recent batches (the machine's speed now: work
    beside the server moves it); the jitter is the 95th percentile of what the slowdown leaves unexplained
    (measured - slowdown x table, in ms, at least 0): preemption and cache misses, which add milliseconds to a
    batch, not a factor. `predict` (slowdown x table + jitter) is met by ~95 % of batches; `typical` (slowdown x
    table) by about half.

    Why not the 95th percentile of measured / table (issue 38, first round): on two shared cores a 2 ms digits
    batch preempted for 5 ms reads as a 3.5x slowdown, the percentile of such ratios predicted every batch 6x
    slower than it ran, and at 1x load the digits server shed 88 % of the requests while its worker ran batches
    for about 2 s of 10.7.

    Recent (`Recent`) means the batches of the last `seconds`, but never fewer than the last `keep` (a slow network
    at a low rate runs a handful of batches in 2 s), and none older than `horizon` (a server that runs nothing,
    shedding everything, must not stay pessimistic for ever). Until `least` recent batches exist: the table as
    measured (slowdown 1, jitter 0). Why `keep` (issue 38, the repeated DeiT run): at 0.5x load DeiT ran fewer than
    5 batches in 2 s, the prediction fell back to a latency table measured faster than the machine then ran, and 9
    in 100 of the answers that said `within_budget` missed their budget."""

    def __init__(self, seconds: float = 2.0, least: int = 5, most: int = 400, keep: int = 30,
                 horizon: float = 60.0, clock: Callable[[], float] = time.perf_counter):
        self.window = Recent(self._fit, (1.0, 0.0, np.zeros(0)), seconds, least, most, keep, horizon, clock)
        self.keep = keep

    @staticmethod
    def _fit(batches: list[tuple[float, ...]]) -> tuple[float, float, np.ndarray]:
        """(slowdown, jitter, the sorted residuals measured - slowdown x table) of (table, measured) pairs."""
        table = np.array([t for t, _ in batches])
        measured = np.array([m for _, m in batches])
        slowdown = float(np.median(measured / table))
        residuals = np.sort(measured - slowdown * table)
        return slowdown, max(0.0, float(np.quantile(residuals, 0.95))), residuals

    @property
    def samples(self) -> collections.deque[tuple[float, ...]]:
        return self.window.samples

    def add(self, table_ms: float, measured_ms: float) -> None:
        if table_ms > 0:
            self.window.add(table_ms, measured_ms)

    def chance_within(self, table_ms: float, ms_left: float) -> float:
        """The share of recent batches that, scaled to this one, took at most `ms_left` (1 or 0 by the table until
        enough batches were served)."""
        slowdown, _, residuals = self.window.value
        slack = ms_left - slowdown * table_ms
        if len(residuals) == 0:
            return 1.0 if slack >= 0 else 0.0
        return float(np.searchsorted(residuals, slack, side="right")) / len(residuals)

    @property
    def slowdown(self) -> float:
        return self.window.value[0]

    @property
    def jitter_ms(self) -> float:
        return self.window.value[1]

    def typical(self, table_ms: float) -> float:
        """The batch's time at the machine's typical speed now (about half the batches take longer)."""
        return table_ms * self.slowdown

    def predict(self, table_ms: float) -> float:
        """The time ~95 % of such batches stay within (0 for no batch)."""
        slowdown, jitter, _ = self.window.value
        return table_ms * slowdown + jitter if table_ms > 0 else 0.0


@dataclass
class Learned:
    """What the scheduler measures while it serves: batch times against the latency table (`BatchTimes`) and the
    time from the end of a batch to the answer (95th percentile)."""
    batches: BatchTimes = field(default_factory=BatchTimes)
    after_ms: Quantile = field(default_factory=lambda: Quantile(0.95, 0.5))

    def fresh(self, after_ms: float = 0.5) -> None:
        """Forget what was learned (tests: an idle server that has seen no request)."""
        self.batches = BatchTimes()
        self.after_ms = Quantile(0.95, after_ms)


class DeadlineScheduler:
    """`await submit(job)` -> Done. One worker thread runs the batches one after another, as the latency table
    measured them; the event loop keeps accepting requests meanwhile."""

    def __init__(self, run: Run, menu: StitchMenu, max_batch: int = 16, max_wait_ms: float = 0.0,
                 shed: bool = False, headroom: float = 2.0, window: float = 2.0, fair: bool = True,
                 burst_q: float | None = 0.6, burst_window: float = 30.0):
        self.run, self.menu = run, menu
        self.max_batch, self.max_wait, self.shed = max_batch, max_wait_ms / 1e3, shed
        self.headroom, self.window = headroom, window  # arrivals expected per batch: headroom x recent rate x time
        self.fair = fair  # the head's stitch is one the whole queue could run on (`_all_on`)
        self.arrivals: collections.deque[float] = collections.deque(maxlen=10_000)  # perf_counter of submits
        self.burst_q, self.burst_window = burst_q, burst_window
        self.history: collections.deque[float] = collections.deque(maxlen=5_000)  # arrivals of the last burst_window
        self._burst: dict[float, tuple[float, list[float]]] = {}  # span -> (computed at, offsets)
        self.queue: list[tuple[tuple[float, int], Job]] = []
        self.running: tuple[int, int, float] | None = None  # (cfg_id, batch size, start) of the batch running
        self.batches = self.shed_count = 0
        self.last_start = -math.inf  # when the last batch was taken (the clock of `take`)
        self.learned = Learned()
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="snnet-batch")
        self._trimmed = -math.inf
        self._fastest_of: dict[tuple[int, ...], int] = {}

    # ------------------------------------------------------------------------------------------ the queue
    def depth(self) -> int:
        return len(self.queue) + (self.running[1] if self.running else 0)

    async def submit(self, job: Job) -> Done:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._loop())
        job.future = loop.create_future()
        self.admit(job, time.perf_counter())
        assert self._wake is not None
        self._wake.set()
        return await job.future

    def admit(self, job: Job, now: float) -> None:
        """Queue `job`, arrived at `now` (the server's `submit`; a simulation's virtual clock)."""
        job.seq = next(self._seq)
        self.arrivals.append(now)
        self.history.append(now)
        heapq.heappush(self.queue, (job.key(), job))

    def take(self, now: float) -> tuple[int, list[Job]] | Job | None:
        """`plan(now)`, acted on: the batch (or the shed job) leaves the queue. The worker's one step, and a
        simulation's (benchmarks/serve_sim.py)."""
        planned = self.plan(now)
        if isinstance(planned, Job):
            self._remove([planned])
            self.shed_count += 1
        elif planned is not None:
            self._remove(planned[1])
            self.last_start = now
        return planned

    # ------------------------------------------------------------------------------------------ the choice
    def batch_ms(self, cfg_id: int, n: int) -> float:
        """Predicted ms of a batch of `n` on `cfg_id` as it will run now: the time ~95 % of batches stay within."""
        return self.learned.batches.predict(self.menu.batch_ms(cfg_id, n))

    def typical_ms(self, cfg_id: int, n: int) -> float:
        """The same batch at the machine's typical speed now (what shedding is decided on)."""
        return self.learned.batches.typical(self.menu.batch_ms(cfg_id, n))

    def too_late(self, candidates: Sequence[int], arrival: float, deadline: float, now: float) -> Shed | None:
        """The `Shed` for a request that cannot meet its deadline even on its fastest candidate at batch 1 at the
        machine's typical speed, started now; None when it can, has no deadline, or the server does not shed.
        The dispatch asks it of the head; the handler asks it before decoding the image (an early shed: under a
        burst, requests that waited for the decoding threads past hope cost no decoding). Thread-safe."""
        if not self.shed or deadline == NO_DEADLINE:
            return None
        fastest = min(self.typical_ms(c, 1) for c in candidates)
        if now + (fastest + self.learned.after_ms.value) / 1e3 <= deadline:
            return None
        return Shed((now - arrival) * 1e3, fastest)

    def probing(self, now: float) -> bool:
        """Whether a hopeless request is run anyway, not shed: when no batch is running and none was taken for
        `PROBE_AFTER_S`. Shedding is decided on what the server learned from the batches it ran; a server that
        learned a slow speed (a cold start's first batches, a burst on a busy machine) and then sheds everything runs
        no batch to learn it is fast again, for as long as it remembers old batches (up to a minute). Issue 38: in a
        digits run whose budgets counted from the client's send time (results/bench_serve_sent_at.txt), the anchors
        server, which got no warm-up, shed 3538 and 3546 requests of its first two systems at 0.5x load (none
        answered in time), and met 8 % of the deadlines at 0.75x. One batch on the fastest stitch after a second
        without one costs little."""
        return self.running is None and now - self.last_start > PROBE_AFTER_S

    def plan(self, now: float) -> tuple[int, list[Job]] | Job | None:
        """(stitch, batch) to run now; a Job to shed; None when the queue is empty. Does not change the queue."""
        if not self.queue:
            return None
        ordered = [j for _, j in sorted(self.queue, key=lambda e: e[0])]
        head = ordered[0]
        after = self.learned.after_ms.value
        fastest = self._fastest(head)
        hopeless = self.too_late(head.candidates, head.arrival, head.deadline, now) is not None
        if hopeless and not self.probing(now):
            return head
        if head.deadline == NO_DEADLINE:  # no latency budget: the best stitch it may run
            c = head.candidates[0]
            return c, [j for j in ordered if c in j.candidates][:self.max_batch]
        # four tiers, best first: room for the usual burst too; keeps the queue feasible, leaves room for arrivals
        # and the whole queue could run it; keeps the queue feasible; may make the head's deadline. In each, the
        # highest expected top-1 in time wins.
        best: list[tuple[float, int, list[Job]] | None] = [None, None, None, None]
        rate = self.rate(now)
        left_ms = (head.deadline - now) * 1e3 - after
        phantoms: list[Job] = []
        if self.burst_q is not None and len(head.candidates) > 1:  # one candidate (a fixed cfg_id): no choice
            budget = head.deadline - head.arrival
            phantoms = [Job(head.x, head.candidates, now + o, now + o + budget) for o in self.burst(now, budget)]
        hopeful: list[Job] | None = None  # what `_all_on` weighs, the same for every candidate: made when first asked
        with_burst: list[Job] = []
        for c in head.candidates:  # best first
            acc = float(self.menu.by_id[c]["acc1"])
            if best[0] is not None and acc <= best[0][0]:
                break  # no later candidate can expect more: its top-1 is lower and its chance at most 1
            batch = [j for j in ordered if c in j.candidates][:self.max_batch]
            value = acc * self.learned.batches.chance_within(self.menu.batch_ms(c, len(batch)), left_ms)
            if value <= 0:
                continue
            ms = self.batch_ms(c, len(batch))
            end = now + (ms + after) / 1e3
            tier = 3
            if self._rest_feasible(ordered, batch, now, end, after):
                tier = 2
                if self._leaves_room(ms, head, fastest, rate, after):
                    if hopeful is None:
                        hopeful = self._hopeful(ordered, now, after)
                        with_burst = hopeful + self._hopeful(phantoms, now, after)
                    if not self.fair or self._all_on(c, hopeful, now, after):
                        tier = 0 if not phantoms or self._all_on(c, with_burst, now, after) else 1
            held = best[tier]
            if held is None or value > held[0]:
                best[tier] = (value, c, batch)
        for held in best:
            if held is not None:
                return held[1], held[2]
        return fastest, [j for j in ordered if fastest in j.candidates][:self.max_batch]

    def rate(self, now: float) -> float:
        """Arrivals per second over the last `window` seconds."""
        while self.arrivals and now - self.arrivals[0] > self.window:
            self.arrivals.popleft()
        return len(self.arrivals) / self.window

    def burst(self, now: float, span: float) -> list[float]:
        """The burst to expect after now, as offsets in seconds: how many more requests arrived within `span` after
        each arrival of the last `burst_window` seconds whose next `span` is over (the `burst_q` quantile of those
        counts), and when: the i-th at the median time the i-th next arrival came, among the arrivals it came within
        `span` of (recomputed at most every 50 ms)."""
        at, offsets = self._burst.get(span, (-math.inf, []))
        if now - at <= 0.05:
            return offsets
        while self.history and now - self.history[0] > self.burst_window:
            self.history.popleft()
        times = np.fromiter(self.history, float)
        done = times[times + span <= now]
        offsets = []
        if len(done) >= 5:
            counts = np.searchsorted(times, done + span, side="left") - np.arange(len(done)) - 1
            k = int(np.quantile(counts, self.burst_q))
            for i in range(1, k + 1):
                j = np.flatnonzero(counts >= i)
                offsets.append(float(np.median(times[j + i] - times[j])))
        if len(self._burst) > 64:  # budgets of many sizes: keep the cache small
            self._burst.clear()
        self._burst[span] = (now, offsets)
        return offsets

    def _leaves_room(self, ms: float, head: Job, fastest: int, rate: float, after: float) -> bool:
        """Whether the requests expected to arrive during a batch of `ms` (headroom x rate x its time, at least one
        when any arrive) could, arriving as it starts, still be answered within the head's budget on the fastest
        stitch."""
        expected = math.ceil(self.headroom * rate * ms / 1e3)
        if expected == 0:
            return True
        budget_ms = (head.deadline - head.arrival) * 1e3
        return ms + self.batch_ms(fastest, expected) + after <= budget_ms

    def _rest_feasible(self, ordered: list[Job], batch: list[Job], now: float, end: float, after: float) -> bool:
        """Whether every queued request outside `batch` that could still make its deadline would, run after `end`
        in deadline order, in consecutive batches of up to `max_batch` on the fastest stitch of each batch's first
        request (what the scheduler falls back to under pressure). One pass over the queue."""
        taken = {id(j) for j in batch}
        rest = [j for j in ordered if id(j) not in taken and j.deadline < NO_DEADLINE]
        t = end - after / 1e3
        for i in range(0, len(rest), self.max_batch):
            chunk = rest[i:i + self.max_batch]
            c = self._fastest(chunk[0])
            t += self.batch_ms(c, len(chunk)) / 1e3
            if t + after / 1e3 > chunk[0].deadline:  # the chunk's earliest deadline
                alone = (self.batch_ms(c, 1) + after) / 1e3
                if any(now + alone <= j.deadline < t + after / 1e3 for j in chunk):
                    return False  # one it could have saved
        return True

    def _hopeful(self, jobs: list[Job], now: float, after: float) -> list[Job]:
        """The requests of `jobs` with a deadline they could still meet alone on their fastest stitch."""
        return [j for j in jobs if j.deadline < NO_DEADLINE and
                now + (self.batch_ms(self._fastest(j), 1) + after) / 1e3 <= j.deadline]

    def _all_on(self, c: int, hopeful: list[Job], now: float, after: float) -> bool:
        """Whether every request of `hopeful` (`_hopeful`: in deadline order) could run on `c` (those that may not:
        on their fastest), in deadline order in batches of up to `max_batch`, and meet its deadline. So the head's
        stitch is one the whole queue could afford: the slack is shared, not spent by the head and left to the rest
        to make up on the fastest stitch."""
        t = now
        rest = hopeful
        while rest:
            k = c if c in rest[0].candidates else self._fastest(rest[0])
            chunk = [j for j in rest if k in j.candidates][:self.max_batch]
            t += self.batch_ms(k, len(chunk)) / 1e3
            if t + after / 1e3 > chunk[0].deadline:
                return False
            taken = {id(j) for j in chunk}
            rest = [j for j in rest if id(j) not in taken]
        return True

    def _fastest(self, job: Job) -> int:
        """The candidate of `job` fastest at batch 1 (remembered per candidate list: a dispatch asks it of every
        queued request, for every stitch it weighs)."""
        key = tuple(job.candidates)
        c = self._fastest_of.get(key)
        if c is None:
            c = self._fastest_of[key] = min(key, key=lambda k: self.menu.batch_ms(k, 1))
        return c

    # ------------------------------------------------------------------------------------------ the worker
    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                if time.perf_counter() - self._trimmed > TRIM_EVERY_S:  # idle: give freed activations back
                    self._trimmed = time.perf_counter()
                    release_free_heap()
                self._wake.clear()
                await self._wake.wait()
                continue
            head = min(self.queue, key=lambda e: e[0])[1]
            if self.max_wait > 0 and len(self.queue) < self.max_batch:
                left = head.arrival + self.max_wait - time.perf_counter()
                if left > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), left)
                    except asyncio.TimeoutError:
                        pass
                    continue
            t_choose = time.perf_counter()
            depth = len(self.queue)
            planned = self.take(t_choose)
            if planned is None:
                continue
            if isinstance(planned, Job):  # shed: answered at once
                shed = self.too_late(planned.candidates, planned.arrival, planned.deadline, t_choose)
                if planned.future is not None and not planned.future.done():
                    planned.future.set_exception(shed or Shed((t_choose - planned.arrival) * 1e3, 0.0))
                continue
            cfg_id, batch = planned
            started = time.perf_counter()
            choose_us = (started - t_choose) * 1e6
            predicted_end = started + self.batch_ms(cfg_id, len(batch)) / 1e3 + self.learned.after_ms.value / 1e3
            self.running = (cfg_id, len(batch), started)
            try:
                x = torch.stack([j.x for j in batch])
                out = await loop.run_in_executor(self._pool, self._forward, x, cfg_id)
                finished = time.perf_counter()
                self.learned.batches.add(self.menu.batch_ms(cfg_id, len(batch)), (finished - started) * 1e3)
            except Exception as e:  # this batch's requests fail; the server goes on
                for j in batch:
                    if j.future is not None and not j.future.done():
                        j.future.set_exception(e)
            else:
                for i, j in enumerate(batch):
                    if j.future is None or j.future.done():  # a client that left has its future cancelled
                        continue
                    predicted = (predicted_end - j.arrival) * 1e3
                    j.future.set_result(Done(out[i], cfg_id, len(batch), predicted,
                                             predicted_end <= j.deadline, depth, choose_us, started, finished))
            finally:
                self.running = None
                self.batches += 1

    def observe_after(self, ms: float) -> None:
        """The handler's time from a batch's end to the answer (softmax, top-k, the event loop's delay)."""
        self.learned.after_ms.add(ms)

    def _remove(self, jobs: list[Job]) -> None:
        gone = {id(j) for j in jobs}
        self.queue = [e for e in self.queue if id(e[1]) not in gone]
        heapq.heapify(self.queue)

    def _forward(self, x: torch.Tensor, cfg_id: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.run(x, cfg_id)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "shed": self.shed_count, "queue_depth": self.depth(),
                "slowdown": self.learned.batches.slowdown, "jitter_ms_p95": self.learned.batches.jitter_ms,
                "after_ms_p95": self.learned.after_ms.value}
