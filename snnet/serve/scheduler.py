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

Where choosing among all candidates loses, the server narrows the choice (`modes`): under a load heavy or bursty
enough, a slow stitch chosen in a lull holds up the burst that follows (a batch cannot be interrupted), and one
stitch always, or a choice among the few fastest, answers more requests in time. Which serves a load best is
simulated per candidate list and budget (simulate.py `mode_table`, with this server's measured batch times per
stitch and its decoding time, in a process of its own that works only while the server is idle, once `MODE_AFTER`
batches were measured, and again whenever they have grown `REBUILD_FACTOR`-fold) and looked up by the rate and
burstiness (CV^2) of the last `GAPS` arrivals (`ModeTable`, policy.py).

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
import concurrent.futures
import heapq
import itertools
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from snnet.serve.estimates import Arrivals, Learned
from snnet.serve.policy import ModeTable, SlackTable, StitchMenu
from snnet.serve.simulate import VirtualClock, mode_table

if TYPE_CHECKING:  # torch is imported where a batch runs: the mode-table builder's process never needs it
    import torch

Forward = Callable[["torch.Tensor", int], "torch.Tensor"]
NO_DEADLINE = float("inf")
#: at most one heap trim per this many seconds (when the queue runs empty)
TRIM_EVERY_S = 1.0
PROBE_AFTER_S = 1.0  # a server that took no batch for this long runs its head even if hopeless (`probing`)
GAPS = 2048  # the load a mode is looked up by: the rate and CV^2 of the last GAPS inter-arrival gaps
MODE_AFTER = 5  # batches measured before a mode table is simulated: their measured / table ratios are its noise
REBUILD_FACTOR = 8  # a mode table is simulated again once the batches measured have grown this many times
BUDGET_STEP = 1.05  # mode tables are simulated per budget bucket (its lower edge), buckets 5 % apart
_LOG_BUDGET_STEP = math.log(BUDGET_STEP)
_log, _floor = math.log, math.floor  # a global read each in the dispatch, not an attribute of math
_LIBC: Any = None  # glibc's malloc_trim once looked up; False where there is none


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing; True if it ran).

    Once glibc's dynamic mmap threshold has risen (it does when a large block is freed: loading a checkpoint frees
    hundreds of MiB of them), freed activations and tensors stay in the heap, so a server's memory stays at its
    peak. The server trims after its set-up and whenever its queue runs empty (at most once a second)."""
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
    """One request in the queue. `candidates`: cfg_ids it may run, best first; `deadline`: perf_counter seconds;
    `lane`: its candidates' `Lane`, set when it is queued."""
    x: torch.Tensor | None  # None: a simulated request
    candidates: Sequence[int]  # a tuple once queued
    arrival: float
    deadline: float = NO_DEADLINE
    future: asyncio.Future | None = None
    seq: int = 0
    lane: Lane | None = None


class Lane:
    """One candidate list as the dispatch reads it, made once per list (`Choices.lane`) and held by every request
    queued with it, so that a choice hashes no tuple: the list, its one stitch (None for a choice), its fastest
    candidate and that one's batch-1 table ms, its `SlackTable` (None for one stitch) and its mode tables by
    budget bucket (`Choices.mode`; dicts shared with the other schedulers of the menu, as the tables are)."""

    __slots__ = ("candidates", "single", "fastest", "fastest_ms", "table", "modes", "built", "building")

    def __init__(self, candidates: tuple[int, ...], fastest: int, fastest_ms: float, table: SlackTable | None,
                 modes: dict[int, ModeTable | None], built: dict[int, int]):
        self.candidates, self.fastest, self.fastest_ms, self.table = candidates, fastest, fastest_ms, table
        self.single = candidates[0] if len(candidates) == 1 else None
        self.modes, self.built = modes, built  # budget bucket -> its mode table; -> batches measured when built
        self.building: set[int] = set()  # buckets whose table a thread is simulating now


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


@dataclass(frozen=True)
class Rule:
    """How the dispatch batches and chooses: `max_batch` and `max_wait_ms` (a batching wait when the queue is
    shorter), `shed` (answer a hopeless head at once), the choice's knobs that the replay tunes (`arrivals`: count
    the arrivals a batch holds up; `rest_on_same`: the queue behind the head runs on its stitch, else the fastest;
    `modes`: run one stitch always where the measured load makes that better) and `build_now` (simulate a
    mode table at once, as a simulation wants, not in a thread of its own)."""
    max_batch: int = 16
    max_wait_ms: float = 0.0
    shed: bool = False
    arrivals: bool = True
    rest_on_same: bool = True
    modes: bool = True
    build_now: bool = False


