"""Does one served SN-Net meet deadlines better than fixed networks? Open-loop, bursty load against a deadline.

Serving research measures a server with open-loop arrivals (times fixed in advance, independent of the answers:
a slow server does not slow the clients down) against a deadline per request, and scores *SLO attainment* (the
share of requests answered within the deadline) and *effective accuracy* (requests answered correctly within the
deadline / all requests; INFaaS, Model-Switching, SuperServe). This benchmark does that for two networks:

* **digits**: the committed, trained digits demo (results/demo/snnet.pth.tar, configs/demo_digits.json, 23
  stitches at 16x16) on the demo's real validation images: correctness is per request, from the answer's class;
* **DeiT**: SN-Net's DeiT-Ti/S/B plan (configs/deit_ti_s_b.json, 224 px), random weights (no download here), the
  stitches on SN-Net's published FLOPs-accuracy front; correctness cannot be real, so each answer within its
  deadline counts its stitch's top-1 from SN-Net's published table
  (benchmarks/data/snnet_deit_ti_s_b_stitches_res.txt): the *expected* effective accuracy.

Systems, each its own `snnet serve` process (the local engine, the same deadline scheduler, `--shed`: a request
that cannot make its deadline even on its network's fastest option is answered 503 at once), measured in one run:

  switch        the SN-Net; the stitch bound per batch at dispatch from the head's slack, leaving room for the
                arrivals a batch holds up (snnet serve; "switch, no headroom": --headroom 0, the greedy choice,
                shown for comparison and not counted as an alternative)
  switch, again the same switching server measured once more, last in each setting: an A/A control. Its
                difference from "switch" is what the machine alone moves a system by between two windows of a few
                seconds (load beside it, cache, frequency); it is not an alternative. The same worst margin with
                the control in switch's place (`CONTROL ... control_worst_margin`) is what that statistic reads
                for a system *identical* to switching: the bar's noise floor on this machine
  fixed <name>  the same server with every request fixing one network (cfg_id): each anchor alone and one
                stitch of the front between them; "best fixed" is the best of them at each load, chosen after
                the fact (an oracle a fixed deployment does not have)
  anchors       the anchors exported as separate models, loaded together, chosen per request by the same rule
                (INFaaS-style model switching: N models' memory)
  cascade       (digits) a confidence cascade of the anchors (run the small one; escalate an unsure answer to
                the next if its deadline allows), thresholds chosen on the demo's own predictions
                (stitches_pred.npz, results/baselines.py); and the SN-Net's cascade (its cheapest front stitch,
                escalating to its best), nothing shared between stages (a lower bound on block reuse)

Load: gamma inter-arrival times with CV^2 = 4 (bursty) at offered loads of 0.5x .. 1.5x the capacity of the
largest anchor served alone (1000 / its batch-1 ms), plus Poisson (CV^2 = 1) and CV^2 = 8 at 1.0x. The deadline
(SLO) of every request: --slo-factor x the largest anchor's batch-1 time, end to end at the client; each request's
budget.latency_ms is the SLO less the client-side time measured idle (HTTP, JSON), so the server's budget is
what is left of the SLO once the request has reached it.

Also measured: switch cost idle (the server's time to choose per dispatch, and `net(x, cfg_id)` at batch 1 with the
stitch changing every call vs. grouped by stitch), memory (PSS of each serving process, measured after its load),
and how often an answer saying `within_budget` met its budget (the prediction's calibration).

    .venv/bin/python benchmarks/serve_load.py [--quick] [--out results/bench_serve.txt]

Last line: RESULT worst_margin_effacc=<e> dominated=<d> within_met=<w> (see the docs: docs/serving.md); the line
before it: CONTROL aa_mean_abs=<m> aa_largest_abs=<a> control_worst_margin=<c> control_dominated=<n>, the same
statistics for the A/A control (switching measured again): what they read when there is nothing to find.
"""
from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snnet.core.build import build_snnet  # noqa: E402  (after the path insert: the benchmark runs from a checkout)
from snnet.core.checkpoint import save_checkpoint  # noqa: E402
from snnet.core.config import parse_stitch_config  # noqa: E402
from snnet.core.fileio import atomic_path, write_text_atomic  # noqa: E402
from snnet.deploy.export import export_stitch, load_snnet  # noqa: E402
from snnet.deploy.latency import measure_latency  # noqa: E402
from snnet.results.baselines import cascade_settings  # noqa: E402
from snnet.results.predictions import build  # noqa: E402
from snnet.results.quality import pareto_front  # noqa: E402
from snnet.results.records import read_results  # noqa: E402
from snnet.serve.loadgen import arrival_times, get, percentile, post, run_load, run_open_loop  # noqa: E402

