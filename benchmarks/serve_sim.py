"""The serving scheduler on a virtual clock: what switching can win when the machine's noise is taken away.

benchmarks/serve_load.py measures real servers under open-loop load; on two shared CPU cores its DeiT margins
move by several points between identical runs (docs/serving.md), more than the effects it looks for. This
benchmark runs *the same scheduler code* (snnet/serve/scheduler.py: `DeadlineScheduler.admit` and `.take`, the
worker's own step; the learned batch times on the virtual clock) as a discrete-event simulation of one
non-preemptive worker, so each (system, trace, load) can be run on many long traces: the numbers are the policy's,
with confidence intervals, not one trace's luck.

The model: SN-Net's DeiT-Ti/S/B served stitches (the anchors and 10 stitches of the published front, the published
top-1 per answer: the *expected* effective accuracy, as serve_load's DeiT part) with batch-1 latencies measured
here (serve_load's own `deit_menu`, or `--table` from an earlier run; `--table results/serve_sim_toy_table.json`
is a made-up menu whose fast stitches are far less accurate, to show where switching cannot win). A batch takes
its table time x a lognormal factor (median 1, `--sigma`), plus `--after-ms` until the answer. Requests arrive
open loop with gamma inter-arrival times (CV^2 1, 4, 8) at offered loads x the capacity of the largest anchor
(1000 / its ms); the SLO is `--slo-factor` x the largest anchor's ms (3, as serve_load). A request is shed when
the scheduler sheds it (`--shed`, as every serve_load server). No HTTP, decoding or client time: the server's own
time only.

Systems (the same scheduler, different menus): switch (every served stitch, the server's defaults: the shared
slack and the burst quantile), switch without the burst quantile (`burst_q=None`: the rule of the previous round),
switch without the shared slack either (`fair=False`: the rule before that: the head spends what the queue can make
up on the fastest stitch), anchors (the three anchors' menu: INFaaS-style model switching), and every served stitch
fixed alone; "best fixed" is the best fixed one per (trace, load), chosen after the fact (an oracle). Margin:
switch minus the best alternative (the anchors or the best fixed), mean over `--seeds` traces with its 95 %
interval (t over the seeds, paired: every system sees the same arrivals). The burst quantile (0.6) was chosen on
the traces of seeds 0-4; `--seed-offset 100` runs traces it was not chosen on.

    .venv/bin/python benchmarks/serve_sim.py [--seeds 5] [--seed-offset 0] [--requests 1000] \
        [--table FILE | --save-table FILE] > results/bench_serve_sim.txt

Last line: RESULT sim_worst_margin_effacc=<e> sim_dominated=<d>.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import DEIT_ANCHORS, deit_menu  # noqa: E402

from snnet.serve.loadgen import arrival_times  # noqa: E402
from snnet.serve.policy import StitchMenu  # noqa: E402
from snnet.serve.scheduler import BatchTimes, DeadlineScheduler, Job, Learned, Quantile  # noqa: E402

LOADS = (0.5, 0.75, 1.0, 1.25, 1.5)
TRACES = (4.0, 1.0, 8.0)  # CV^2 of the inter-arrival times; 4 is serve_load's main trace
T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}  # t(0.975, n - 1)


def simulate(menu: StitchMenu, candidates: list[int], times: np.ndarray, slo_ms: float, fair: bool,
             burst_q: float | None, sigma: float, after_ms: float, seed: int) -> dict[str, Any]:
    """One server, one trace: each request's credit (its stitch's top-1 when answered within the SLO, else 0),
    whether it met the SLO, and its stitch (-1 when shed)."""
    clock = [0.0]
    sched = DeadlineScheduler(lambda x, c: x, menu, max_batch=1, shed=True, fair=fair, burst_q=burst_q)
    sched.learned = Learned(BatchTimes(clock=lambda: clock[0]), Quantile(0.95, 0.5, clock=lambda: clock[0]))
    rng = np.random.default_rng(seed)
    n = len(times)
    index: dict[int, int] = {}  # id(job) -> request index
    credit, met, stitch = np.zeros(n), np.zeros(n, bool), np.full(n, -1)
    i, t = 0, 0.0
    empty = torch.empty(0)
    while i < n or sched.queue:
        while i < n and times[i] <= t:
            job = Job(empty, candidates, float(times[i]), float(times[i]) + slo_ms / 1e3)
            index[id(job)] = i
            sched.admit(job, float(times[i]))
            i += 1
        if not sched.queue:
            t = float(times[i])
            continue
        clock[0] = t
        planned = sched.take(t)
        if planned is None or isinstance(planned, Job):
            continue  # shed: answered at once (503), no credit
        cfg_id, batch = planned
        table = menu.batch_ms(cfg_id, len(batch))
        ms = table * float(rng.lognormal(0.0, sigma))
        t += ms / 1e3
        clock[0] = t
        sched.learned.batches.add(table, ms)
        sched.observe_after(after_ms)
        for job in batch:
            k = index[id(job)]
            stitch[k] = cfg_id
            if t + after_ms / 1e3 <= job.deadline:
                met[k] = True
                credit[k] = float(menu.by_id[cfg_id]["acc1"])
    answered = stitch >= 0
    top1 = float(np.mean([menu.by_id[c]["acc1"] for c in stitch[answered]])) if answered.any() else math.nan
    return {"effacc": float(credit.mean()), "attain": float(met.mean()), "top1": top1,
            "shed": int((~answered).sum()), "stitches": len(set(stitch[answered].tolist()))}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % interval (t over the seeds)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan
    return m, T95.get(len(values), 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="traces per (trace, load); every system sees the same ones")
    p.add_argument("--seed-offset", type=int, default=0,
                   help="the first trace's seed (traces the scheduler's settings were not chosen on: e.g. 100)")
    p.add_argument("--requests", type=int, default=1000, help="requests per trace")
    p.add_argument("--sigma", type=float, default=0.1, help="lognormal spread of a batch's time around the table's")
    p.add_argument("--after-ms", type=float, default=1.0, help="from a batch's end to its answers")
    p.add_argument("--slo-factor", type=float, default=3.0, help="the SLO: this x the largest anchor's batch-1 ms")
    p.add_argument("--table", type=Path, help="a latency table written by an earlier run (--save-table)")
    p.add_argument("--save-table", type=Path, help="write the measured latency table here (JSON)")
    args = p.parse_args()
    t0 = time.perf_counter()

    menu_name = "SN-Net DeiT-Ti/S/B (published)"
    if args.table:
        saved = json.loads(args.table.read_text())
        records, latency = saved["records"], {int(c): float(ms) for c, ms in saved["latency_ms_b1"].items()}
        source = f"{args.table} ({saved.get('measured', 'an earlier measurement')})"
        menu_name = saved.get("name", menu_name)
    else:
        load_before = os.getloadavg()[0]
        _, records, table = deit_menu(quick=False)
        latency = {c: t["latency_ms_b1"] for c, t in table.items()}
        source = (f"measured now (serve_load.deit_menu: warm-up 1, median of 5; load average {load_before:.2f} "
                  f"before, {os.getloadavg()[0]:.2f} after)")
        if args.save_table:
            args.save_table.write_text(json.dumps({"measured": source, "records": records, "latency_ms_b1": latency},
                                                  indent=1) + "\n")
    menu = StitchMenu(records, {c: {1: ms} for c, ms in latency.items()}, menu_name)
    ranked = [r["cfg_id"] for r in menu.ranked]
    front = menu.front()  # what the server switches among (handler.candidates)
    largest = max(DEIT_ANCHORS, key=lambda a: menu.by_id[a]["flops"])
    slo = args.slo_factor * latency[largest]
    capacity = 1000.0 / latency[largest]
    burst_q = inspect.signature(DeadlineScheduler).parameters["burst_q"].default  # the server's default
    systems: dict[str, tuple[list[int], bool, float | None]] = {
        "switch": (front, True, burst_q), "switch, no burst quantile": (front, True, None),
        "switch, unshared slack": (front, False, None),
        "anchors (3 models)": ([c for c in ranked if c in DEIT_ANCHORS], True, burst_q)}
    for c in sorted(latency, key=lambda c: latency[c]):
        systems[f"fixed cfg {c}"] = ([c], True, burst_q)

    print(f"$ .venv/bin/python benchmarks/serve_sim.py --seeds {args.seeds} --seed-offset {args.seed_offset} "
          f"--requests {args.requests} "
          f"--sigma {args.sigma} --after-ms {args.after_ms} --slo-factor {args.slo_factor}"
          + (f" --table {args.table}" if args.table else ""))
    print(f"latency table: {source}; SLO {slo:.1f} ms ({args.slo_factor} x the largest anchor's {latency[largest]:.1f} "
          f"ms); capacity {capacity:.2f} req/s; torch {torch.__version__}")
    print(f"\nmenu: {menu_name}\n\n| cfg_id | top-1 | GFLOPs | batch-1 ms |\n|---:|---:|---:|---:|")
    for c in sorted(latency, key=lambda c: latency[c]):
        r = menu.by_id[c]
        print(f"| {c} | {r['acc1']:.2f} | {r['flops'] / 1e9:.2f} | {latency[c]:.1f} |")

    rows: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for cv2 in TRACES:
        for load in LOADS:
            for seed in range(args.seeds):
                seed += args.seed_offset
                times = arrival_times(args.requests, load * capacity, cv2, seed=1000 * seed + int(load * 100 + cv2))
                for name, (cands, fair, bq) in systems.items():
                    rows.setdefault((name, cv2, load), []).append(
                        simulate(menu, cands, times, slo, fair, bq, args.sigma, args.after_ms, seed))
            print(f"# CV2 {cv2:g} load {load:.2f}x done, {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)

    def mean(name: str, cv2: float, load: float, key: str) -> float:
        return statistics.fmean(r[key] for r in rows[(name, cv2, load)])

    fixed = [n for n in systems if n.startswith("fixed")]
    worst, dom = math.inf, 0
    print("\n| trace | load | switch eff. acc | no burst quantile | unshared slack | anchors | best fixed (oracle) | "
          "margin ± 95 % | switch SLO / top-1 | dominated by |")
    print("|---|---:|---:|---:|---:|---:|---|---:|---|---|")
    for cv2 in TRACES:
        for load in LOADS:
            best_fixed = max(fixed, key=lambda n: mean(n, cv2, load, "effacc"))
            alt = max(["anchors (3 models)", best_fixed], key=lambda n: mean(n, cv2, load, "effacc"))
            diffs = [a["effacc"] - b["effacc"] for a, b in zip(rows[("switch", cv2, load)], rows[(alt, cv2, load)])]
            m, half = interval(diffs)
            worst = min(worst, m)
            sw_att, sw_top = mean("switch", cv2, load, "attain"), mean("switch", cv2, load, "top1")
            doms = [n for n in ["anchors (3 models)", *fixed] if mean(n, cv2, load, "attain") > sw_att
                    and mean(n, cv2, load, "top1") > sw_top]
            dom += bool(doms)
            print(f"| CV2 {cv2:g} | {load:.2f}x | {mean('switch', cv2, load, 'effacc'):.2f} | "
                  f"{mean('switch, no burst quantile', cv2, load, 'effacc'):.2f} | "
                  f"{mean('switch, unshared slack', cv2, load, 'effacc'):.2f} | "
                  f"{mean('anchors (3 models)', cv2, load, 'effacc'):.2f} | "
                  f"{best_fixed.removeprefix('fixed ')}: {mean(best_fixed, cv2, load, 'effacc'):.2f} | "
                  f"{m:+.2f} ± {half:.2f} | {sw_att:.1%} / {sw_top:.2f} | {', '.join(doms) or '-'} |")
    print(f"\n{args.seeds} traces of {args.requests} requests per (trace, load, system); "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"RESULT sim_worst_margin_effacc={worst:.3f} sim_dominated={dom}")


if __name__ == "__main__":
    main()
