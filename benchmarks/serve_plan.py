"""What a dispatch's choice costs: `DeadlineScheduler.take` (the stitch looked up in its `SlackTable`, the batch
leaving the queue) for SN-Net switching against a fixed network, at queue depths 1 to 128.

`take` runs on the server's event loop between two batches: while it runs, no batch runs and no request is read.
On the digits demo (batches of ~1-3 ms) a choice of a millisecond would be a share of the network's own time that
a fixed network does not pay. The choice is a table lookup (snnet/serve/policy.py): its cost grows little with
the depth, but it is 2 to 4 times a fixed network's dispatch (results/bench_serve_plan.txt).

Each call is timed alone (perf_counter_ns) on a virtual clock, the queue refilled after it, the calls of every
system and depth interleaved in a random order (a slow moment of the machine falls on all of them alike): `depth`
requests 1 µs apart, each with the SLO (3x the largest anchor's batch-1 time) as budget, after 30 batches at the
table's speed and 2048 arrivals at a tenth of what the fastest stitch sustains (so the rate is counted and the
mode looked up, its table simulated before the timing, and the choice is the slack table's, not one stitch the
mode picks alone: the costlier path). The whole measurement runs `--runs` times (5): on the 2-core VM one run's
99th percentile moves by a factor of 3 from one run to the next (slow spells of the machine), so each run's worst
is printed and the table gives each cell's median over the runs.
Menus: the served stitches of both networks in results/serve_calibration.json (benchmarks/serve_replay.py
--calibrate), batches of up to 8; switching weighs the front, fixed the largest anchor.
benchmarks/serve_replay.py --calibrate stores the same measurement and charges it to every batch of its replay.

    .venv/bin/python benchmarks/serve_plan.py [--repeats 5000] [--runs 5] > results/bench_serve_plan.txt

Columns: µs per `take`, median and 99th percentile, switching and fixed (each the median over the runs). Last line:
RESULT choice_p99_us=<the median over the runs of each run's largest switching 99th percentile (every depth and
menu)> worst_run_p99_us=<the largest of them>.
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snnet.serve.policy import StitchMenu  # noqa: E402  (after the path insert: runs from a checkout)
from snnet.serve.scheduler import GAPS, DeadlineScheduler, Pending  # noqa: E402

CALIBRATION = ROOT / "results" / "serve_calibration.json"
DEPTHS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_BATCH = 8


def ready_scheduler(menu: StitchMenu, candidates: list[int], slo_ms: float, depth: int, tables: dict,
                    max_batch: int = MAX_BATCH) -> DeadlineScheduler:
    """A scheduler as a served one stands: 30 batches measured, 2 s of arrivals counted (so its mode table is looked
    up: simulated here, not timed), `depth` requests queued."""
    x = torch.empty(0)
    sched = DeadlineScheduler(lambda x, c: x, menu, max_batch, shed=True, clock=lambda: 1000.0, build_now=True,
                              tables=tables)
    sched.prepare(candidates)
    for c in (list(menu.by_id) * 4)[:30]:
        sched.done_batch(c, 1, menu.batch_ms(c, 1))
    # arrivals at a tenth of what the fastest candidate sustains in full batches: a load at which the mode table
    # leaves the choice to the slack table (the path that costs most; at heavier loads one stitch is often chosen
    # by the mode alone). Python floats, as perf_counter gives the server: numpy scalars would slow the arithmetic.
    fastest = menu.fastest(candidates)
    rate = 0.1 * max_batch / menu.batch_ms(fastest, max_batch) * 1e3
    for t in (998.0 - np.arange(GAPS + 1)[::-1] / rate).tolist():  # the last GAPS gaps at that rate, ending 2 s
        sched.admit(Pending(x, candidates, t, t + slo_ms / 1e3), t)  # before: past hope, shed, leaving their gaps
    while sched.queue:
        sched.take(1000.0)
    for k in range(depth):
        sched.admit(Pending(x, candidates, 1000.0 - k * 1e-6, 1000.0 - k * 1e-6 + slo_ms / 1e3), 1000.0)
    sched.plan(1000.0)
    head = sched.queue[0][2]
    if len(candidates) > 1:  # one candidate has no mode (nor a table simulated for it)
        mode = sched.choices.mode(head.lane, (head.deadline - head.arrival) * 1e3 - sched.learned.after_ms.value,
                                  sched.arrivals.load(), sched.learned)
        assert mode is None or mode.single is None, \
            f"{len(candidates)} candidates at load {sched.arrivals.load()}: the mode table chose {mode.candidates}"
    return sched


def timed_take(sched: DeadlineScheduler) -> float:
    """µs of one `take` at 1000 s; the batch then goes back in the queue as it was, not counted again as arrivals,
    so the queue, load and rate the next call reads are the ones prepared (`ready_scheduler`)."""
    t0 = time.perf_counter_ns()
    planned = sched.take(1000.0)
    us = (time.perf_counter_ns() - t0) / 1e3
    assert isinstance(planned, tuple), "the benchmark's queue must be one the server runs, not shed"
    for j in planned[1]:
        heapq.heappush(sched.queue, (j.deadline, j.seq, j))
    return us


def choice_costs(specs: dict[str, tuple[StitchMenu, list[int], float]], repeats: int, seed: int = 0
                 ) -> dict[str, dict[str, list[float]]]:
    """{name: {depth: [p50 µs, p99 µs]}} of one `take`, `repeats` calls in each cell (a system of `specs` at a
    depth of DEPTHS). The calls are interleaved: each round times one call of every cell, in a random order, so a
    moment when the machine is slow (on a shared 2-core VM a hiccup can last a millisecond, a hundred calls) falls
    on every cell alike rather than on the one being timed then."""
    cells = []
    for name, (menu, candidates, slo_ms) in specs.items():
        tables: dict = {}  # one server's tables: the mode table is simulated once, not at every depth
        cells += [(name, str(d), ready_scheduler(menu, candidates, slo_ms, d, tables)) for d in DEPTHS]
    times = np.empty((len(cells), repeats))
    rng = np.random.default_rng(seed)
    for r in range(repeats):
        for i in rng.permutation(len(cells)):
            times[i, r] = timed_take(cells[i][2])
    out: dict[str, dict[str, list[float]]] = {name: {} for name in specs}
    for i, (name, depth, _) in enumerate(cells):
        out[name][depth] = [float(np.percentile(times[i], 50)), float(np.percentile(times[i], 99))]
    return out


def menu_of(cal: dict) -> tuple[StitchMenu, int, float]:
    """The served menu of one calibrated network (the latency table `snnet serve` measures: medians at batch 1 and
    8), its largest anchor and the SLO."""
    service = {int(c): {int(b): float(np.median(v)) for b, v in t.items()} for c, t in cal["service_ms"].items()}
    menu = StitchMenu(cal["records"], {c: {1: t[1], MAX_BATCH: t[MAX_BATCH]} for c, t in service.items()}, "menu")
    largest = max(cal["anchors"], key=lambda a: menu.by_id[a]["flops"])
    return menu, largest, 3.0 * service[largest][1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5000, help="timed calls per depth and run (default 5000)")
    p.add_argument("--runs", type=int, default=5, help="whole measurements, each interleaved afresh (default 5)")
    p.add_argument("--calibration", type=Path, default=CALIBRATION)
    p.add_argument("--seed", type=int, default=0, help="the random order of the interleaved calls")
    p.add_argument("--note", default="", help="how the machine was kept quiet (printed with the table)")
    args = p.parse_args()
    t_start = time.time()
    saved = json.loads(args.calibration.read_text())
    if args.runs < 1 or args.repeats < 100:
        p.error(f"--runs {args.runs} --repeats {args.repeats}: pass at least 1 run of 100 calls (a 99th percentile)")
    lines = [f"$ .venv/bin/python benchmarks/serve_plan.py --repeats {args.repeats} --runs {args.runs} "
             f"--seed {args.seed}",
             f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}; menus from {args.calibration.name}; cores "
             f"{sorted(os.sched_getaffinity(0))}" + (f"; {args.note}" if args.note else ""), "",
             "| network | queue | switching p50 µs | switching p99 µs | fixed p50 µs | fixed p99 µs |",
             "|---|---:|---:|---:|---:|---:|"]
    specs = {}
    for name, cal in saved["nets"].items():
        menu, largest, slo = menu_of(cal)
        specs[f"{name} switching"] = (menu, menu.front(), slo)
        specs[f"{name} fixed"] = (menu, [largest], slo)
    runs = []
    for r in range(args.runs):  # every system and depth interleaved in a random order, afresh in each run
        runs.append(choice_costs(specs, args.repeats, seed=args.seed + r))
        print(f"run {r + 1}/{args.runs}: {time.time() - t_start:.0f} s", file=sys.stderr, flush=True)
    med = lambda name, d, k: float(np.median([run[name][d][k] for run in runs]))
    for name in saved["nets"]:
        menu = specs[f"{name} switching"][0]
        for d in runs[0][f"{name} switching"]:
            sw, fx = f"{name} switching", f"{name} fixed"
            lines.append(f"| {name} ({len(menu.front())} stitches) | {d} | {med(sw, d, 0):.1f} | {med(sw, d, 1):.1f} "
                         f"| {med(fx, d, 0):.1f} | {med(fx, d, 1):.1f} |")
    worst = [max(p99 for name, cells in run.items() if name.endswith("switching") for _, p99 in cells.values())
             for run in runs]
    fixed = [max(p99 for name, cells in run.items() if name.endswith("fixed") for _, p99 in cells.values())
             for run in runs]
    lines += ["", "each run's largest 99th percentile, in the order run: switching "
              + ", ".join(f"{w:.1f}" for w in worst) + " µs; fixed " + ", ".join(f"{w:.1f}" for w in fixed) + " µs",
              f"load average {os.getloadavg()[0]:.2f} at the end; {time.time() - t_start:.0f} s",
              f"RESULT choice_p99_us={float(np.median(worst)):.1f} worst_run_p99_us={max(worst):.1f}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