LOADS = (0.5, 0.75, 1.0, 1.25, 1.5)
EXTRA_TRACES = ((1.0, 1.0), (8.0, 1.0))  # (CV^2, load): Poisson and burstier, at the capacity
MAIN_CV2 = 4.0
#: --client-cpus: the cores the servers run on (the others than the client's); empty: no pinning, all share
SERVER_CPUS: set[int] = set()
#: SN-Net switching without the room for arrivals (snnet serve --headroom 0): the greedy choice, before issue 38's fix
GREEDY = "switch, no headroom"
#: the switching server measured again, last in each setting: an A/A control (not an alternative)
CONTROL = "switch, again (A/A control)"
SWITCHES = ("switch", GREEDY, CONTROL)  # never counted as alternatives to switching


# ------------------------------------------------------------------------------------------------ the networks
@dataclass
class Net:
    name: str
    checkpoint: Path
    config: Path
    results: Path  # the served stitches with their latency table (latency_ms_b1, latency_ms_b<max_batch>)
    anchors: list[int]
    acc: dict[int, float]  # cfg_id -> top-1 the choice ranks by (and the expected correctness, for DeiT)
    images: list[str]  # base64 image files
    labels: list[int] | None  # real classes (digits) or None (expected accuracy)
    latency: dict[int, float]  # batch-1 ms
    max_batch: int
    threads: int
    flops: dict[int, float] = field(default_factory=dict)
    loads: tuple[float, ...] = LOADS  # offered loads of the bursty trace
    extra_traces: tuple[tuple[float, float], ...] = EXTRA_TRACES
    duration: float = 10.0  # seconds of arrivals per setting
    exported: list[Path] = field(default_factory=list)
    largest_export: list[Path] = field(default_factory=list)
    fixed: dict[str, int] = field(default_factory=dict)
    cascades: dict[str, dict[str, Any]] = field(default_factory=dict)


def _png(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode()


def _with_latency(records: list[dict[str, Any]], table: dict[int, dict[str, float]], path: Path) -> Path:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps({**r, **table[r["cfg_id"]]}) + "\n")
    return path


def _front_ids(records: list[dict[str, Any]], most: int) -> list[int]:
    """The FLOPs-accuracy front's cfg_ids, thinned to at most `most` spread over its FLOPs range (ends kept)."""
    front = sorted(pareto_front(records), key=lambda r: r["flops"])
    if len(front) <= most:
        return [r["cfg_id"] for r in front]
    picks = np.unique(np.round(np.linspace(0, len(front) - 1, most)).astype(int))
    return [front[i]["cfg_id"] for i in picks]


def digits_net(work: Path, quick: bool) -> Net:
    from PIL import Image

    from snnet.demo import write_digits
    data = write_digits(work / "digits")
    val = sorted((data / "val").glob("*/*.png"))
    classes = sorted(p.name for p in (data / "val").iterdir())
    images = [_png(Image.open(p).convert("RGB")) for p in val]
    labels = [classes.index(p.parent.name) for p in val]
    ckpt, config = ROOT / "results" / "demo" / "snnet.pth.tar", ROOT / "configs" / "demo_digits.json"
    all_records = read_results(ROOT / "results" / "demo" / "stitches_res.txt")
    anchors = [0, 1, 2]
    ids = sorted(set(_front_ids(all_records, 12)) | set(anchors))
    records = [r for r in all_records if r["cfg_id"] in ids]
    loaded = load_snnet(str(ckpt), str(config))
    max_batch = 8
    table = measure_latency(loaded.net, ids, (1, max_batch), loaded.img_size, loaded.in_chans, warmup=5,
                            repeats=30)
    results = _with_latency(records, table, work / "digits_res.txt")
    net = Net("digits", ckpt, config, results, anchors, {r["cfg_id"]: r["acc1"] for r in records}, images, labels,
              {c: t["latency_ms_b1"] for c, t in table.items()}, max_batch, threads=1,
              flops={r["cfg_id"]: float(r["flops"]) for r in records})
    _exports(net, loaded, work / "digits_exports")
    # cascades: thresholds chosen on the served images' own predictions (the trained network's, computed here as
    # the demo's evaluation would): an optimistic baseline
    pred = _predictions(loaded, val, labels, {r["cfg_id"]: r for r in records})
    flops = {r["cfg_id"]: float(r["flops"]) for r in all_records}
    top = max(net.acc[a] for a in anchors)
    net.cascades["anchor cascade"] = _cascade(pred, anchors, flops, top)
    front = sorted((c for c in ids if c not in anchors), key=lambda c: flops[c])
    best = max(ids, key=lambda c: (net.acc[c], -flops[c]))
    net.cascades["SN-Net cascade"] = _cascade(pred, [front[0], best], flops, net.acc[best])
    return net


def _predictions(loaded, files: list[Path], labels: list[int], records: dict[int, dict[str, Any]]):
    from PIL import Image

    from snnet.data.transforms import eval_transform
    tf = eval_transform(loaded.data_config)
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    per: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with torch.inference_mode():
        for c in records:
            prob = torch.softmax(loaded.net(x, c).float(), -1)
            top = prob.topk(5, -1)
            per[c] = (top.indices.numpy(), top.values[:, 0].numpy())
    return build(np.arange(len(files)), np.asarray(labels), per, records, prob.shape[-1])


