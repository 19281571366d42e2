"""Which stitch answers a request: the served stitches and their ranking (`StitchMenu`), and the dispatch's choice
under load (`SlackTable`).

The ranking is `snnet select`'s (results/select.py `select`: the highest top-1 within the budget, ties to fewer
FLOPs, params, lower cfg_id). A FLOPs budget is a property of the stitch: load does not change it, and a request
without a latency budget gets `select`'s stitch (`StitchMenu.choose`). A latency budget is a deadline: the
scheduler (scheduler.py) binds the stitch at dispatch by a lookup in the `SlackTable` of the request's candidates
(the latency front within its FLOPs budget, `StitchMenu.front`). Batch times come from the latency table (`snnet
latency`'s measurement, deploy/latency.py) at batch 1 and the largest batch, linearly between (a batch larger
than the largest runs as several). A budget that no stitch meets even on an idle server is the client's error
(`BudgetError`, HTTP 422), with the closest stitch named.
"""
from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from snnet.results.select import BudgetError, Record, best_key, select
from snnet.utils.errors import SNNetError

_log, _ceil = math.log, math.ceil  # a global read each in the dispatch, not an attribute of math

#: how the request names each limit (the errors of `select` say which one to change)
FLAGS = {"flops": "budget.flops", "latency_ms": "budget.latency_ms"}


@dataclass(frozen=True)
class Choice:
    """The chosen stitch, the server time predicted for the request (None without a latency budget) and whether
    that prediction meets the budget."""
    cfg_id: int
    predicted_ms: float | None
    within_budget: bool


class StitchMenu:
    """The stitches a server can run, their records (top-1, FLOPs, params) and batch latencies.

    `records`: one per servable stitch (the results file's, costs at the served size); `latency`: cfg_id ->
    {batch size: ms per batch}, at least batch 1 for every record.
    """

    def __init__(self, records: Sequence[Record], latency: Mapping[int, Mapping[int, float]], source: str):
        if not records:
            raise SNNetError(f"{source!r} holds no stitch this server can run; pass the results of this checkpoint")
        missing = [r["cfg_id"] for r in records if 1 not in latency.get(r["cfg_id"], {})]
        if missing:
            raise SNNetError(f"no batch-1 latency for cfg_ids {missing}; measure them (snnet latency --batch 1)")
        self.records = sorted((dict(r) for r in records), key=lambda r: r["cfg_id"])
        self.by_id = {r["cfg_id"]: r for r in self.records}
        self.latency = {c: dict(sorted(latency[c].items())) for c in self.by_id}
        self.source = source
        for r in self.records:  # the idle latency of one request: a budget below every one of them is refused
            r["latency_ms"] = self.latency[r["cfg_id"]][1]
        if lacking := [r["cfg_id"] for r in self.records if "acc1" not in r or r.get("flops") is None]:
            raise SNNetError(f"{source!r} lacks top-1 or FLOPs of cfg_ids {lacking}; pass a complete evaluation")
        self.ranked = sorted(self.records, key=best_key, reverse=True)  # select's ranking, best first
        self._batch: dict[tuple[int, int], float] = {}  # (cfg_id, n) -> batch_ms: the scheduler asks thousands of times
        self._flops = sorted(r["flops"] for r in self.records)  # a FLOPs budget admits a prefix of these
        self._front: dict[int, tuple[int, ...]] = {}  # stitches within a FLOPs budget -> their front

    def fastest(self, candidates: Sequence[int]) -> int:
        """The candidate whose batch of 1 takes the least ms (the first listed on a tie): where a choice falls back
        to, and what shedding is decided on."""
        return min(candidates, key=lambda c: self.latency[c][1])

    @property
    def cfg_ids(self) -> list[int]:
        return list(self.by_id)

    def batch_ms(self, cfg_id: int, n: int) -> float:
        """Predicted ms to run `n` queued requests of one stitch (0 for none)."""
        if n <= 0:
            return 0.0
        known = self._batch.get((cfg_id, n))
        if known is None:
            known = self._batch[cfg_id, n] = self._batch_ms(cfg_id, n)
        return known

    def _batch_ms(self, cfg_id: int, n: int) -> float:
        table = self.latency[cfg_id]
        sizes = list(table)
        largest = sizes[-1]
        full, rest = divmod(n, largest)
        total = full * table[largest]
        if rest:
            i = bisect.bisect_left(sizes, rest)
            if sizes[i] == rest or i == 0:
                total += table[sizes[i]]
            else:  # linear between the measured sizes around it
                lo, hi = sizes[i - 1], sizes[i]
                total += table[lo] + (table[hi] - table[lo]) * (rest - lo) / (hi - lo)
        return total

    def front(self, flops: float | None = None) -> list[int]:
        """The candidates of a request with this FLOPs budget (None: any), best first by `ranked`, without the
        stitches another candidate beats: a higher top-1 (or the same, and ranked before it by select's rule: fewer
        FLOPs, params, lower cfg_id) and at most its latency at every measured batch size (so at every batch size:
        `batch_ms` is linear between them). A top-1 tie is never decided by the measured latency, so the same
        stitches are weighed on every start of the server whenever their speeds keep their order.

        The dispatch never needs a beaten stitch: wherever it would fit, the stitch beating it fits too and ranks
        first, so dropping it changes no choice and each table weighs fewer stitches. The latencies are the
        server's table (measured on its machine), so the front is too."""
        k = len(self._flops) if flops is None else bisect.bisect_right(self._flops, flops)
        known = self._front.get(k)
        if known is None:
            within = [r["cfg_id"] for r in self.ranked if flops is None or r["flops"] <= flops]
            sizes = sorted({b for c in within for b in self.latency[c]})
            cost = {c: [self.batch_ms(c, b) for b in sizes] for c in within}
            acc = {c: float(self.by_id[c]["acc1"]) for c in within}

            def beats(t: int, s: int, t_first: bool) -> bool:  # a top-1 tie goes by select's rule, not speed
                if acc[t] < acc[s] or any(a > b for a, b in zip(cost[t], cost[s])):
                    return False
                return acc[t] > acc[s] or t_first

            known = self._front[k] = tuple(s for i, s in enumerate(within)
                                           if not any(beats(t, s, j < i) for j, t in enumerate(within) if t != s))
        return list(known)

    def choose(self, latency_ms: float | None = None, flops: float | None = None) -> Choice:
        """`select`'s stitch for a budget on an idle server: the most accurate within the FLOPs budget whose batch-1
        latency fits the latency budget. Raises BudgetError when none does (the server's 422)."""
        limits: dict[str, float] = {"flops": flops} if flops is not None else {}
        if latency_ms is None:
            return Choice(select(self.records, limits, None, self.source, FLAGS)[0]["cfg_id"], None, True)
        for r in self.ranked:  # select's rule without building records per request: the first that fits
            if (flops is None or r["flops"] <= flops) and r["latency_ms"] <= latency_ms:
                return Choice(r["cfg_id"], r["latency_ms"], True)
        # none fits: select raises, naming the closest stitch and the budget to ask for
        select(self.records, {**limits, "latency_ms": latency_ms}, None, self.source, FLAGS)
        raise AssertionError("select found a stitch the ranking did not")  # pragma: no cover


