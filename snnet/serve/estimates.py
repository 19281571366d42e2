"""What the scheduler measures while it serves: how long batches take now, and the time from a batch to its answer.

Both are summaries of the recent samples (`Recent`), recomputed when a sample arrives (in the batch worker's thread
or after an answer), never when the dispatch reads them: a read is an attribute access, so the choice of a stitch
costs the same whatever was learned.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: a summary is recomputed at most this often (s): at a batch every 2 ms, once per batch would cost the worker more
#: than the forward pass of a small stitch
RESUMMARISE_S = 0.02
PER_STITCH = 256  # the measured / table ratios kept per stitch (`BatchTimes.ratios`: a mode table's noise)


def quantile(values: list[float], q: float) -> float:
    """numpy's default (linear) quantile of a short list, in plain Python: a few hundred values are sorted faster
    than numpy's call overhead (a summary is recomputed up to once per batch)."""
    x = sorted(values)
    pos = q * (len(x) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (x[hi] - x[lo]) * (pos - lo)


class Recent:
    """The samples of the last `seconds` (at most `most`, never fewer than the last `keep`), summarised by
    `summarise` when a sample is added; `fallback` until `least` samples exist. Thread-safe (the decoding threads
    read the batch times too: the early shed)."""

    def __init__(self, summarise: Callable[[list[tuple[float, ...]]], Any], fallback: Any, seconds: float = 2.0,
                 least: int = 5, most: int = 400, keep: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.summarise, self.fallback = summarise, fallback
        self.seconds, self.least, self.keep, self.clock = seconds, least, keep, clock
        self.samples: collections.deque[tuple[float, ...]] = collections.deque(maxlen=most)  # (time, *sample)
        self.value: Any = fallback
        self._at = -float("inf")
        self._lock = threading.Lock()

    def add(self, *sample: float) -> None:
        with self._lock:
            now = self.clock()
            self.samples.append((now, *sample))
            while len(self.samples) > self.keep and now - self.samples[0][0] > self.seconds:
                self.samples.popleft()
            if len(self.samples) < self.least:
                self.value = self.fallback
            elif now - self._at >= RESUMMARISE_S or len(self.samples) == self.least:
                self.value = self.summarise([x[1:] for x in self.samples])
                self._at = now


    def snapshot(self) -> list[tuple[float, ...]]:
        """The samples kept now, (time, *sample) each, copied under the lock (another thread may be adding)."""
        with self._lock:
            return list(self.samples)


class Quantile(Recent):
    """One quantile of the recent samples; `initial` until `least` exist."""

    def __init__(self, q: float, initial: float, seconds: float = 2.0, least: int = 5, most: int = 400,
                 clock: Callable[[], float] = time.perf_counter):
        super().__init__(lambda xs: quantile([x for x, in xs], q), initial, seconds, least, most, clock=clock)


class BatchTimes:
    """How long a batch takes now: measured ms = slowdown x the latency table's ms + jitter. The slowdown is the
    median of measured / table over the recent batches (the machine's speed now: work beside the server moves it);
    the jitter is the 95th percentile of what the slowdown leaves unexplained (measured - slowdown x table, at
    least 0): preemption and cache misses add milliseconds to a batch, not a factor. `predict` (slowdown x table +
    jitter) is met by ~95 % of batches, `typical` (slowdown x table) by about half. Recent means the batches of the
    last `seconds`, never fewer than the last `keep` (a slow network at a low rate runs a handful of batches in 2 s);
    until `least` exist, the table as measured."""

    def __init__(self, seconds: float = 2.0, least: int = 5, most: int = 400, keep: int = 30,
                 clock: Callable[[], float] = time.perf_counter):
        self.window = Recent(self._fit, (1.0, 0.0), seconds, least, most, keep, clock)
        self.count = 0  # batches measured since start
        self._by_stitch: dict[int, collections.deque[float]] = {}  # cfg_id -> its last `PER_STITCH` ratios
        self._lock = threading.Lock()

    @staticmethod
    def _fit(batches: list[tuple[float, ...]]) -> tuple[float, float]:
        slowdown = quantile([m / t for t, m in batches], 0.5)
        return slowdown, max(0.0, quantile([m - slowdown * t for t, m in batches], 0.95))

    def add(self, table_ms: float, measured_ms: float, cfg_id: int | None = None) -> None:
        if table_ms > 0:
            self.window.add(table_ms, measured_ms)
            with self._lock:
                self.count += 1
                if cfg_id is not None:
                    kept = self._by_stitch.get(cfg_id)
                    if kept is None:
                        kept = self._by_stitch[cfg_id] = collections.deque(maxlen=PER_STITCH)
                    kept.append(measured_ms / table_ms)

    def ratios(self) -> dict[int, list[float]]:
        """Each stitch's last `PER_STITCH` measured / table ratios (its own noise: stitches differ in their tails),
        copied under the lock (the worker thread adds)."""
        with self._lock:
            return {c: list(kept) for c, kept in self._by_stitch.items()}

    @property
    def slowdown(self) -> float:
        return self.window.value[0]

    @property
    def jitter_ms(self) -> float:
        return self.window.value[1]

    def typical(self, table_ms: float) -> float:
        """The batch's time at the machine's typical speed now (about half the batches take longer)."""
        return table_ms * self.window.value[0]

    def predict(self, table_ms: float) -> float:
        """The time ~95 % of such batches stay within (0 for no batch)."""
        slowdown, jitter = self.window.value
        return table_ms * slowdown + jitter if table_ms > 0 else 0.0


class Arrivals:
    """The recent arrivals: their rate over the last `window` seconds (what a `SlackTable` counts) and the rate and
    squared coefficient of variation of the last `gaps` inter-arrival gaps (what a `ModeTable` is looked up by),
    their sums kept as they slide: a few float operations per arrival."""

    def __init__(self, window: float = 2.0, gaps: int = 2048):
        self.window, self.most = window, gaps
        self.times: collections.deque[float] = collections.deque(maxlen=100_000)
        self.gaps: collections.deque[float] = collections.deque()
        self.sum = self.squares = 0.0
        self.last: float | None = None

    def add(self, now: float) -> None:
        self.times.append(now)
        if self.last is not None:
            gap = now - self.last
            self.gaps.append(gap)
            self.sum += gap
            self.squares += gap * gap
            if len(self.gaps) > self.most:
                old = self.gaps.popleft()
                self.sum -= old
                self.squares -= old * old
        self.last = now

    def rate(self, now: float) -> float:
        """Arrivals per second over the last `window` seconds."""
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        return len(self.times) / self.window

    def load(self) -> tuple[float, float] | None:
        """The rate (per second) and CV^2 of the last `gaps` gaps; None before 8 were seen."""
        n = len(self.gaps)
        if n < 8 or self.sum <= 0:
            return None
        mean = self.sum / n
        var = self.squares / n - mean * mean
        return 1.0 / mean, (var if var > 0.0 else 0.0) / (mean * mean)


@dataclass
class Learned:
    """The batch times (`BatchTimes`), the time from the end of a batch to the answer (95th percentile) and the
    time to decode a request before it is queued (median)."""
    batches: BatchTimes = field(default_factory=BatchTimes)
    after_ms: Quantile = field(default_factory=lambda: Quantile(0.95, 0.5))
    before_ms: Quantile = field(default_factory=lambda: Quantile(0.5, 0.0))

    @classmethod
    def on(cls, clock: Callable[[], float], after_ms: float = 0.5) -> Learned:
        """Nothing learned yet, on `clock` (a simulation's virtual clock; tests: an idle server)."""
        return cls(BatchTimes(clock=clock), Quantile(0.95, after_ms, clock=clock), Quantile(0.5, 0.0, clock=clock))