def _cascade(pred, chain: list[int], flops: dict[int, float], target: float) -> dict[str, Any]:
    """The cheapest threshold setting of `chain` reaching `target` top-1 (else the most accurate)."""
    settings = cascade_settings(pred, chain, flops)
    reach = [s for s in settings if s["acc1"] >= target]
    s = min(reach, key=lambda s: s["flops"]) if reach else max(settings, key=lambda s: (s["acc1"], -s["flops"]))
    return {"chain": s["chain"], "thresholds": s["thresholds"], "acc1": s["acc1"], "flops": s["flops"]}


DEIT_CONFIG = ROOT / "configs" / "deit_ti_s_b.json"
DEIT_ANCHORS = [0, 1, 2]


def deit_menu(quick: bool) -> tuple[Any, list[dict[str, Any]], dict[int, dict[str, float]]]:
    """SN-Net's DeiT-Ti/S/B with random weights, the served stitches' records (SN-Net's published top-1 and FLOPs:
    the anchors and up to 10 front stitches) and their batch-1 latency table measured here. Shared with
    benchmarks/serve_sim.py."""
    published = read_results(ROOT / "benchmarks" / "data" / "snnet_deit_ti_s_b_stitches_res.txt")
    torch.manual_seed(0)
    net = build_snnet(parse_stitch_config(json.loads(DEIT_CONFIG.read_text())), pretrained=False,
                      num_classes=1000, img_size=224).eval()
    ids = sorted(set(_front_ids(published, 6 if quick else 10)) | set(DEIT_ANCHORS))
    records = [{**r, "route": net.describe(r["cfg_id"])} for r in published if r["cfg_id"] in ids]
    table = measure_latency(net, ids, (1,), (224, 224), 3, warmup=1, repeats=3 if quick else 5)
    return net, records, table


def deit_net(work: Path, quick: bool) -> Net:
    from PIL import Image
    config = DEIT_CONFIG
    net, records, table = deit_menu(quick)
    anchors = DEIT_ANCHORS
    ckpt = work / "deit_snnet.pth.tar"
    save_checkpoint(ckpt, {"state_dict": net.state_dict(), "epoch": 0,
                           "args": json.dumps({"num_classes": 1000, "img_size": 224, "model_kwargs": {}})})
    results = _with_latency(records, table, work / "deit_res.txt")
    rng = np.random.default_rng(0)
    images = [_png(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)), "JPEG")
              for _ in range(16)]
    # a DeiT-B forward pass takes ~0.3 s on this CPU: three loads, no extra traces, 60 s of arrivals each
    out = Net("DeiT-Ti/S/B", ckpt, config, results, anchors, {r["cfg_id"]: r["acc1"] for r in records}, images,
              None, {c: t["latency_ms_b1"] for c, t in table.items()}, 1, threads=min(2, len(SERVER_CPUS) or 2),
              flops={r["cfg_id"]: float(r["flops"]) for r in records}, loads=(0.5, 1.0, 1.5),
              extra_traces=(), duration=60.0)
    loaded = load_snnet(str(ckpt), str(config))
    _exports(out, loaded, work / "deit_exports")
    return out


def _exports(net: Net, loaded, folder: Path) -> None:
    """The anchors exported separately (the anchors-together system and the largest anchor's memory), and the
    fixed networks: each anchor and the front stitch between the small and the middle anchor."""
    for a in net.anchors:
        export_stitch(loaded, a, folder / f"cfg{a}", formats=())  # safetensors + model.json only
    net.exported = [folder / f"cfg{a}" for a in net.anchors]
    largest = max(net.anchors, key=lambda a: net.flops[a])
    net.largest_export = [folder / f"cfg{largest}"]
    names = ["small", "middle", "large"]
    for a, n in zip(sorted(net.anchors, key=lambda a: net.flops[a]), names):
        net.fixed[f"{n} anchor (cfg {a})"] = a
    lo, hi = sorted(net.flops[a] for a in net.anchors)[1:3]
    between = [c for c in net.acc if c not in net.anchors and lo < net.flops[c] < hi]
    if between:  # the front stitch between the middle and the large anchor with the best top-1 per FLOP
        mid = max(between, key=lambda c: net.acc[c] / net.flops[c])
        net.fixed[f"stitch (cfg {mid})"] = mid


# ------------------------------------------------------------------------------------------------ servers
class Server:
    """One `snnet serve` process (local engine) on a free port; stopped by SIGTERM."""

    def __init__(self, net: Net, what: str, work: Path, exported: list[Path] | None = None,
                 flags: tuple[str, ...] = ()):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        source = ["--exported", *map(str, exported)] if exported else [str(net.checkpoint), "--stitch_config",
                                                                         str(net.config)]
        self.log = work / f"server_{net.name.replace('/', '')}_{what}.log"
        cmd = [sys.executable, "-m", "snnet.cli", "serve", *source, "--results", str(net.results), "--port",
               str(self.port), "--max-batch", str(net.max_batch), "--threads", str(net.threads), "--shed", *flags]
        self.out = open(self.log, "w+")
        env = {**os.environ, "OMP_NUM_THREADS": str(net.threads), "PYTHONPATH": str(ROOT)}
        cpus = SERVER_CPUS or None  # --client-cpus: the servers on the other cores

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=pin if cpus else None)
        self.url = f"http://127.0.0.1:{self.port}/"
        t0 = time.monotonic()
        while "serving" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"server {what} did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        self.started_s = time.monotonic() - t0

    def pss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.out.close()