class _Closed(Exception):
    """A mode table's build stopped by the server's close."""


class _Builder:
    """The process that simulates a server's mode tables (one at a time, at nice 19). A simulation is seconds of
    Python: in the server's own interpreter it shared the GIL, the garbage collector and the cores with the request
    path, and a full collection it set off (half a second of CPU here, more when the niced thread that held the GIL
    got no core) held every client. Apart, it costs the server nothing but the core it may use while idle.
    `idle`: set while the server has nothing to do (the builder waits for it between simulations, so a table being
    built never takes the core from a forward pass); `closed`: the server stopped (a build stops at its next wait)."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # not a fork of a process with torch's threads
        self.idle, self.closed = context.Event(), context.Event()  # both clear: made by a dispatch, so busy
        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=_builder_started,
                                                           initargs=(self.idle, self.closed))


_BUILDER_EVENTS: tuple[Any, Any] | None = None  # in the builder's process: the server's (idle, closed) events


def _builder_started(idle: Any, closed: Any) -> None:
    global _BUILDER_EVENTS
    _BUILDER_EVENTS = (idle, closed)
    try:
        os.nice(19)  # the forward passes and the event loop come first
    except OSError:
        pass


def _builder_pause() -> None:
    """The builder's wait between simulations: until the server is idle; a closed server's build stops."""
    assert _BUILDER_EVENTS is not None
    idle, closed = _BUILDER_EVENTS
    idle.wait()
    if closed.is_set():
        raise _Closed


def _simulate_apart(menu: StitchMenu, rule: Rule, window: float, candidates: tuple[int, ...], bucket: int,
                    before_ms: float, ratios: Mapping[int, Sequence[float]]) -> ModeTable:
    """`Choices.simulate` in the builder's process (its own table cache; no forward pass runs in a simulation)."""
    return Choices(menu, rule, None, window, {}).simulate_from(candidates, bucket, before_ms, ratios, _builder_pause)


