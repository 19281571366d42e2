"""Is the replay right? SN-Net switching against the replay's strongest alternative on real `snnet serve` servers,
in randomized blocks.

benchmarks/serve_replay.py decides the serving claim on a virtual clock charged with this machine's measured costs.
This benchmark checks that replay against real servers under real open-loop HTTP load, as a randomized experiment:

* **what runs**: SN-Net's DeiT-Ti/S/B (random weights; the credit of an answer in time is its stitch's published
  top-1, as in the replay), batches of up to 8, the three DeiT settings where the replay's margin of switching over
  its strongest alternative is smallest (the claim's weakest points), and in each: **switch**, that **alternative**
  (a fixed stitch: requests naming its cfg_id; or the anchors exported and loaded together) and an **A/A copy** of
  switch (a second switching server: what the machine alone moves a system by);
* **frozen settings**: the SLO, the arrival rates and the latency table every server uses come from one calibration
  of DeiT measured at the start on the servers' core (serve_replay.py's `--calibrate`: this machine's speed moves by
  a third between hours, so the committed calibration of another hour would predict another machine), not
  re-measured per server; each run's log shows the machine's speed against it (forward time / calibrated median);
* **randomized blocks**: each block draws one arrival trace per setting (seeds `--seed-offset` + block: the same
  for every system) and runs the three systems in a random order, each on a **fresh server** (so no system
  inherits another's learned speeds or arrival history), the settings in a random order on it, 2.5 s apart (the
  server's 2 s arrival-rate window forgets the last trace); a server that chooses is first **warmed** as the
  replay's server is: sent requests one at a time until it simulates its mode table, then left idle until the
  table is built; the load generator on its own core (`--client-cpus`, default the last core), the servers on
  the others with one thread, as the calibration measured them;
* **statistics**: per setting, switch minus the alternative and switch minus its A/A copy, paired by block, mean
  with its 95 % interval (t over the blocks); and per (setting, system) whether the replay's prediction for the very
  same traces (and the arrivals its server counted before each: the warm-up and the earlier settings' traces) lies
  inside the live mean's 95 % interval. The prediction replays each run at **that run's machine speed through
  it** (its batches' forward times over the calibration's medians for the same stitch and batch size, a median of
  3 batches by when they started, `speed_profile`: a property of the machine, not of the policy; it moved by a
  third within one run of this benchmark, and by twice within one trace) on **a server with that live server's
  history** (`past_of`: every answer it gave before the trace, warm-up and earlier traces, so that the replayed
  server starts with the slowdown, jitter and answer time it had learned and the mode tables it had simulated from
  its own measured batches, by the same code: the tables its GET / reported in use when the trace began, kept for
  the trace, as a live server simulates a new one in the background while idle); the prediction at the
  calibration's speed by a server that has run a while on the calibration is shown beside it, and so is live minus
  the prediction paired by block with its interval (the prediction has noise of its own: one replay per block).

    .venv/bin/python benchmarks/serve_live.py [--blocks 10] [--requests 40] --out results/bench_serve_live.txt \
        --raw results/bench_serve_live_raw.json          # the runs' raw data too
    .venv/bin/python benchmarks/serve_live.py --from-raw results/bench_serve_live_raw.json   # the report again,
                                                         # with today's replay, no server started (~10 min on
                                                         # 2 cores: each server's mode tables are simulated anew)

Last line: RESULT live_behind=<settings where the alternative is ahead beyond the interval> aa_covers_zero=<1 when
every A/A interval covers 0> replay_inside=<k>/<n> ((setting, system) pairs whose replay prediction is inside the
live interval).
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loadgen import get, post, run_open_loop  # noqa: E402  (after the path insert: runs from a checkout)
from serve_replay import (  # noqa: E402
    DEIT_ANCHORS,
    DEIT_CONFIG,
    Calibrated,
    arrivals,
    deit_images,
    deit_served,
    interval,
    replay,
    systems,
)

from snnet.utils.checkpoint import save_checkpoint  # noqa: E402
from snnet.utils.fileio import write_text_atomic  # noqa: E402

REPLAY = ROOT / "results" / "bench_serve_replay.txt"
#: what a run's raw record keeps of each answer, after its status, cfg_id, batch size and elapsed ms (--raw)
ANSWER_TIMES = ("before", "decode", "queue", "forward", "answer")


# ------------------------------------------------------------------------------------------------ servers
class Server:
    """One `snnet serve` process (local engine, --shed) on a free port and the given cores; stopped by SIGTERM."""

    def __init__(self, source: list[str], results: Path, log: Path, cpus: set[int], max_batch: int = 8):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "snnet.cli", "serve", *source, "--results", str(results), "--port",
               str(self.port), "--max-batch", str(max_batch), "--threads", "1", "--shed"]
        self.log, self.out = log, open(log, "w+")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        self.url = f"http://127.0.0.1:{self.port}/"
        t0 = time.monotonic()
        while "serving" not in log.read_text():
            if self.proc.poll() is not None or time.monotonic() - t0 > 300:
                raise RuntimeError(f"a server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.out.close()


def run_trace(url: str, images: list[str], times: np.ndarray, picks: np.ndarray, slo_ms: float,
              extra: dict[str, Any], acc: dict[int, float], cal: Any) -> dict[str, float]:
    """One open-loop trace: each request due at its time carries sent_at (the server counts its budget from then);
    its credit is its stitch's top-1 when the server answered it within the SLO, else 0. `speed`: the median over
    its answers of the forward pass's time over the calibration's median for that stitch and batch size (1: the
    machine ran as fast as when it was calibrated); `answers`: one row per request (`answer_row`), what the raw
    record keeps and the prediction reads (`batch_speeds`, `picks`)."""
    bodies = [json.dumps({"image": images[i], "budget": {"latency_ms": slo_ms}, "top_k": 1, **extra}).encode()
              for i in picks]
    replies = run_open_loop(url, bodies, times, time_limit=float(times[-1]) + 1, timeout=slo_ms / 1e3 * 4 + 10,
                            stamp=True)
    credit = [acc[r.body["cfg_id"]] if r.status == 200 and r.body["elapsed_ms"] <= slo_ms else 0.0 for r in replies]
    answers = [answer_row(r.status, r.body) for r in replies]
    speed = [a[7] / cal.service_ms(a[1], a[2], 0.5) for a in answers if a[0] == 200]
    return {"effacc": statistics.fmean(credit), "attain": statistics.fmean(c > 0 for c in credit),
            "shed": sum(r.status == 503 for r in replies), "failed": sum(r.status not in (200, 503) for r in replies),
            "speed": statistics.median(speed) if speed else float("nan"), "answers": answers}


def answer_row(status: int, body: dict[str, Any]) -> list[Any]:
    """What the raw record keeps of one answer: status, cfg_id, batch size, elapsed ms and `ANSWER_TIMES` (None
    where the answer has none: a shed or failed request)."""
    return [status, body.get("cfg_id"), body.get("batch_size"), body.get("elapsed_ms"),
            *(body.get("timing_ms", {}).get(k) for k in ANSWER_TIMES)]


def picks_of(answers: list[list[Any]]) -> dict[int, int]:
    """Answers per cfg_id (the answered requests)."""
    return dict(collections.Counter(int(a[1]) for a in answers if a[0] == 200))


def batch_speeds(answers: list[list[Any]], times: np.ndarray, cal: Any) -> list[tuple[float, float]]:
    """One (start, speed) per batch the server ran for these answers (`answer_row`s, in request order): when its
    forward pass began on the trace's clock (the request's due time plus its wait before, in decoding and in the
    queue) and its forward time over the calibration's median for that stitch and batch size. The answers of one
    batch share its start and forward time and count once (a batch of 8 is one measurement of the machine, not 8)."""
    seen: dict[tuple[int, int, float], tuple[float, float]] = {}
    for i, (status, c, n, _, before, decode, queue, forward, _) in enumerate(answers):
        if status != 200:
            continue
        start = float(times[i]) + (before + decode + queue) / 1e3
        # one batch: its answers carry the same measured forward time (the server times the batch once)
        seen.setdefault((c, n, forward), (start, forward / cal.service_ms(c, n, 0.5)))
    return sorted(seen.values())


def speed_profile(batches: list[tuple[float, float]], k: int = 3) -> Callable[[float], float]:
    """The machine's speed through one live run as a function of the trace's time (seconds): from each batch's
    start on (`batch_speeds`), the median speed of it and its neighbours (k batches by time), so that a slow spell
    of a few batches is followed and one slow batch is not. The replay charges a batch the speed of when it starts,
    so the profile is keyed by when the live batches started, not by when their requests were due (under a burst
    those are up to an SLO apart, and a slow batch keyed by its requests' arrival would slow the replay's earlier
    batches). Before the first batch, the first."""
    batches = sorted(batches)
    at = [t for t, _ in batches]
    values = [v for _, v in batches]
    half = k // 2
    smooth = [statistics.median(values[max(0, i - half):i + half + 1]) for i in range(len(values))]
    return lambda t: smooth[max(0, bisect.bisect_right(at, t) - 1)]


def send(server: Server, body: dict[str, Any], posts: list[tuple[float, list[Any]]]) -> None:
    """One request outside the traces (a cold start, the warm-up, a fixed stitch's first), kept in `posts` as (Unix
    time sent, `answer_row`): the live server learned from it, and so does the replay of its later traces."""
    sent = time.time()
    status, answer = post(server.url, json.dumps(body).encode())
    posts.append((sent, answer_row(status, answer)))


def warm(server: Server, images: list[str], slo_ms: float, posts: list[tuple[float, list[Any]]]) -> None:
    """Bring a switching server to the state the replay models, one that has run before: one request at a time
    with the SLO's budget (its batch times measured, its arrivals counted) until it simulates its mode table,
    then wait, idle, until the table is built. `posts`: what it was sent and answered (`send`)."""
    from snnet.serve.scheduler import MODE_AFTER
    for i in range(max(MODE_AFTER, 8) + 2):  # the 8 gaps the load needs, MODE_AFTER batches
        send(server, {"image": images[i % len(images)], "budget": {"latency_ms": slo_ms}, "top_k": 1}, posts)
    t0 = time.monotonic()
    while get(server.url)[1].get("mode_tables", 0) < 1:
        if time.monotonic() - t0 > 300:
            raise RuntimeError(f"a server built no mode table in 300 s: {server.log.read_text()[-2000:]}")
        time.sleep(0.5)


def server_ids(runs: list[dict[str, Any]]) -> list[int]:
    """Which server each run's trace was sent to (in the order run). Records before the key "server" existed: a
    new server for each role in each block, and again where the role's system needs another kind of server (a fixed
    stitch on the SN-Net, the anchors exported), as `collect` starts them."""
    if all("server" in r for r in runs):
        return [int(r["server"]) for r in runs]
    ids, last = [], None
    for r in runs:
        role = r["system"] if r["system"] in ("switch", "A/A") else "alternative"
        key = (r["block"], role, r["system"] == "anchors")
        ids.append(len(ids) if not ids else ids[-1] + (key != last))
        last = key
    return ids


def answered_events(rows: list[tuple[float, list[Any]]]) -> list[tuple[float, str, tuple[float, ...]]]:
    """What a server learned from its answers (`answer_row`s, each with the time its request was sent on a trace's
    clock), as the replay's `past`: per answered request its decoding ("before") and its answer time ("after"; the
    server's own measure starts a little later, when the batch's result reaches the handler), per batch, once, the
    moment it was chosen ("plan") and its forward pass ("batch")."""
    out: list[tuple[float, str, tuple[float, ...]]] = []
    batches: set[tuple[int, int, float, float]] = set()
    for sent, (status, c, n, _, before, decode, queue, forward, answer) in rows:
        if status != 200:
            continue
        decoded = sent + (before + decode) / 1e3
        start, end = decoded + queue / 1e3, decoded + (queue + forward) / 1e3
        out.append((decoded, "before", (decode,)))
        batch = (c, n, forward, round(start, 3))  # the answers of one batch share its start and forward time
        if batch not in batches:
            batches.add(batch)
            out += [(start, "plan", ()), (end, "batch", (c, n, forward))]
        out.append((end + answer / 1e3, "after", (answer,)))
    return out


def past_of(record: dict[str, Any], j: int, ids: list[int], times_of: Callable[[dict[str, Any]], np.ndarray]) \
        -> list[tuple[float, str, tuple[float, ...]]]:
    """Run `j`'s server's history before its trace, on that trace's clock (the replay's `past`): the requests sent
    outside the traces ("warm": cold start, warm-up, a fixed stitch's first) and the earlier traces' answers (each
    placed by its arrivals' position in this run's `seen`: every request sent to the server, in order)."""
    runs = record["runs"]
    run = runs[j]
    rows = [(float(t), list(row)) for t, *row in run.get("warm", [])]
    seen = run["seen"]
    for p in range(j):
        if ids[p] == ids[j]:
            times = times_of(runs[p])
            offset = seen[len(runs[p]["seen"])] - float(times[0])
            rows += [(offset + float(t), a) for t, a in zip(times, runs[p]["answers"])]
    return answered_events(rows)


# ------------------------------------------------------------------------------------------------ the plan
def weakest_settings(path: Path, n: int) -> list[tuple[str, float, str, float]]:
    """From the replay's DeiT table: the `n` settings with the smallest margin of switching over an alternative,
    as (arrivals, load, the alternative, the margin); the alternative is 'anchors' or 'fixed cfg N'."""
    lines = path.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("### deit"))
    header = next(ln for ln in lines[start:] if ln.startswith("| arrivals"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    rows = []
    for ln in lines[start:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(cols) or cells[0] in ("arrivals", "---"):
            continue
        row = dict(zip(cols, cells))
        margins = {c[len("switch - "):]: float(row[c].split("±")[0]) for c in cols
                   if c.startswith("switch - ") and c[len("switch - "):] in ("best fixed", "anchors")}
        alt = min(margins, key=lambda a: margins[a])
        rows.append((row["arrivals"], float(row["load"].rstrip("x")),
                     row["best fixed (tuning)"] if alt == "best fixed" else "anchors", margins[alt]))
    return sorted(rows, key=lambda r: r[3])[:n]


def collect(args: argparse.Namespace, servers_on: set[int], client: set[int]) -> dict[str, Any]:
    """The live runs: a calibration at the start (or `args.calibration`), then every block's randomized runs on
    fresh servers. Returns the raw record `analyse` reads (JSON: written with --raw, read back with --from-raw, so
    that the prediction can be redone on old runs after a change to the replay)."""
    from snnet.deploy.export import export_stitch, load_snnet
    t_start = time.time()
    plan = weakest_settings(args.replay, args.settings)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        measured = args.calibration
        if measured is None:  # this machine now, on the servers' cores: its speed moves by a third between hours
            measured = work / "calibration.json"
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_replay.py"), "--calibrate", "--nets",
                            "deit", "--calibration", str(measured), "--note", "serve_live.py's, at its start"],
                           check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                           preexec_fn=lambda: os.sched_setaffinity(0, servers_on))
        calibration = json.loads(measured.read_text())["nets"]["deit"]
        cal = Calibrated("deit", calibration)
        header = [f"$ .venv/bin/python benchmarks/serve_live.py --blocks {args.blocks} --requests {args.requests} "
                  f"--settings {args.settings} --seed-offset {args.seed_offset}",
                  f"frozen from {'a calibration at the start' if args.calibration is None else args.calibration.name}"
                  f": SLO {cal.slo_ms:.1f} ms (server time from when a request was due), 1x = {cal.capacity:.2f} "
                  f"req/s (largest anchor at batch 1: {cal.menu.batch_ms(cal.largest, 1):.1f} ms); settings: the "
                  f"replay's {args.settings} weakest DeiT settings ({args.replay.name}); servers on cores "
                  f"{sorted(servers_on)} (1 thread), client on {sorted(client)}", ""]
        print("\n".join(header), file=sys.stderr, flush=True)
        net, records = deit_served()
        ckpt = work / "deit.pth.tar"
        save_checkpoint(ckpt, {"state_dict": net.state_dict(), "epoch": 0,
                               "args": json.dumps({"num_classes": 1000, "img_size": 224, "model_kwargs": {}})})
        results = work / "deit_res.txt"  # the calibration's latency table: no server measures its own
        results.write_text("".join(json.dumps({**r, "latency_ms_b1": cal.menu.batch_ms(r["cfg_id"], 1),
                                               "latency_ms_b8": cal.menu.batch_ms(r["cfg_id"], 8)}) + "\n"
                                   for r in records))
        source = [str(ckpt), "--stitch_config", str(DEIT_CONFIG)]
        if any(alt == "anchors" for _, _, alt, _ in plan):
            loaded = load_snnet(str(ckpt), str(DEIT_CONFIG))
            for a in DEIT_ANCHORS:
                export_stitch(loaded, a, work / f"cfg{a}", formats=())
        images = deit_images()
        acc = {r["cfg_id"]: r["acc1"] for r in records}
        rng = np.random.default_rng(args.seed_offset)
        servers = 0  # the servers started so far (a run's "server": which one its trace was sent to)
        for block in range(args.blocks):
            seed = args.seed_offset + block
            for role in rng.permutation(["switch", "A/A", "alternative"]).tolist():
                server, server_kind = None, ""
                sent: list[float] = []  # Unix times of the traces' requests sent to this server
                posts: list[tuple[float, list[Any]]] = []  # those sent outside the traces, with their answers
                try:
                    for s in rng.permutation(len(plan)).tolist():
                        kind, load, alt, _ = plan[s]
                        system = alt if role == "alternative" else role
                        need = "exported" if system == "anchors" else "snnet"
                        extra = {"cfg_id": int(system.split()[-1])} if system.startswith("fixed cfg ") else {}
                        if server is None or need != server_kind:  # a fresh server for each role in each block
                            if server is not None:
                                server.stop()
                            src = ["--exported", *(str(work / f"cfg{a}") for a in DEIT_ANCHORS)] \
                                if need == "exported" else source
                            server, server_kind = Server(src, results, work / "server.log", servers_on), need
                            servers += 1
                            sent, posts = [], []
                            for i in range(2):  # its first batches run cold (lazy allocation)
                                send(server, {"image": images[i], "top_k": 1}, posts)
                            if not extra:  # it chooses: as the replay's server, it has simulated its modes
                                warm(server, images, cal.slo_ms, posts)
                        if extra:
                            send(server, {"image": images[0], "top_k": 1, **extra}, posts)
                        time.sleep(2.5)  # the server's arrival rate (2 s) forgets the last trace
                        tables = get(server.url)[1].get("mode_tables_from")  # the mode tables it starts the trace with
                        times = arrivals(kind, args.requests, load * cal.capacity, cal.slo_ms / 1e3, seed)
                        picks = np.random.default_rng(seed).integers(0, len(images), args.requests)
                        key = role if role != "alternative" else alt
                        began = time.time()
                        # what its server counted before the trace: every request sent to it, in order
                        seen = (np.array(sorted(sent + [t for t, _ in posts])) - began).tolist()
                        row = run_trace(server.url, images, times, picks, cal.slo_ms, extra, acc, cal)
                        sent.extend((began + times).tolist())
                        line = (f"block {block + 1}/{args.blocks} {kind} {load:g}x {system}: effacc {row['effacc']:.2f}"
                                f" attain {row['attain']:.2f} shed {row['shed']} failed {row['failed']} speed "
                                f"{row['speed']:.2f} ({time.time() - t_start:.0f} s, {len(runs) + 1} runs)")
                        runs.append({"setting": s, "block": block, "system": key, "effacc": row["effacc"],
                                     "seen": seen, "answers": row["answers"], "server": servers, "tables": tables,
                                     "warm": [[t - began, *a] for t, a in posts], "line": line})
                        print(line, file=sys.stderr, flush=True)
                finally:
                    if server is not None:
                        server.stop()
    return {"header": header, "calibration": calibration, "plan": plan, "blocks": args.blocks,
            "requests": args.requests, "seed_offset": args.seed_offset, "images": len(images), "runs": runs,
            "minutes": (time.time() - t_start) / 60, "load": os.getloadavg()[0]}


_RECORD: dict[str, Any] = {}  # the record `predict`'s worker processes replay (set before they fork)


def _predict_server(job: list[int]) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
    """The replays of one server's runs (indices into the record's runs, in the order run): each at that run's
    speeds from that server's own history on, and at the calibration's speed as a server that has run a while."""
    record = _RECORD
    cal = Calibrated("deit", record["calibration"])
    by_name = systems(cal)
    plan, requests, offset = record["plan"], record["requests"], record["seed_offset"]
    ids = server_ids(record["runs"])

    def times_of(run: dict[str, Any]) -> np.ndarray:
        kind, load = plan[run["setting"]][:2]
        return arrivals(kind, requests, load * cal.capacity, cal.slo_ms / 1e3, offset + run["block"])

    out = {}
    for j in job:
        run = record["runs"][j]
        seed = offset + run["block"]
        times = times_of(run)
        draws = np.random.default_rng(10_000 + seed).random((requests, 4))
        draws[:, 0] = (np.random.default_rng(seed).integers(0, record["images"], requests) + 0.5) / \
            record["images"]  # the live trace's images
        system = by_name["switch" if run["system"] == "A/A" else run["system"]]
        seen = np.array(run["seen"])
        batches = batch_speeds(run["answers"], times, cal)
        out[j] = (replay(cal, system, times, draws, seen, speed_profile(batches) if batches else 1.0,
                         past=past_of(record, j, ids, times_of), tables_from=run.get("tables")),
                  replay(cal, system, times, draws, seen))
    return out


def predict(record: dict[str, Any], workers: int) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
    """Every run's replays (`_predict_server`), one job per server (its runs share the history a mode table is
    simulated from: simulated once per process), on `workers` processes."""
    import multiprocessing
    ids = server_ids(record["runs"])
    jobs = [[j for j, i in enumerate(ids) if i == server] for server in sorted(set(ids))]
    _RECORD.clear()
    _RECORD.update(record)
    if workers <= 1:
        parts = [_predict_server(job) for job in jobs]
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_predict_server, jobs, chunksize=1)
    return {j: v for part in parts for j, v in part.items()}


def analyse(record: dict[str, Any], workers: int = 1) -> str:
    """The report of one collection (`collect`'s record): per setting the live means, the paired differences and the
    replay's predictions of the very same runs; its last line the RESULT. `workers`: processes for the replays."""
    plan = [tuple(x) for x in record["plan"]]
    blocks = record["blocks"]
    by_run = {(r["setting"], r["block"], r["system"]): (i, r) for i, r in enumerate(record["runs"])}
    predicted_runs = predict(record, workers)
    log = [r["line"] for r in record["runs"]]
    fmt = lambda p: " ".join(f"{c}:{p[c]}" for c in sorted(p))  # noqa: E731  (answers per cfg_id)
    behind, aa_ok, inside, pairs = 0, True, 0, 0
    out = list(record["header"])
    out += ["| arrivals | load | alternative (replay margin) | switch | alternative | A/A | switch - alternative | "
            "switch - A/A | replay at each run's speeds: switch / alternative / A/A | replay at the calibration's "
            "speed | live - replay, paired by block: switch / alternative / A/A |",
            "|---|---:|---|---:|---:|---:|---:|---:|---|---|---|"]
    for s, (kind, load, alt, margin) in enumerate(plan):
        live = {k: [by_run[s, b, k][1]["effacc"] for b in range(blocks)] for k in ("switch", alt, "A/A")}
        predicted, at_start, paired = {}, {}, {}
        for key in ("switch", alt, "A/A"):
            effs, effs_start = [], []
            for block in range(blocks):
                j, run = by_run[s, block, key]
                one, start = predicted_runs[j]
                effs.append(one["effacc"])
                # each run's line: the replay's prediction of it and both answers per cfg_id (where they part)
                log[j] += (f"; replay {one['effacc']:.2f}; answers per cfg_id live {fmt(picks_of(run['answers']))}"
                           f", replay {fmt(one['picks'])}")
                effs_start.append(start["effacc"])
            predicted[key], at_start[key] = statistics.fmean(effs), statistics.fmean(effs_start)
            paired[key] = interval([a - b for a, b in zip(live[key], effs)])
        means = {k: interval(live[k]) for k in ("switch", alt, "A/A")}
        d_alt = interval([a - b for a, b in zip(live["switch"], live[alt])])
        d_aa = interval([a - b for a, b in zip(live["switch"], live["A/A"])])
        behind += d_alt[0] + d_alt[1] < 0
        aa_ok &= abs(d_aa[0]) <= d_aa[1]
        for k in ("switch", alt, "A/A"):
            pairs += 1
            inside += abs(predicted[k] - means[k][0]) <= means[k][1] + 1e-6  # a zero-width interval can hold it
        out.append(f"| {kind} | {load:g}x | {alt} ({margin:+.2f}) | "
                   + " | ".join(f"{means[k][0]:.2f} ± {means[k][1]:.2f}" for k in ("switch", alt, "A/A"))
                   + f" | {d_alt[0]:+.2f} ± {d_alt[1]:.2f} | {d_aa[0]:+.2f} ± {d_aa[1]:.2f} | "
                   + " / ".join(f"{predicted[k]:.2f}" for k in ("switch", alt, "A/A")) + " | "
                   + " / ".join(f"{at_start[k]:.2f}" for k in ("switch", alt, "A/A")) + " | "
                   + " / ".join(f"{paired[k][0]:+.2f} ± {paired[k][1]:.2f}" for k in ("switch", alt, "A/A")) + " |")
    speeds = [float(ln.split(" speed ")[1].split()[0]) for ln in log]
    out += ["", f"{len(log)} server runs in {record['minutes']:.1f} min; load average {record['load']:.2f} at the "
                f"end; the machine's speed against the calibration (forward time / calibrated median, per run): first "
                f"block {statistics.fmean(speeds[:3 * len(plan)]):.2f}, last "
                f"{statistics.fmean(speeds[-3 * len(plan):]):.2f}, range {min(speeds):.2f}..{max(speeds):.2f}",
            "", "<details><summary>every run, in the order run</summary>", "", *log, "", "</details>", "",
            f"RESULT live_behind={behind} aa_covers_zero={int(aa_ok)} replay_inside={inside}/{pairs}"]
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=10, help="randomized blocks (default 10)")
    p.add_argument("--requests", type=int, default=40, help="requests per trace (default 40)")
    p.add_argument("--settings", type=int, default=3, help="how many of the replay's weakest DeiT settings")
    p.add_argument("--seed-offset", type=int, default=5000, help="the blocks' trace seeds start here")
    p.add_argument("--replay", type=Path, default=REPLAY, help="the replay's results (its DeiT table)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="use this calibration (serve_replay.py --calibrate) instead of measuring DeiT at the start")
    p.add_argument("--client-cpus", default="", help="the load generator's cores (default: the last core)")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument("--raw", type=Path, default=None,
                   help="also write every run's raw data here (JSON: the calibration, the arrivals each server "
                        "counted, each answer's status, stitch, batch size and times), which --from-raw reads")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="processes for the replays of the analysis (default: every core)")
    p.add_argument("--from-raw", type=Path, default=None,
                   help="run no server: redo the report from a --raw file (the replay's predictions with today's code)")
    args = p.parse_args()
    if args.from_raw is not None:
        try:
            record = json.loads(args.from_raw.read_text())
        except (OSError, ValueError) as e:
            p.error(f"--from-raw {args.from_raw}: {e}; pass a file that serve_live.py --raw wrote")
        text = analyse(record, args.workers)
        if args.out:
            write_text_atomic(args.out, text)
        print(text)
        return
    if args.blocks < 2 or args.requests < 2:
        p.error(f"--blocks {args.blocks} --requests {args.requests}: pass at least 2 of each (an interval needs 2)")
    every = os.sched_getaffinity(0)
    try:
        client = {int(c) for c in args.client_cpus.split(",")} if args.client_cpus else {max(every)}
    except ValueError:
        p.error(f"--client-cpus {args.client_cpus!r}: pass core numbers separated by commas, e.g. 1")
    if not client < every:
        p.error(f"--client-cpus {args.client_cpus!r}: pass some but not all of this process's cores {sorted(every)}")
    servers_on = every - client
    os.sched_setaffinity(0, client)
    torch.set_num_threads(1)
    record = collect(args, servers_on, client)
    os.sched_setaffinity(0, every)  # the analysis's replays on every core
    if args.raw:
        write_text_atomic(args.raw, json.dumps(record))
    text = analyse(record, args.workers)
    if args.out:
        write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