# ------------------------------------------------------------------------------------------------ one setting
def bodies(net: Net, n: int, budget_ms: float, extra: dict[str, Any], seed: int) -> tuple[list[bytes], list[int]]:
    order = np.random.default_rng(seed).permutation(max(n, len(net.images)))[:n] % len(net.images)
    return ([json.dumps({"image": net.images[i], "budget": {"latency_ms": budget_ms}, "top_k": 1, **extra})
             .encode() for i in order], [int(i) for i in order])


def idle_ms(url: str, net: Net, extra: dict[str, Any], n: int) -> tuple[float, float]:
    """One client, one request at a time, on an idle server: (the end-to-end median, the 95th percentile of
    end-to-end minus server time: HTTP, JSON, the client's own work)."""
    e2e, gaps = [], []
    for i in range(n):
        body = json.dumps({"image": net.images[i % len(net.images)], "top_k": 1, **extra}).encode()
        t0 = time.perf_counter()
        status, a = post(url, body)
        if status == 200:
            e2e.append((time.perf_counter() - t0) * 1e3)
            gaps.append(e2e[-1] - a["server_ms"])
    return percentile(e2e, 50), percentile(gaps, 95)


def served_capacity(url: str, net: Net, cfg_id: int, n: int, concurrency: int) -> float:
    """Requests/s of one network served alone at saturation (closed loop, `concurrency` clients, its batching):
    what the offered loads are multiples of."""
    body = [json.dumps({"image": net.images[i % len(net.images)], "top_k": 1, "cfg_id": cfg_id}).encode()
            for i in range(n)]
    t0 = time.perf_counter()
    replies = run_load(url, body, concurrency=concurrency, time_limit=300)
    return sum(r.status == 200 for r in replies) / (time.perf_counter() - t0)


# what --requests keeps of each answer's body (see docs/serving.md, "Request and answers")
REQUEST_FIELDS = ("cfg_id", "predicted_ms", "within_budget", "elapsed_ms", "server_ms", "batch_size", "queue_depth",
                  "switch_us", "timing_ms")


def run_setting(net: Net, url: str, slo: float, allowance: float, capacity: float, load: float, cv2: float,
                duration: float, extra: dict[str, Any], seed: int, traces: int = 1, stamp: bool = False
                ) -> dict[str, Any]:
    """One system at one (CV^2, load): `traces` independent arrival traces of `duration` s each (seeds `seed`,
    `seed` + 1000, ...; the same for every system), one after another, their requests pooled."""
    rate = load * capacity
    replies, order, due, trace, wall, n = [], [], [], [], 0.0, 0
    for k in range(traces):
        m = max(10, int(rate * duration))
        times = arrival_times(m, rate, cv2, seed=seed + 1000 * k)
        payload, picked = bodies(net, m, slo - allowance, extra, seed + 1000 * k)
        t0 = time.perf_counter()
        got = run_open_loop(url, payload, times, time_limit=float(times[-1]) + 1, timeout=slo / 1e3 * 4 + 10,
                            stamp=stamp)
        wall += max(time.perf_counter() - t0, float(times[-1]))
        for r in got:
            r.index += n
        replies += got
        order += picked
        due += [float(t) for t in times]
        trace += [k] * m
        n += m
    ok = [r for r in replies if r.status == 200]
    in_time = [r for r in ok if r.ms <= slo]
    # each request's credit: 100 when answered correctly in time (digits), its stitch's published top-1 (DeiT), else 0
    credit = np.zeros(n)
    for r in in_time:
        credit[r.index] = 100.0 * (r.body["class"] == net.labels[order[r.index]]) if net.labels is not None \
            else net.acc[r.body["cfg_id"]]
    within = [r for r in ok if r.body["within_budget"]]
    return {"n": n, "answered": len(ok), "shed": sum(r.status == 503 for r in replies),
            "failed": sum(r.status not in (200, 503) for r in replies),
            "attain": len(in_time) / n, "effacc": float(credit.mean()), "credit": credit,
            "top1": statistics.fmean(net.acc[r.body["cfg_id"]] for r in ok) if ok else float("nan"),
            "p50": percentile([r.ms for r in ok], 50), "p99": percentile([r.ms for r in ok], 99),
            "goodput": len(in_time) / wall, "within": len(within),
            "within_met": sum(r.body["elapsed_ms"] <= r.body["budget"]["latency_ms"] for r in within),
            "stitches": len({r.body["cfg_id"] for r in ok}),
            "choose_us": statistics.fmean(r.body["switch_us"] for r in ok) if ok else float("nan"),
            # where an answered request's server time went (means, ms), and its batch's size
            "timing": {k: statistics.fmean(r.body["timing_ms"][k] for r in ok) if ok else float("nan")
                       for k in ("decode", "queue", "forward", "answer")},
            "batch": statistics.fmean(r.body["batch_size"] for r in ok) if ok else float("nan"),
            # the time outside the server (HTTP both ways, the client's own work), 95th percentile
            "outside_p95": percentile([r.ms - r.body["server_ms"] for r in ok], 95),
            "late_send_ms": max((r.late_send_ms for r in replies if r.status), default=0.0),
            # every request, for --requests: its trace, arrival (s into the trace), status, end-to-end ms, credit,
            # and the server's own account of it (stitch, prediction, batch, queue, where its time went)
            "requests": [{"trace": trace[r.index], "i": r.index, "due_s": round(due[r.index], 6), "status": r.status,
                          "ms": None if r.ms != r.ms else round(r.ms, 3), "credit": float(credit[r.index]),
                          **{k: r.body[k] for k in REQUEST_FIELDS if k in r.body}} for r in replies]}