class SlackTable:
    """The dispatch's choice for one candidate list, precomputed: (the head's slack, its budget, the queue's depth,
    the arrival rate) -> the stitch its batch runs. SuperServe's SlackFit, with the queue and the arrivals counted.

    The choice is the first candidate (best first: select's ranking) that *fits* twice:
    * the queue: its batch of b = min(depth, max_batch) requests, then the rest of the queue (depth - b) run in
      batches of `max_batch`, end within the head's slack;
    * the arrivals (with `arrivals`): the requests expected to arrive while its batch runs (rate x its time, to the
      nearest whole), arriving as it starts and then run in batches of `max_batch`, end within one budget (the
      head's: a batch cannot be interrupted, so an arrival waits for all of it; this is the blocking term of
      non-preemptive EDF, from the measured rate).
    The rest and the arrivals run on that same stitch (`rest_on_same`) or on the fastest. Nothing fits: the fastest.

    Two precomputed bit masks per bucket, one for each check ((slack, depth) and (batch size, rate, budget): the
    arrivals' check depends on the depth only through the batch), in the narrowest word that holds the candidates
    (16 bits for up to 16: small tables stay in the cache); the choice is their AND's lowest bit: a few float
    operations and two array reads whatever the queue (`choose`; benchmarks/serve_plan.py measures it). Everything
    is in the latency table's milliseconds (`StitchMenu.batch_ms`): the scheduler converts the slack, budget and
    rate it measures with the learned slowdown and jitter, so no table is rebuilt when the machine's speed drifts.
    A bucket's lower slack and budget edge and upper rate edge are used, so a choice that fits the bucket fits the
    request (slack and budget buckets 3 % apart, rate buckets 25 %); a deeper queue than the table's counts as its
    deepest; arrivals faster than 4x what the fastest sustains choose the fastest."""

    SLACK_STEP, RATE_STEP = 1.03, 1.25

    def __init__(self, menu: StitchMenu, candidates: Sequence[int], max_batch: int, arrivals: bool = True,
                 rest_on_same: bool = True):
        self.ids = list(candidates)
        self.max_batch = b_max = max(1, max_batch)
        self.fastest = menu.fastest(self.ids)
        sizes = {c: np.array([0.0] + [menu.batch_ms(c, n) for n in range(1, b_max + 1)]) for c in self.ids}

        def drain(n: np.ndarray, c: int) -> np.ndarray:  # ms to run n requests on c, in full batches
            return n // b_max * sizes[c][b_max] + sizes[c][n % b_max]

        self.depths = d_max = max(64, 8 * b_max)
        self.lo = 0.5 * menu.batch_ms(self.fastest, 1)
        hi = 2.0 * max(sizes[c][b_max] + float(drain(np.array(d_max + b_max), c)) for c in self.ids)
        self.n_slack = int(math.ceil(math.log(hi / self.lo) / math.log(self.SLACK_STEP))) + 1
        edges = self.lo * self.SLACK_STEP ** np.arange(self.n_slack)
        capacity = b_max / sizes[self.fastest][b_max] * 1e3  # requests/s the fastest sustains
        self.rate_lo = 0.01 * capacity
        self.n_rate = int(math.ceil(math.log(400.0) / math.log(self.RATE_STEP))) + 2 if arrivals else 1
        rates = np.concatenate([[0.0], self.rate_lo * self.RATE_STEP ** np.arange(self.n_rate - 1)])
        self._log_slack, self._log_rate = math.log(self.SLACK_STEP), math.log(self.RATE_STEP)
        bits, code, dtype = next(w for w in ((16, "H", np.uint16), (32, "I", np.uint32), (64, "Q", np.uint64))
                                 if len(self.ids) <= w[0] or w[0] == 64)
        self.bits, self.words = bits, -(-len(self.ids) // bits)
        queue = np.zeros((self.words, self.n_slack, d_max), dtype)
        room = np.zeros((self.words, b_max, self.n_rate, self.n_slack), dtype)
        depth = np.arange(1, d_max + 1)
        batch = np.minimum(depth, b_max)
        for i, c in enumerate(self.ids):
            word, bit = divmod(i, bits)
            rest = c if rest_on_same else self.fastest
            t = sizes[c][batch]
            fits = edges[:, None] >= (t + drain(depth - batch, rest))[None, :]
            queue[word][fits] |= dtype(1 << bit)
            t = sizes[c][1:]  # batches of 1..max_batch
            coming = np.floor(rates[None, :] * t[:, None] / 1e3 + 0.5).astype(np.int64)
            fits = edges[None, None, :] >= (t[:, None] + drain(coming, rest))[:, :, None]
            room[word][fits] |= dtype(1 << bit)
        self._queue, self._room = array(code), array(code)
        self._queue.frombytes(queue.tobytes())
        self._room.frombytes(room.tobytes())
        # what `choose` reads, in one tuple: a dispatch unpacks it at once rather than reading a dozen attributes
        self._read = (self.lo, self.n_slack - 1, self._log_slack, self.rate_lo, self.n_rate, self._log_rate, d_max,
                      b_max, self._queue, self._room, self.ids, self.fastest, self.words, bits)

    def choose(self, slack_ms: float, budget_ms: float, depth: int, rate: float = 0.0) -> int:
        """The stitch for a head with `slack_ms` left of its `budget_ms` (table ms), `depth` requests queued
        (itself included) and `rate` arrivals per table second."""
        lo, top, step, rate_lo, n_rate, log_rate, depths, b_max, queue, room, ids, fastest, words, bits = self._read
        if slack_ms < lo:
            return fastest
        i = int(_log(slack_ms / lo) / step)  # the slack's bucket (its lower edge)
        if i > top:
            i = top
        if budget_ms <= slack_ms:
            k = i
        else:
            k = int(_log(budget_ms / lo) / step)
            if k > top:
                k = top
        if rate <= 0.0 or n_rate == 1:
            j = 0
        elif rate <= rate_lo:
            j = 1
        else:
            j = int(_ceil(_log(rate / rate_lo) / log_rate)) + 1
            if j >= n_rate:  # arrivals beyond 4x what the fastest sustains: nothing else can keep up
                return fastest
        d = (depth if depth < depths else depths) - 1 if depth > 1 else 0
        b = d if d < b_max else b_max - 1  # the batch's size - 1
        n_slack = top + 1
        if words == 1:  # up to 16 (32, 64) candidates: every menu so far
            m = queue[i * depths + d] & room[(b * n_rate + j) * n_slack + k]
            return ids[(m & -m).bit_length() - 1] if m else fastest
        for w in range(words):
            m = queue[(w * n_slack + i) * depths + d] & room[((w * b_max + b) * n_rate + j) * n_slack + k]
            if m:
                return ids[w * bits + (m & -m).bit_length() - 1]
        return fastest


class ModeTable:
    """(arrival rate, its squared coefficient of variation) -> the candidates one candidate list and budget switches
    among: None for all of them (the `SlackTable`'s choice per batch), one stitch (it runs always) or the fastest
    few. Built by simulation (simulate.py `mode_table`) at the server's speed: where the load is heavy or bursty
    enough, fewer, faster stitches answer more requests correctly in time than a choice among all of them (a slow
    stitch chosen in a lull holds up the burst behind it: a batch cannot be interrupted).

    Each simulated load (`rates` x `rows`, row-major, as `modes`; a row is a kind of arrivals: gamma of a CV^2, or
    on/off bursts) sits in the table at the rate and CV^2 the server *measures* on it (`cells`: the medians of its
    estimate; without them a row's CV^2 as it is). A lookup takes the nearest cell (log rate, half the log CV^2),
    read from a grid precomputed when the table is built: two logarithms and an array read."""

    STEP = 0.05  # the grid's resolution in log units

    def __init__(self, rates: Sequence[float], rows: Sequence[float | str], modes: Sequence[tuple[int, ...] | None],
                 cells: Sequence[tuple[float, float]] | None = None):
        if len(modes) != len(rates) * len(rows):
            raise ValueError(f"{len(modes)} modes for {len(rates)} rates x {len(rows)} kinds of arrivals")
        self.rates, self.rows, self.modes = list(rates), list(rows), list(modes)
        if cells is None:
            if not all(isinstance(c, (int, float)) for c in self.rows):
                raise ValueError("rows named by kind (not by CV^2) need the cells they were measured at")
            cells = [(r, float(c)) for r in self.rates for c in self.rows]
        x = np.log([max(r, 1e-9) for r, _ in cells])
        y = 0.5 * np.log([max(c, 1e-3) for _, c in cells])
        self.x0, self.y0 = float(x.min()) - 1.0, float(y.min()) - 1.0
        self.nx = int((x.max() + 1.0 - self.x0) / self.STEP) + 1
        self.ny = int((y.max() + 1.0 - self.y0) / self.STEP) + 1
        gx = self.x0 + self.STEP * np.arange(self.nx)
        gy = self.y0 + self.STEP * np.arange(self.ny)
        d = (gx[:, None, None] - x[None, None, :]) ** 2 + (gy[None, :, None] - y[None, None, :]) ** 2
        self._nearest = array("H", d.argmin(-1).astype(np.uint16).ravel().tobytes())
        self._read = (self.x0, self.y0, self.STEP, self.nx - 1, self.ny, self._nearest, self.modes)

    def choose(self, rate: float, cv2: float) -> tuple[int, ...] | None:
        x0, y0, step, i_top, ny, nearest, modes = self._read
        i = int((_log(rate if rate > 1e-9 else 1e-9) - x0) / step)
        j = int((0.5 * _log(cv2 if cv2 > 1e-3 else 1e-3) - y0) / step)
        i = 0 if i < 0 else i_top if i > i_top else i
        j = 0 if j < 0 else ny - 1 if j >= ny else j
        return modes[nearest[i * ny + j]]

    def describe(self) -> str:
        """One line per simulated kind of arrivals: the candidates run at each simulated rate (req/s) where not
        all are."""
        out = []
        for j, row in enumerate(self.rows):
            fixed = [f"{r:.4g}: {'/'.join(map(str, m))}" for i, r in enumerate(self.rates)
                     if (m := self.modes[i * len(self.rows) + j]) is not None]
            out.append((row if isinstance(row, str) else f"CV^2 {row:g}") + ": "
                       + ("switching among all at every simulated rate" if not fixed else
                          "cfg_ids at " + ", ".join(fixed)))
        return "; ".join(out)


def finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


__all__ = ["BudgetError", "Choice", "ModeTable", "SlackTable", "StitchMenu", "FLAGS", "finite_positive"]
