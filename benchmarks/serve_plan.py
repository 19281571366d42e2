"""What a dispatch's choice costs: `DeadlineScheduler.plan` for SN-Net switching against a fixed network.

`plan` runs on the server's event loop, between two batches: while it runs, no batch runs and no request is read.
On DeiT (batches of 17-160 ms) a millisecond of choosing is noise; on the digits demo (batches of 1.5-3.5 ms) it is
a share of the network's own time that a fixed network (one candidate) does not pay, so it counts against
switching under load (issue 38). This benchmark times `plan` alone, on a virtual clock (no network runs): a queue of
`q` requests with the same latency budget (the SLO, 3x the largest anchor's batch-1 ms), arrived 1 ms apart and
none past hope, after 30 s of bursty arrivals (gamma, CV^2 4, at the largest anchor's capacity) so the burst
quantile has a history to read; the learned batch times hold 30 batches at the table's speed. Menus: SN-Net's
DeiT-Ti/S/B served stitches (`results/serve_sim_deit_table.json`: 12 stitches, batch-1 ms measured) at batches of
1 (as DeiT is served) and of up to 8 (the digits server's batch; a batch of n taking n x the batch-1 time).

    .venv/bin/python benchmarks/serve_plan.py [--repeats 200] > results/bench_serve_plan.txt

Columns: µs per `plan` call (median of 5 rounds of `--repeats` calls), switching (every served stitch) and fixed
(the middle anchor alone), their ratio, and switching's cost against the fastest stitch's batch-1 time.
Last line: RESULT plan_us_q32_b8=<switching's µs at a queue of 32, batches of 8>.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snnet.serve.loadgen import arrival_times  # noqa: E402  (after the path insert: runs from a checkout)
from snnet.serve.policy import StitchMenu  # noqa: E402
from snnet.serve.scheduler import BatchTimes, DeadlineScheduler, Job, Learned, Quantile  # noqa: E402

TABLE = ROOT / "results" / "serve_sim_deit_table.json"
DEPTHS = (1, 4, 16, 32, 64)
FIXED = 1  # DeiT-S, the middle anchor


def plan_us(menu: StitchMenu, candidates: list[int], depth: int, max_batch: int, slo_ms: float, rate: float,
            repeats: int) -> float:
    """Median µs of one `plan` call (5 rounds of `repeats`) for a queue of `depth` requests of `candidates`."""
    now = 1000.0
    clock = [now]
    sched = DeadlineScheduler(lambda x, c: x, menu, max_batch=max_batch, shed=True)
    sched.learned = Learned(BatchTimes(clock=lambda: clock[0]), Quantile(0.95, 0.5, clock=lambda: clock[0]))
    for c in (list(menu.by_id) * 3)[:30]:  # 30 batches at the table's speed, the last 2 s
        sched.learned.batches.add(menu.batch_ms(c, 1), menu.batch_ms(c, 1))
    x = torch.empty(0)
    history = now - 31.0 + arrival_times(int(rate * 30), rate, 4.0, seed=0)
    for t in history[history < now - depth * 1e-3]:
        sched.admit(Job(x, candidates, float(t), float(t) + slo_ms / 1e3), float(t))
    sched.queue.clear()
    for k in range(depth):
        t = now - (depth - k) * 1e-3
        sched.admit(Job(x, candidates, t, t + slo_ms / 1e3), t)
    planned = sched.plan(now)
    assert not isinstance(planned, Job), "the head was shed: the benchmark's queue must be one the server runs"
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            sched.plan(now)
        rounds.append((time.perf_counter() - t0) / repeats * 1e6)
    return statistics.median(rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=200, help="plan calls per round (5 rounds, the median kept)")
    args = p.parse_args()
    t_start = time.time()
    saved = json.loads(TABLE.read_text())
    latency = {int(c): float(ms) for c, ms in saved["latency_ms_b1"].items()}
    menu = StitchMenu(saved["records"], {c: {1: ms} for c, ms in latency.items()}, "DeiT-Ti/S/B")
    front = menu.front()  # what the server switches among (handler.candidates)
    largest = max(menu.by_id, key=lambda c: menu.by_id[c]["flops"])
    slo = 3.0 * latency[largest]
    rate = 1e3 / latency[largest]
    fastest = min(latency.values())
    lines = [f"$ .venv/bin/python benchmarks/serve_plan.py --repeats {args.repeats}",
             f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, menu {TABLE.relative_to(ROOT)} "
             f"({len(front)} stitches; {saved.get('measured', '')}); SLO {slo:.1f} ms",
             "", "| batches of | queue | switching µs | fixed µs | switching / fixed | switching / fastest batch-1 |",
             "|---:|---:|---:|---:|---:|---:|"]
    result = float("nan")
    for max_batch in (1, 8):
        for depth in DEPTHS:
            sw = plan_us(menu, front, depth, max_batch, slo, rate, args.repeats)
            fx = plan_us(menu, [FIXED], depth, max_batch, slo, rate, args.repeats)
            lines.append(f"| {max_batch} | {depth} | {sw:.0f} | {fx:.0f} | {sw / fx:.1f}x | "
                         f"{100 * sw / 1e3 / fastest:.1f}% |")
            if max_batch == 8 and depth == 32:
                result = sw
    lines += ["", f"load average {os.getloadavg()[0]:.2f} at the end; {time.time() - t_start:.0f} s",
              f"RESULT plan_us_q32_b8={result:.0f}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