def switch_cost_us(net: Net, rounds: int = 10) -> tuple[float, float]:
    """`net(x, cfg_id)` at batch 1, stitch changing every call vs. grouped by stitch: µs per call (medians)."""
    loaded = load_snnet(str(net.checkpoint), str(net.config))
    ids = sorted(net.acc)
    x = torch.randn(1, loaded.in_chans, *loaded.img_size)
    orders = {"interleaved": [c for _ in range(rounds) for c in ids],
              "grouped": [c for c in ids for _ in range(rounds)]}
    times: dict[str, list[float]] = {k: [] for k in orders}
    torch.set_num_threads(net.threads)
    with torch.inference_mode():
        for c in ids:
            loaded.net(x, c)
        for _ in range(3):
            for name, order in orders.items():
                t0 = time.perf_counter()
                for c in order:
                    loaded.net(x, c)
                times[name].append((time.perf_counter() - t0) / len(order) * 1e6)
    return statistics.median(times["interleaved"]), statistics.median(times["grouped"])


# ------------------------------------------------------------------------------------------------ the run
def measure(net: Net, work: Path, slo_factor: float, scale: float, log, traces: int = 1,
            stamp: bool = False) -> dict[str, Any]:
    largest = max(net.anchors, key=lambda a: net.flops[a])
    systems: dict[str, tuple[str, dict[str, Any]]] = {"switch": ("snnet", {}), GREEDY: ("greedy", {})}
    for name, c in net.fixed.items():
        systems[f"fixed {name}"] = ("snnet", {"cfg_id": c})
    systems["anchors (3 models)"] = ("anchors", {})
    for name, spec in net.cascades.items():
        systems[name] = ("anchors" if name.startswith("anchor") else "snnet",
                         {"cascade": {"chain": spec["chain"], "thresholds": spec["thresholds"]}})
    systems[CONTROL] = ("snnet", {})  # last: the farthest in time from "switch"
    servers = {"snnet": Server(net, "snnet", work), "anchors": Server(net, "anchors", work, net.exported),
               "greedy": Server(net, "greedy", work, flags=("--headroom", "0"))}
    rows: dict[tuple[str, float, float], dict[str, Any]] = {}
    memory: dict[str, float] = {}
    try:
        url = servers["snnet"].url
        fixed_largest = {"cfg_id": largest}
        for server in servers.values():  # warm-up: every server's first batches run cold (lazy allocation)
            for c in net.anchors:
                idle_ms(server.url, net, {"cfg_id": c}, 3)
        e2e, allowance = idle_ms(url, net, fixed_largest, 40 if net.labels is not None else 16)
        slo = slo_factor * e2e  # the deadline: a multiple of the largest anchor's idle end-to-end time
        capacity = served_capacity(url, net, largest, 400 if net.labels is not None else 8,
                                   8 if net.labels is not None else 2)
        log(f"  {net.name}: SLO {slo:.1f} ms ({slo_factor}x the largest anchor's idle end-to-end {e2e:.2f} ms; "
            f"budget sent: the SLO less {allowance:.2f} ms, the client/HTTP time's p95 idle); capacity of the "
            f"largest anchor served alone {capacity:.1f} req/s; servers up in {servers['snnet'].started_s:.1f} s / "
            f"{servers['anchors'].started_s:.1f} s")
        plan = [(MAIN_CV2, load) for load in net.loads] + list(net.extra_traces)
        for cv2, load in plan:
            for name, (server, extra) in systems.items():
                if (cv2, load) in net.extra_traces and name not in (*SWITCHES, "anchors (3 models)") and \
                        not name.startswith("fixed"):
                    continue
                seed = int(load * 100 + cv2)  # the same arrivals and images for every system
                row = run_setting(net, servers[server].url, slo, allowance, capacity, load, cv2,
                                  net.duration * scale, extra, seed, traces, stamp)
                rows[(name, cv2, load)] = row
                log(f"    CV2 {cv2:g} load {load:.2f}x {name:28s} effacc {row['effacc']:6.2f} attain "
                    f"{row['attain']:.3f} top1 {row['top1']:.2f} p99 {row['p99']:.1f} shed {row['shed']}")
        for key, s in servers.items():
            memory[key] = s.pss_mb()
            status, info = get(s.url)
            memory[f"{key}_model_mb"] = info["model_bytes"] / 2 ** 20
    finally:
        for s in servers.values():
            s.stop()
    largest_server = Server(net, "largest", work, net.largest_export)
    try:
        for i in range(5):
            post(largest_server.url, json.dumps({"image": net.images[i], "top_k": 1}).encode())
        memory["largest"] = largest_server.pss_mb()
        memory["largest_model_mb"] = get(largest_server.url)[1]["model_bytes"] / 2 ** 20
    finally:
        largest_server.stop()
    return {"slo": slo, "capacity": capacity, "rows": rows, "memory": memory, "systems": list(systems),
            "switch_us": switch_cost_us(net)}