class Choices:
    """The choice tables of one menu and rule: a `SlackTable` per candidate list (built when first needed, or at
    start by `prepare`) and a `ModeTable` per candidate list and budget bucket (simulated once the server measured
    `MODE_AFTER` batches and again at `REBUILD_FACTOR` times as many, in a process of its own). `shared`: a cache
    shared with other schedulers of this menu (a simulation replaying many traces builds each table once))."""

    def __init__(self, menu: StitchMenu, rule: Rule, run: Forward | None, window: float, shared: dict):
        self.menu, self.rule, self.run, self.window, self.shared = menu, rule, run, window, shared
        self.slack: dict[tuple[int, ...], SlackTable] = \
            shared.setdefault((rule.max_batch, rule.arrivals, rule.rest_on_same), {})
        kind = (rule.max_batch, rule.arrivals, rule.rest_on_same, rule.shed)
        # candidates -> {budget bucket: its mode table}, and -> {budget bucket: the batches measured when built}
        self.modes: dict[tuple[int, ...], dict[int, ModeTable | None]] = shared.setdefault(("modes", *kind), {})
        self.built: dict[tuple[int, ...], dict[int, int]] = shared.setdefault(("built", *kind), {})
        self.lanes: dict[tuple[int, ...], Lane] = {}
        # (candidates, budget bucket) -> the batches measured when the table in use was simulated (GET / reports it)
        self.simulated_from: dict[tuple[tuple[int, ...], int], int] = {}
        # made at the first build; it simulates only while the server is idle (`busy`, `free`): under a load that
        # never lets up, the server serves without modes until the load leaves it idle
        self.builder: _Builder | None = None

    def table(self, candidates: tuple[int, ...]) -> SlackTable:
        known = self.slack.get(candidates)
        if known is None:
            r = self.rule
            known = self.slack[candidates] = SlackTable(self.menu, candidates, r.max_batch, r.arrivals,
                                                        r.rest_on_same)
        return known

    def lane(self, candidates: tuple[int, ...]) -> Lane:
        """The `Lane` of a candidate list (made, with its slack table, when first asked for)."""
        known = self.lanes.get(candidates)
        if known is None:
            table = self.table(candidates) if len(candidates) > 1 else None
            fastest = candidates[0] if table is None else table.fastest
            known = self.lanes[candidates] = Lane(candidates, fastest, self.menu.batch_ms(fastest, 1), table,
                                                  self.modes.setdefault(candidates, {}),
                                                  self.built.setdefault(candidates, {}))
        return known

    def fastest(self, candidates: tuple[int, ...]) -> int:
        """The fastest of a candidate list, making nothing: the handler's decoding threads ask it (a lane and its
        table are made only where requests are queued, on the event loop)."""
        known = self.lanes.get(candidates)
        return self.menu.fastest(candidates) if known is None else known.fastest

    def mode(self, lane: Lane, budget_ms: float, load: tuple[float, float] | None, learned: Learned) -> Lane | None:
        """The candidates every request of `lane` with this budget (ms from arrival to its batch's end) is chosen
        among at `load` (the arrivals' rate and CV^2): one stitch, the fastest few (their lane), or None: all of
        them. A lookup in the lane's `ModeTable` of the budget bucket; None until `MODE_AFTER` batches were
        measured, 8 arrivals seen and the table simulated (from what `learned` holds then; again, while the last
        one serves, once the batches measured have grown `REBUILD_FACTOR`-fold)."""
        count = learned.batches.count
        if load is None or budget_ms <= 0 or count < MODE_AFTER:
            return None
        bucket = _floor(_log(budget_ms) / _LOG_BUDGET_STEP)
        built = lane.built.get(bucket)
        if built is None or (count >= REBUILD_FACTOR * built and bucket not in lane.building):
            lane.built[bucket] = count
            lane.modes.setdefault(bucket, None)  # switching until the first is simulated; then the last one
            if self.rule.build_now:
                self._take_over(lane, bucket, self.simulate(lane.candidates, bucket, learned))
            else:
                self._build(lane, bucket, learned)
        table = lane.modes[bucket]
        if table is None:
            return None
        fewer = table.choose(load[0], load[1])
        return None if fewer is None else self.lane(fewer)

    def _build(self, lane: Lane, bucket: int, learned: Learned) -> None:
        """Start the bucket's simulation in the builder's process (from what `learned` holds now); the table is
        taken over when it is done."""
        t0 = time.perf_counter()
        try:
            if self.builder is None:
                self.builder = _Builder()
            future = self.builder.pool.submit(_simulate_apart, self.menu, self.rule, self.window, lane.candidates,
                                              bucket, learned.before_ms.value, learned.batches.ratios())
        except Exception as e:  # a builder that died (killed, out of memory): a new one at the next build
            self.builder = None
            self._failed(lane, e)
            return
        lane.building.add(bucket)
        future.add_done_callback(lambda done: self._built(lane, bucket, done, t0))

    def _built(self, lane: Lane, bucket: int, done: concurrent.futures.Future, t0: float) -> None:
        lane.building.discard(bucket)
        if done.cancelled() or isinstance(done.exception(), _Closed):
            return
        if done.exception() is not None:
            self._failed(lane, done.exception())
            return
        table = done.result()
        self._take_over(lane, bucket, table)
        print(f"snnet serve: stitches {list(lane.candidates)} within {BUDGET_STEP ** bucket:.1f} ms simulated from "
              f"{lane.built[bucket]} measured batches in {time.perf_counter() - t0:.1f} s: {table.describe()}",
              file=sys.stderr, flush=True)

    @staticmethod
    def _failed(lane: Lane, e: BaseException | None) -> None:
        """The server goes on with the table it had (switching before the first); this says why."""
        print(f"snnet serve: stitches {list(lane.candidates)}: the mode table failed ({type(e).__name__}: {e}); "
              f"keeping the previous one", file=sys.stderr, flush=True)

    def simulate(self, candidates: tuple[int, ...], bucket: int, learned: Learned) -> ModeTable:
        """The candidates' `ModeTable` at the bucket's lower budget edge, simulated here with this rule and what
        `learned` measured: the batches' measured / table ratios and the decoding time."""
        return self.simulate_from(candidates, bucket, learned.before_ms.value, learned.batches.ratios())

    def simulate_from(self, candidates: tuple[int, ...], bucket: int, before_ms: float,
                      ratios: Mapping[int, Sequence[float]], pause: Callable[[], Any] | None = None) -> ModeTable:
        """`simulate` from the decoding time and the measured / table ratios; `pause`: the builder's wait."""
        def make(clock: VirtualClock) -> DeadlineScheduler:
            r = self.rule
            made = DeadlineScheduler(self.run, self.menu, r.max_batch, shed=r.shed, arrivals=r.arrivals,
                                     rest_on_same=r.rest_on_same, modes=False, window=self.window, clock=clock,
                                     tables=self.shared)
            made.learned = Learned.on(clock, after_ms=0.0)  # the budget simulated is what is left for the batch
            return made

        return mode_table(self.menu, candidates, BUDGET_STEP ** bucket, self.rule.max_batch, make,
                          lambda c, t, d: Pending(None, c, t, d), before_ms, ratios, GAPS, pause=pause)

    def _take_over(self, lane: Lane, bucket: int, table: ModeTable) -> None:
        """A simulated table is looked up from now on; GET / reports it with the batches measured when it was asked
        for (`lane.built`: no other build of the bucket starts while one runs, and the simulation reads the
        measurements as it starts)."""
        lane.modes[bucket] = table
        self.simulated_from[(lane.candidates, bucket)] = lane.built[bucket]

    def busy(self) -> None:
        """A request came: a mode table being built waits."""
        if self.builder is not None:
            self.builder.idle.clear()

    def free(self) -> None:
        """Nothing to serve: a mode table may be built now."""
        if self.builder is not None:
            self.builder.idle.set()

    def close(self) -> None:
        if self.builder is not None:
            self.builder.closed.set()
            self.builder.idle.set()  # a build waiting for an idle moment stops (its process is not left blocked)
            self.builder.pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Worker:
    """The worker task, its wake-up event and its thread (the forward passes), and when it last trimmed the heap."""
    wake: asyncio.Event | None = None
    task: asyncio.Task | None = None
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    trimmed: float = -math.inf


