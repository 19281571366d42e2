"""Deadline-ordered batching with late binding: which requests run next, and on which stitch.

Requests wait in one queue ordered by deadline (earliest first; a request without a latency budget after every
request with one, in arrival order). Whenever the worker is free (no batching wait unless `max_wait_ms` asks for
one) the scheduler looks at the request with the earliest deadline, the head, and binds its stitch *now*: a lookup
in the head's `SlackTable` (policy.py) by its slack (the time left to its deadline, less the answer's time, in the
latency table's milliseconds: divided by the learned slowdown after the learned jitter), the queue's depth and the
recent arrival rate. The batch is the head and the next queued requests that may run that stitch, up to
`max_batch`. So under a burst the queue grows, the slack shrinks and the stitches get smaller; they grow back as
the burst drains. A request with one candidate (a fixed cfg_id, a cascade's stage) or without a latency budget
(its FLOPs budget's best stitch, `snnet select`'s rule) has no choice: it only ever runs that stitch.

A head that cannot meet its deadline even on its fastest candidate at batch 1, at the machine's typical speed, is
*shed* when the server runs with `shed=True` (the handler answers 503 at once; it costs no compute), unless the
server has taken no batch for `PROBE_AFTER_S`: a server that learned a slow speed and sheds everything would run
no batch to learn that it is fast again. Without shedding it runs on its fastest candidate and its answer says the
budget was missed (`within_budget` false).

Each answer carries the prediction made at dispatch: the server time the request will have spent when its batch is
done (`predicted_ms`) and whether that meets its budget.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from snnet.serve.estimates import Learned
from snnet.serve.policy import SlackTable, StitchMenu

Forward = Callable[[torch.Tensor, int], torch.Tensor]
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
class Pending:
    """One request in the queue. `candidates`: cfg_ids it may run, best first; `deadline`: perf_counter seconds."""
    x: torch.Tensor
    candidates: Sequence[int]  # a tuple once queued
    arrival: float
    deadline: float = NO_DEADLINE
    future: asyncio.Future | None = None
    seq: int = 0


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


class DeadlineScheduler:
    """`await submit(job)` -> Done. One worker thread runs the batches one after another; the event loop keeps
    accepting requests meanwhile. `admit` and `take` are the worker's steps on any clock (simulate.py `replay` runs
    them on a virtual one); `done_batch` is what the worker learns from a batch."""

    def __init__(self, run: Forward, menu: StitchMenu, max_batch: int = 16, max_wait_ms: float = 0.0,
                 shed: bool = False, arrivals: bool = True, rest_on_same: bool = True, window: float = 2.0,
                 clock: Callable[[], float] = time.perf_counter, tables: dict | None = None):
        self.run, self.menu = run, menu
        self.max_batch, self.max_wait, self.shed = max(1, max_batch), max_wait_ms / 1e3, shed
        self.arrivals_counted, self.window = arrivals, window  # the rate: arrivals of the last `window` seconds
        self.rest_on_same = rest_on_same  # the table's rule for the queue behind the head (`SlackTable`)
        self.arrivals: collections.deque[float] = collections.deque(maxlen=100_000)
        self.queue: list[tuple[float, int, Pending]] = []  # a heap of (deadline, arrival order, request)
        self.running: tuple[int, int, float] | None = None  # (cfg_id, batch size, start) of the batch running
        self.batches = self.shed_count = 0
        self.last_start = -math.inf  # when the last batch was taken (the clock of `take`)
        self.learned = Learned.on(clock)
        self.clock = clock
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="snnet-batch")
        self._trimmed = -math.inf
        # the choice tables by candidates; `tables`: a cache shared with other schedulers of this menu (a simulation
        # replaying many traces builds each table once), by rule
        self._tables: dict[tuple[int, ...], SlackTable] = \
            (tables if tables is not None else {}).setdefault((self.max_batch, arrivals, rest_on_same), {})
        self._fastest_of: dict[tuple[int, ...], int] = {}

    # ------------------------------------------------------------------------------------------ the queue
    def depth(self) -> int:
        return len(self.queue) + (self.running[1] if self.running else 0)

    async def submit(self, job: Pending) -> Done:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._loop())
        job.future = loop.create_future()
        self.admit(job, time.perf_counter())
        assert self._wake is not None
        self._wake.set()
        return await job.future

    def admit(self, job: Pending, now: float) -> None:
        """Queue `job`, arrived at `now` (the server's `submit`; a simulation's virtual clock)."""
        job.candidates = tuple(job.candidates)
        job.seq = next(self._seq)
        self.arrivals.append(now)
        heapq.heappush(self.queue, (job.deadline, job.seq, job))

    def prepare(self, candidates: Sequence[int]) -> None:
        """Build the table of a candidate list now (the server does it at start for every FLOPs budget's front,
        so that no request waits for one)."""
        self.table(tuple(candidates))

    def table(self, candidates: tuple[int, ...]) -> SlackTable:
        known = self._tables.get(candidates)
        if known is None:
            known = self._tables[candidates] = SlackTable(self.menu, candidates, self.max_batch, self.arrivals_counted,
                                                          self.rest_on_same)
        return known

    def take(self, now: float) -> tuple[int, list[Pending]] | Pending | None:
        """`plan(now)`, acted on: the batch (or the shed head) leaves the queue. The worker's one step."""
        planned = self.plan(now)
        if planned is None:
            return None
        if isinstance(planned, Pending):
            heapq.heappop(self.queue)
            self.shed_count += 1
            return planned
        batch: list[Pending] = []
        aside: list[tuple[float, int, Pending]] | None = None  # allocated only when a request cannot join
        queue, most = self.queue, self.max_batch
        while queue and len(batch) < most:
            entry = heapq.heappop(queue)
            if planned in entry[2].candidates:
                batch.append(entry[2])
            else:
                aside = aside if aside is not None else []
                aside.append(entry)
                if len(aside) >= 4 * most:
                    break
        for entry in aside or ():
            heapq.heappush(queue, entry)
        self.last_start = now
        return planned, batch

    # ------------------------------------------------------------------------------------------ the choice
    def batch_ms(self, cfg_id: int, n: int) -> float:
        """Predicted ms of a batch of `n` on `cfg_id` as it will run now: the time ~95 % of batches stay within."""
        return self.learned.batches.predict(self.menu.batch_ms(cfg_id, n))

    def typical_ms(self, cfg_id: int, n: int) -> float:
        """The same batch at the machine's typical speed now (what shedding is decided on)."""
        return self.learned.batches.typical(self.menu.batch_ms(cfg_id, n))

    def fastest(self, candidates: tuple[int, ...]) -> int:
        c = self._fastest_of.get(candidates)
        if c is None:
            c = self._fastest_of[candidates] = min(candidates, key=lambda k: self.menu.batch_ms(k, 1))
        return c

    def too_late(self, candidates: Sequence[int], arrival: float, deadline: float, now: float) -> Shed | None:
        """The `Shed` for a request that cannot meet its deadline even on its fastest candidate at batch 1 at the
        machine's typical speed, started now; None when it can, has no deadline, or the server does not shed.
        The dispatch asks it of the head; the handler asks it before decoding the image (an early shed).
        Thread-safe."""
        if not self.shed or deadline == NO_DEADLINE:
            return None
        fastest = self.typical_ms(self.fastest(tuple(candidates)), 1)
        if now + (fastest + self.learned.after_ms.value) / 1e3 <= deadline:
            return None
        return Shed((now - arrival) * 1e3, fastest)

    def probing(self, now: float) -> bool:
        """Whether a hopeless head is run anyway, not shed: no batch is running and none was taken for
        `PROBE_AFTER_S` (shedding is decided on the speed learned from the batches run: a server that sheds
        everything would never learn that it is fast again)."""
        return self.running is None and now - self.last_start > PROBE_AFTER_S

    def plan(self, now: float) -> int | Pending | None:
        """The stitch the head's batch runs now; the head itself when it is to be shed; None when the queue is
        empty. Does not change the queue: a heap read, a table lookup and a few float operations."""
        if not self.queue:
            return None
        head = self.queue[0][2]
        candidates = head.candidates
        if head.deadline == NO_DEADLINE:
            return candidates[0]
        slowdown, jitter = self.learned.batches.window.value
        left_ms = (head.deadline - now) * 1e3 - self.learned.after_ms.value
        if self.shed and not self.probing(now):
            fastest = self.fastest(candidates)  # type: ignore[arg-type]
            if left_ms < slowdown * self.menu.batch_ms(fastest, 1):
                return head
        if len(candidates) == 1:
            return candidates[0]
        table = self.table(candidates)  # type: ignore[arg-type]
        rate = self.rate(now) * slowdown if self.arrivals_counted else 0.0
        budget_ms = (head.deadline - head.arrival) * 1e3 - self.learned.after_ms.value
        return table.choose((left_ms - jitter) / slowdown, (budget_ms - jitter) / slowdown, len(self.queue), rate)

    def rate(self, now: float) -> float:
        """Arrivals per second over the last `window` seconds."""
        while self.arrivals and now - self.arrivals[0] > self.window:
            self.arrivals.popleft()
        return len(self.arrivals) / self.window

    def done_batch(self, cfg_id: int, n: int, measured_ms: float) -> None:
        """Learn from a batch of `n` on `cfg_id` that took `measured_ms` (the worker after each forward pass)."""
        self.learned.batches.add(self.menu.batch_ms(cfg_id, n), measured_ms)

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
            head = self.queue[0][2]
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
            if isinstance(planned, Pending):  # shed: answered at once
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
                out, finished = await loop.run_in_executor(self._pool, self._forward, x, cfg_id, started)
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

    def _forward(self, x: torch.Tensor, cfg_id: int, started: float) -> tuple[torch.Tensor, float]:
        """The batch's forward pass and its end, learned here in the worker thread (off the event loop)."""
        with torch.inference_mode():
            out = self.run(x, cfg_id)
        finished = time.perf_counter()
        self.done_batch(cfg_id, len(x), (finished - started) * 1e3)
        return out, finished

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "shed": self.shed_count, "queue_depth": self.depth(),
                "slowdown": self.learned.batches.slowdown, "jitter_ms_p95": self.learned.batches.jitter_ms,
                "after_ms_p95": self.learned.after_ms.value}