def margin_se(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The standard error of effective accuracy a - b, both measured on the same arrivals and images: the spread of
    the per-request difference of credit / sqrt(n). A margin within about 2 of these is the trace's luck: one
    request more or less in time. It counts the requests as independent, so it leaves out what moves a whole window
    of them (the machine beside the server): the A/A control (`CONTROL`) measures that, and on 2 shared cores it is
    several times larger (docs/serving.md, "An A/A control")."""
    d = a["credit"] - b["credit"]
    return float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def dominated(sw: dict[str, Any], alt: dict[str, Any]) -> bool:
    return alt["attain"] > sw["attain"] and alt["top1"] > sw["top1"]


def compare(rows: dict[tuple[str, float, float], dict[str, Any]], who: str, cv2: float, load: float
            ) -> tuple[str, float, list[str]]:
    """`who` (switching or its A/A control) at one setting against the alternatives (every system but the
    switching ones): the best alternative by effective accuracy, `who`'s margin over it, and the alternatives that
    dominate `who` (higher SLO attainment and higher mean top-1)."""
    sw = rows[(who, cv2, load)]
    alts = {k[0]: v for k, v in rows.items() if k[1:] == (cv2, load) and k[0] not in SWITCHES}
    best = max(alts, key=lambda k: alts[k]["effacc"])
    return best, sw["effacc"] - alts[best]["effacc"], [k for k, v in alts.items() if dominated(sw, v)]


def report(nets: list[Net], runs: list[dict[str, Any]], header: list[str]
           ) -> tuple[list[str], dict[str, float], dict[str, float]]:
    """The tables, the RESULT values and the A/A control's (`CONTROL`) values."""
    lines = list(header)
    margins, dom, within, within_met = [], 0, 0, 0
    aa: list[float] = []  # the control's effective accuracy - switching's, every setting
    ctl_margins, ctl_dom = [], 0
    for net, run in zip(nets, runs):
        rows = run["rows"]
        lines += ["", f"## {net.name}: SLO {run['slo']:.1f} ms end to end, capacity {run['capacity']:.1f} req/s"
                  f"{'' if net.labels is not None else ' (expected effective accuracy: published top-1 per answer)'}",
                  "", "| trace | load | system | effective acc | SLO attained | mean top-1 | p50 ms | p99 ms | "
                  "goodput /s | shed | stitches | within met |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"
                  "---:|---:|"]
        for (name, cv2, load), r in sorted(rows.items(), key=lambda kv: (kv[0][1] != MAIN_CV2, kv[0][1],
                                                                           kv[0][2], run["systems"].index(kv[0][0]))):
            wm = f"{100 * r['within_met'] / r['within']:.0f}%" if r["within"] else "-"
            lines.append(f"| CV2 {cv2:g} | {load:.2f}x | {name} | {r['effacc']:.2f} | {100 * r['attain']:.1f}% | "
                         f"{r['top1']:.2f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['goodput']:.1f} | {r['shed']} | "
                         f"{r['stitches']} | {wm} |")
            within += r["within"]
            within_met += r["within_met"]
        control = any(k[0] == CONTROL for k in rows)
        here: list[float] = []  # this network's control - switching
        aa_head = " A/A: again - switch | the control's margin |" if control else ""
        lines += ["", "| trace | load | switch effective acc | best alternative | its effective acc | margin | "
                  "noise (1 SE) | dominated by |" + aa_head,
                  "|---|---:|---:|---|---:|---:|---:|---|" + ("---:|---:|" if control else "")]
        for cv2, load in sorted({(k[1], k[2]) for k in rows}):
            sw = rows[("switch", cv2, load)]
            best, margin, over = compare(rows, "switch", cv2, load)
            if cv2 == MAIN_CV2:
                margins.append(margin)
                dom += bool(over)
            alt = rows[(best, cv2, load)]
            line = (f"| CV2 {cv2:g} | {load:.2f}x | {sw['effacc']:.2f} | {best} | {alt['effacc']:.2f} | "
                    f"{margin:+.2f} | {margin_se(sw, alt):.2f} | {', '.join(over) or '-'} |")
            if control:
                _, ctl_margin, ctl_over = compare(rows, CONTROL, cv2, load)
                here.append(rows[(CONTROL, cv2, load)]["effacc"] - sw["effacc"])
                if cv2 == MAIN_CV2:
                    ctl_margins.append(ctl_margin)
                    ctl_dom += bool(ctl_over)
                line += f" {here[-1]:+.2f} | {ctl_margin:+.2f} |"
            lines.append(line)
        if control:
            aa += here
            lines += ["", f"A/A control: the switching server measured again, last in each setting, differed from "
                      f"its first measurement by {statistics.fmean(abs(d) for d in here):.2f} points of effective "
                      f"accuracy on average, {max(abs(d) for d in here):.2f} at most: the machine's own noise between "
                      f"two windows of the same run, beside which the margins above are to be read"]
        at = 1.0 if any(k[1:] == (MAIN_CV2, 1.0) for k in rows) else max(k[2] for k in rows)
        lines += ["", f"where an answered request's server time went at CV2 {MAIN_CV2:g}, {at:g}x (means, ms; "
                  "choosing: the dispatch's choice of stitch and batch, µs per batch; outside: the client's end to end "
                  "less the server's time, HTTP both ways and the client's own work, 95th percentile):", "",
                  "| system | decode | queue | forward | answer | batch size | choosing µs | outside p95 |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name in run["systems"]:
            r = rows.get((name, MAIN_CV2, at))
            if r is not None:
                t = r["timing"]
                lines.append(f"| {name} | {t['decode']:.2f} | {t['queue']:.2f} | {t['forward']:.2f} | "
                             f"{t['answer']:.2f} | {r['batch']:.1f} | {r['choose_us']:.0f} | {r['outside_p95']:.2f} |")
        m = run["memory"]
        inter, grouped = run["switch_us"]
        choose_us = statistics.fmean(r["choose_us"] for r in rows.values() if math.isfinite(r["choose_us"]))
        lines += ["", f"memory (PSS after the load): SN-Net server {m['snnet']:.0f} MiB (weights "
                  f"{m['snnet_model_mb']:.1f} MiB), anchors server {m['anchors']:.0f} MiB (weights "
                  f"{m['anchors_model_mb']:.1f} MiB), largest anchor alone {m['largest']:.0f} MiB (weights "
                  f"{m['largest_model_mb']:.1f} MiB): SN-Net / largest anchor = {m['snnet'] / m['largest']:.2f}x "
                  f"(weights {m['snnet_model_mb'] / m['largest_model_mb']:.2f}x)",
                  f"switch cost: choosing at dispatch {choose_us:.0f} µs (mean over settings with answers); "
                  f"net(x, cfg_id) at batch 1: {inter:.0f} µs per call with the stitch changing every call vs "
                  f"{grouped:.0f} µs grouped ({inter - grouped:+.0f} µs per switch)"]
    result = {"worst_margin_effacc": min(margins), "dominated": dom,
              "within_met": within_met / within if within else float("nan")}
    controls = {"aa_mean_abs": statistics.fmean(abs(d) for d in aa), "aa_largest_abs": max(abs(d) for d in aa),
                "control_worst_margin": min(ctl_margins), "control_dominated": ctl_dom} if aa else {}
    return lines, result, controls


def plot(nets: list[Net], runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(nets), figsize=(6.5 * len(nets), 4.6))
    for ax, net, run in zip(np.atleast_1d(axes), nets, runs):
        others = iter(f"C{i}" for i in range(10) if i != 3)  # red (C3) is switching's alone
        for name in run["systems"]:
            pts = sorted((k[2], v["effacc"]) for k, v in run["rows"].items() if k[0] == name and k[1] == MAIN_CV2)
            style = {"lw": 2.6, "color": "C3", "zorder": 5} if name == "switch" else \
                {"lw": 1.4, "color": "C3", "ls": "--", "alpha": 0.7} if name == GREEDY else \
                {"lw": 1.4, "color": "C3", "ls": ":", "alpha": 0.9} if name == CONTROL else \
                {"lw": 1.2, "alpha": 0.85, "color": next(others)}
            ax.plot(*zip(*pts), marker="o", ms=4, label="SN-Net switching" if name == "switch" else name, **style)
        ax.set_xlabel(f"offered load (x the largest anchor's served capacity, {run['capacity']:.1f} req/s)")
        ax.set_ylabel("effective accuracy (%)" + ("" if net.labels is not None else ", expected"))
        kind = "real digits, per-answer correctness" if net.labels is not None else \
            "random weights: expected = published top-1 per answer in time"
        ax.set_title(f"{net.name} (bursty CV²={MAIN_CV2:g}, SLO {run['slo']:.0f} ms)\n{kind}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_serve.txt"))
    p.add_argument("--plot", default=str(ROOT / "results" / "serve_effacc.png"))
    p.add_argument("--slo-factor", type=float, default=3.0)
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply every setting's seconds of arrivals (digits 10 s, DeiT 60 s) by this")
    p.add_argument("--traces", type=int, default=1,
                   help="independent arrival traces per setting, pooled (each of the setting's seconds x --scale)")
    p.add_argument("--nets", default="digits,deit")
    p.add_argument("--quick", action="store_true", help="a smoke run: a fifth of the arrivals, fewer stitches")
    p.add_argument("--client-cpus", default="",
                   help="cores for this process (the load generator, the latency tables), e.g. '1'; the servers run "
                        "on the others, as serving research runs its clients on other machines (default: no pinning)")
    p.add_argument("--requests", default="",
                   help="also write every request of every setting to this file as JSON lines (gzip where the name "
                        "ends in .gz): network, system, CV2, load, trace, arrival, status, end-to-end ms, credit and "
                        "the server's own account; what each row of the tables came from")
    p.add_argument("--sent-at", action="store_true",
                   help="every request carries the time it was due (sent_at), so each server counts its budget "
                        "from then, not from when it read the request (default: from when it read it)")
    args = p.parse_args()
    if args.traces < 1:
        p.error(f"--traces {args.traces}: pass 1 or more")
    if args.client_cpus:
        every = os.sched_getaffinity(0)
        try:
            client = {int(c) for c in args.client_cpus.split(",")}
        except ValueError:
            p.error(f"--client-cpus {args.client_cpus!r}: pass core numbers separated by commas, e.g. 1")
        if not client < every:
            p.error(f"--client-cpus {args.client_cpus!r}: pass some but not all of this process's cores "
                    f"{sorted(every)}, so that the servers keep at least one")
        SERVER_CPUS.update(every - client)
        os.sched_setaffinity(0, client)
        torch.set_num_threads(len(client))
    scale = 0.2 if args.quick else args.scale
    t_start = time.time()
    out: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        out.append(line)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        nets, runs = [], []
        for name in args.nets.split(","):
            log(f"building {name} ...")
            net = digits_net(work, args.quick) if name == "digits" else deit_net(work, args.quick)
            log(f"  {net.name}: {len(net.acc)} stitches served, batch-1 ms "
                f"{min(net.latency.values()):.2f} .. {max(net.latency.values()):.2f}; fixed: {net.fixed}; "
                f"cascades: {net.cascades}")
            nets.append(net)
            runs.append(measure(net, work, args.slo_factor, scale, log, args.traces, args.sent_at))
    load1, load5, load15 = os.getloadavg()
    cmd = " ".join(["$ .venv/bin/python benchmarks/serve_load.py", *sys.argv[1:]])
    header = [f"{cmd}   # {time.strftime('%Y-%m-%d')}, {(time.time() - t_start) / 60:.1f} min",
              f"machine: {os.cpu_count()} CPU cores, load average {load1:.1f} / {load5:.1f} / {load15:.1f} "
              f"(1/5/15 min) at the end",
              "load: open loop, gamma inter-arrival times at offered loads in x the capacity of the largest anchor "
              "served alone (closed-loop saturation through the same server); "
              + "; ".join(f"{n.name}: CV2 {MAIN_CV2:g} at {', '.join(f'{x:g}' for x in n.loads)}x"
                          + "".join(f", CV2 {c:g} at {x:g}x" for c, x in n.extra_traces)
                          + (f", {args.traces} traces of {n.duration * scale:g} s of arrivals per setting"
                             if args.traces > 1 else f", {n.duration * scale:g} s of arrivals per setting")
                          for n in nets)
              + "; every server: snnet serve --engine local --shed (the same scheduler)"
              + (f"; client on cores {args.client_cpus}, servers on cores {','.join(map(str, sorted(SERVER_CPUS)))}"
                 if SERVER_CPUS else "; client and servers on the same cores")
              + ("; every request carries sent_at (budgets count from the time it was due)" if args.sent_at else "")]
    lines, result, controls = report(nets, runs, header)
    plot(nets, runs, Path(args.plot))
    lines.append("")
    if controls:  # what the RESULT statistics read for a system identical to switching (see CONTROL)
        lines.append("CONTROL " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in controls.items()))
    lines.append("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in result.items()))
    text = "\n".join(lines) + "\n"
    if args.requests:  # gzip-compressed where the name ends in .gz
        jsonl = "".join(json.dumps({"net": net.name, "system": name, "cv2": cv2, "load": load, **req}) + "\n"
                        for net, run in zip(nets, runs) for (name, cv2, load), row in run["rows"].items()
                        for req in row["requests"])
        with atomic_path(args.requests) as tmp:
            with (gzip.open(tmp, "wt") if args.requests.endswith(".gz") else open(tmp, "w")) as f:
                f.write(jsonl)
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