class DeadlineScheduler:
    """`await submit(job)` -> Done. One worker thread runs the batches one after another; the event loop keeps
    accepting requests meanwhile. `admit` and `take` are the worker's steps on any clock (simulate.py `replay` runs
    them on a virtual one); `done_batch` is what the worker learns from a batch. The keyword arguments are `Rule`'s;
    `window`: the seconds of arrivals the rate counts; `tables`: `Choices`' shared cache."""

    def __init__(self, run: Forward | None, menu: StitchMenu, max_batch: int = 16, max_wait_ms: float = 0.0,
                 shed: bool = False, arrivals: bool = True, rest_on_same: bool = True, modes: bool = True,
                 window: float = 2.0, clock: Callable[[], float] = time.perf_counter, tables: dict | None = None,
                 build_now: bool = False):
        self.run, self.menu = run, menu
        self.rule = Rule(max(1, max_batch), max_wait_ms, shed, arrivals, rest_on_same, modes, build_now)
        self.choices = Choices(menu, self.rule, run, window, tables if tables is not None else {})
        self.arrivals = Arrivals(window, GAPS)
        self.learned = Learned.on(clock)
        self.clock = clock
        self.queue: list[tuple[float, int, Pending]] = []  # a heap of (deadline, arrival order, request)
        self.running: tuple[int, int, float] | None = None  # (cfg_id, batch size, start) of the batch running
        self.batches = self.shed_count = 0
        self.last_start = -math.inf  # when the last batch was taken (the clock of `take`)
        self._seq = itertools.count()
        self._worker = _Worker()

    # ------------------------------------------------------------------------------------------ the queue
    def depth(self) -> int:
        return len(self.queue) + (self.running[1] if self.running else 0)

    async def submit(self, job: Pending) -> Done:
        loop = asyncio.get_running_loop()
        w = self._worker
        if w.task is None or w.task.done():
            w.wake = asyncio.Event()
            w.task = loop.create_task(self._loop())
        job.future = loop.create_future()
        self.choices.busy()
        self.admit(job, time.perf_counter())
        assert w.wake is not None
        w.wake.set()
        return await job.future

    def admit(self, job: Pending, now: float) -> None:
        """Queue `job`, arrived at `now` (the server's `submit`; a simulation's virtual clock)."""
        job.candidates = tuple(job.candidates)
        job.lane = self.choices.lane(job.candidates)
        job.seq = next(self._seq)
        self.arrivals.add(now)
        heapq.heappush(self.queue, (job.deadline, job.seq, job))

    def prepare(self, candidates: Sequence[int]) -> None:
        """Build the table of a candidate list now (the server does it at start for every FLOPs budget's front,
        so that no request waits for one)."""
        self.choices.lane(tuple(candidates))

    def take(self, now: float) -> tuple[int, list[Pending]] | Pending | None:
        """`plan(now)`, acted on: the batch (or the shed head) leaves the queue. The worker's one step."""
        planned = self.plan(now)
        if planned is None:
            return None
        if isinstance(planned, Pending):
            heapq.heappop(self.queue)
            self.shed_count += 1
            return planned
        queue, most, pop = self.queue, self.rule.max_batch, heapq.heappop
        head = pop(queue)[2]  # the head may run it: it was chosen for the head
        batch: list[Pending] = [head]
        lane = head.lane  # a request of the head's lane may run it too (no search of its candidates)
        aside: list[tuple[float, int, Pending]] | None = None  # allocated only when a request cannot join
        while queue and len(batch) < most:
            entry = pop(queue)
            job = entry[2]
            if job.lane is lane or planned in job.candidates:
                batch.append(job)
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

    def too_late(self, candidates: Sequence[int], arrival: float, deadline: float, now: float) -> Shed | None:
        """The `Shed` for a request that cannot meet its deadline even on its fastest candidate at batch 1 at the
        machine's typical speed, started now; None when it can, has no deadline, or the server does not shed.
        The dispatch asks it of the head; the handler asks it before decoding the image (an early shed).
        Thread-safe."""
        if not self.rule.shed or deadline == NO_DEADLINE:
            return None
        fastest = self.typical_ms(self.choices.fastest(tuple(candidates)), 1)
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
        empty. Does not change the queue: a heap read, two table lookups and a few float operations."""
        queue = self.queue
        if not queue:
            return None
        head = queue[0][2]
        lane: Lane = head.lane  # type: ignore[assignment]
        deadline = head.deadline
        if deadline == NO_DEADLINE:
            return lane.candidates[0]
        rule, learned = self.rule, self.learned
        slowdown, jitter = learned.batches.window.value
        after_ms = learned.after_ms.value
        left_ms = (deadline - now) * 1e3 - after_ms
        if rule.shed and left_ms < slowdown * lane.fastest_ms and not self.probing(now):
            return head
        if lane.single is not None:
            return lane.single
        budget_ms = (deadline - head.arrival) * 1e3 - after_ms
        if rule.modes:
            fewer = self.choices.mode(lane, budget_ms, self.arrivals.load(), learned)
            if fewer is not None:
                if fewer.single is not None:
                    return fewer.single
                lane = fewer
        rate = self.arrivals.rate(now) * slowdown if rule.arrivals else 0.0
        return lane.table.choose((left_ms - jitter) / slowdown, (budget_ms - jitter) / slowdown,  # type: ignore[union-attr]
                                 len(queue), rate)

    def done_batch(self, cfg_id: int, n: int, measured_ms: float) -> None:
        """Learn from a batch of `n` on `cfg_id` that took `measured_ms` (the worker after each forward pass)."""
        self.learned.batches.add(self.menu.batch_ms(cfg_id, n), measured_ms, cfg_id)

    # ------------------------------------------------------------------------------------------ the worker
    async def _loop(self) -> None:
        import torch
        w = self._worker
        assert w.wake is not None
        loop = asyncio.get_running_loop()
        if w.pool is None:
            w.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="snnet-batch")
        max_wait = self.rule.max_wait_ms / 1e3
        while True:
            if not self.queue:
                if time.perf_counter() - w.trimmed > TRIM_EVERY_S:  # idle: give freed activations back
                    w.trimmed = time.perf_counter()
                    release_free_heap()
                w.wake.clear()
                self.choices.free()
                await w.wake.wait()
                continue
            head = self.queue[0][2]
            if max_wait > 0 and len(self.queue) < self.rule.max_batch:
                left = head.arrival + max_wait - time.perf_counter()
                if left > 0:
                    w.wake.clear()
                    try:
                        await asyncio.wait_for(w.wake.wait(), left)
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
                out, finished = await loop.run_in_executor(w.pool, self._forward, x, cfg_id, started)
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

    def observe_before(self, ms: float) -> None:
        """The handler's time to decode and transform a request's image (before it is queued)."""
        self.learned.before_ms.add(ms)

    def observe_after(self, ms: float) -> None:
        """The handler's time from a batch's end to the answer (softmax, top-k, the event loop's delay)."""
        self.learned.after_ms.add(ms)

    def _forward(self, x: torch.Tensor, cfg_id: int, started: float) -> tuple[torch.Tensor, float]:
        """The batch's forward pass and its end, learned here in the worker thread (off the event loop)."""
        import torch
        assert self.run is not None
        with torch.inference_mode():
            out = self.run(x, cfg_id)
        finished = time.perf_counter()
        self.done_batch(cfg_id, len(x), (finished - started) * 1e3)
        return out, finished

    def close(self) -> None:
        w = self._worker
        if w.task is not None:
            w.task.cancel()
        if w.pool is not None:
            w.pool.shutdown(wait=False, cancel_futures=True)
        self.choices.close()

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "shed": self.shed_count, "queue_depth": self.depth(),
                "slowdown": self.learned.batches.slowdown, "jitter_ms_p95": self.learned.batches.jitter_ms,
                "after_ms_p95": self.learned.after_ms.value,
                "mode_tables": sum(t is not None for by in self.choices.modes.values() for t in by.values()),
                "mode_tables_from": [[list(c), b, n] for (c, b), n in sorted(self.choices.simulated_from.items())]}
