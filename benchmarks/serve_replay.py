"""Does SN-Net switching serve more requests correctly within their deadline than the alternatives? A calibrated
replay of the server's own policy on traces nobody tuned on.

Live runs on two shared cores move by several points between identical runs, more than
the margins they look for. This benchmark takes the machine's noise out and keeps its costs: it replays *the
server's own scheduler* (snnet/serve/scheduler.py: `DeadlineScheduler.admit`, `.take` and `.done_batch`, the
learned batch times and answer times on a virtual clock) and charges every cost measured on this machine:

* **calibration** (`--calibrate`, committed as results/serve_calibration.json with its provenance): for each
  served stitch and batch size 1, 2, 4, 8 the forward pass's time as a distribution (samples); the time to decode
  and transform a request's image and the time to answer (softmax, top-k, JSON); the dispatch's own cost
  (`take`) against the queue's depth, switching and fixed; digits: every served stitch's prediction and confidence
  on each validation image. The server's latency table is what `snnet serve` measures at start (the medians at
  batch 1 and 8).
* **the replay**: requests arrive open loop; one decoding thread (decode + transform: the event loop's core)
  admits them in order; the worker runs the scheduler's batches one after another, each charged the dispatch's
  cost at its depth and a forward time drawn from the calibrated distribution of its stitch and size, then each
  answer its answer time. A request earns its stitch's correctness (digits: the real prediction on its image;
  DeiT: SN-Net's published top-1 / 100, the *expected* correctness) when answered within the SLO, else nothing
  (late, or shed: every system runs with shedding, as `snnet serve --shed`). Every system sees the same arrivals,
  images and random numbers (per request: its decode, forward and answer draws).

Settings (frozen from the calibration before any trace is drawn): arrivals Poisson, gamma CV^2 4 and 8, and on/off
bursts (Poisson at 3x the mean rate for exponential ON periods of 20 SLOs on average, none for 40); loads
0.5x..3x the capacity of the largest anchor at batch 1; SLO 3x the largest anchor's batch-1 time plus the median
decode and answer times; batches of up to 8; both networks (digits: the committed demo SN-Net; DeiT-Ti/S/B:
random weights for the timing, SN-Net's published top-1 for the credit).

Systems: **switch** (the SN-Net's front, `snnet serve`'s planner); every **fixed** stitch, the best per setting
chosen on the *tuning* traces (seeds 0..9) and judged on the evaluation traces; **anchors** (the anchors alone,
the same planner: INFaaS-style model switching); digits also the **anchor cascade** and the **SN-Net cascade**
(run the cheap stage, escalate an unsure answer when its deadline allows; thresholds from the demo's predictions,
as serve_live's plan). The planner's rule (its three knobs: counting the arrivals a batch holds up, running the
queue behind the head on the same stitch or on the fastest, and the modes: one stitch always, or a choice among the
fastest few, where the server's own simulation says it serves the measured load better) is chosen on the tuning
traces too, over both networks, and the rules that differ from it in one knob are reported beside it on the
evaluation traces. The replayed server has run for a while: its mode tables are simulated from every calibrated
forward time of every stitch (once, before the traces) and it knows its answer time; each trace learns its batch
times afresh.

Per setting: switching minus each alternative, the paired mean over the evaluation traces with its 95 % interval
(t). Evaluation traces are seeds `--seed-offset` + 0..`--traces`-1 (pass an offset nobody chose).

    .venv/bin/python benchmarks/serve_replay.py --calibrate          # ~3 min, idle machine: the calibration
    .venv/bin/python benchmarks/serve_replay.py --calibrate-choice   # after a change to the scheduler: its cost
    .venv/bin/python benchmarks/serve_replay.py --seed-offset N > results/bench_serve_replay.txt

Last line: RESULT replay_behind=<b> replay_ahead_deit=<a> replay_settings_deit=<s> choice_p99_us=<c>: b = settings
(both networks) where an alternative is ahead beyond its interval, a = DeiT settings where switching is ahead of
every alternative beyond the intervals, s = DeiT settings, c = the dispatch's 99th-percentile cost (calibration).
"""
from __future__ import annotations

import argparse
import base64
import inspect
import io
import json
import math
import multiprocessing
import os
import platform
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

from serve_plan import MAX_BATCH, choice_costs, menu_of  # noqa: E402

from snnet.deploy.export import labelled  # noqa: E402
from snnet.results.quality import pareto_front  # noqa: E402
from snnet.results.records import read_results  # noqa: E402
from snnet.serve import simulate  # noqa: E402
from snnet.serve.estimates import Learned  # noqa: E402
from snnet.serve.policy import StitchMenu  # noqa: E402
from snnet.serve.scheduler import GAPS, DeadlineScheduler, Pending  # noqa: E402
from snnet.serve.simulate import ONOFF, VirtualClock, arrival_times, onoff_times  # noqa: E402
from snnet.stitching.build import build_snnet  # noqa: E402
from snnet.stitching.config import parse_stitch_config  # noqa: E402
from snnet.utils.fileio import write_text_atomic  # noqa: E402  (after the path insert: runs from a checkout)

CALIBRATION = ROOT / "results" / "serve_calibration.json"
DEIT_CONFIG = ROOT / "configs" / "deit_ti_s_b.json"
DEIT_ANCHORS = [0, 1, 2]
SIZES = (1, 2, 4, 8)
ARRIVALS = ("poisson", "gamma4", "gamma8", "onoff")
LOADS = (0.5, 1.0, 1.5, 2.0, 3.0)
SLO_FACTOR = 3.0
TUNING_SEEDS = range(10)
WARM_SEED = 1 << 40  # + a trace's seed: the arrivals before it (`history`), apart from every trace's seeds
#: the planner's rules (snnet/serve/scheduler.py `Rule`): the server's default and each knob off in turn; the one
#: that scores best on the tuning traces is "switch" on the evaluation traces, the others are shown beside it (not
#: alternatives). tests/test_serve.py checks that the committed run's winner is the server's default.
RULES = {"switch, modes, arrivals, rest on same": {},
         "switch, arrivals, rest on same": {"modes": False},
         "switch, modes, arrivals, rest on fastest": {"rest_on_same": False},
         "switch, modes, no arrivals, rest on same": {"arrivals": False}}
KNOBS = ("modes", "arrivals", "rest_on_same")


# ------------------------------------------------------------------------------------------------ the networks
def png(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return base64.b64encode(buf.getvalue()).decode()


def front_ids(records: list[dict[str, Any]], most: int) -> list[int]:
    """The FLOPs-accuracy front's cfg_ids, thinned to at most `most` spread over its FLOPs range (ends kept)."""
    front = sorted(pareto_front(records), key=lambda r: r["flops"])
    if len(front) <= most:
        return [r["cfg_id"] for r in front]
    picks = np.unique(np.round(np.linspace(0, len(front) - 1, most)).astype(int))
    return [front[i]["cfg_id"] for i in picks]


def deit_served() -> tuple[Any, list[dict[str, Any]]]:
    """SN-Net's DeiT-Ti/S/B with random weights (seed 0) and the served stitches' records: SN-Net's published top-1
    and FLOPs of the anchors and 10 front stitches: the network the calibration times and serve_live.py serves."""
    published = read_results(ROOT / "benchmarks" / "data" / "snnet_deit_ti_s_b_stitches_res.txt")
    torch.manual_seed(0)
    net = build_snnet(parse_stitch_config(json.loads(DEIT_CONFIG.read_text())), pretrained=False,
                      num_classes=1000, img_size=224).eval()
    ids = sorted(set(front_ids(published, 10)) | set(DEIT_ANCHORS))
    return net, [{**r, "route": net.describe(r["cfg_id"])} for r in published if r["cfg_id"] in ids]


def deit_images(n: int = 16) -> list[str]:
    """`n` random 256x256 JPEG images, base64: the DeiT requests' images."""
    from PIL import Image
    rng = np.random.default_rng(0)
    return [png(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)), "JPEG") for _ in range(n)]


# ------------------------------------------------------------------------------------------------ calibration
def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _predictions(loaded, files: list[Path], labels: list[int], records: dict[int, dict[str, Any]]):
    """Every served stitch's top-5 and confidence on the validation images (as the demo's evaluation computes)."""
    from PIL import Image

    from snnet.data.transforms import eval_transform
    from snnet.results.predictions import build_predictions
    tf = eval_transform(loaded.data_config)
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    per: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    with torch.inference_mode():
        for c in records:
            prob = torch.softmax(loaded.net(x, c).float(), -1)
            top = prob.topk(5, -1)
            per[c] = (top.indices.numpy(), top.values[:, 0].numpy())
    return build_predictions(np.arange(len(files)), np.asarray(labels), per, records, prob.shape[-1])


def _cascade(pred, chain: list[int], flops: dict[int, float], target: float) -> dict[str, Any]:
    """The cheapest threshold setting of `chain` reaching `target` top-1 (else the most accurate), chosen on the
    served images' own predictions: an optimistic baseline."""
    from snnet.results.baselines import cascade_settings
    settings = cascade_settings(pred, chain, flops)
    reach = [s for s in settings if s["acc1"] >= target]
    s = min(reach, key=lambda s: s["flops"]) if reach else max(settings, key=lambda s: (s["acc1"], -s["flops"]))
    return {"chain": s["chain"], "thresholds": s["thresholds"], "acc1": s["acc1"], "flops": s["flops"]}


def _digits(work: Path) -> dict[str, Any]:
    from PIL import Image

    from snnet.data.transforms import eval_transform
    from snnet.demo import write_digits
    from snnet.deploy.export import load_snnet
    data = write_digits(work / "digits")
    val = sorted((data / "val").glob("*/*.png"))
    classes = sorted(p.name for p in (data / "val").iterdir())
    labels = [classes.index(p.parent.name) for p in val]
    loaded = load_snnet(str(ROOT / "results" / "demo" / "snnet.pth.tar"), str(ROOT / "configs" / "demo_digits.json"))
    every = read_results(ROOT / "results" / "demo" / "stitches_res.txt")
    anchors = [0, 1, 2]
    ids = sorted(set(front_ids(every, 12)) | set(anchors))
    records = [r for r in every if r["cfg_id"] in ids]
    by_id = {r["cfg_id"]: r for r in records}
    pred = _predictions(loaded, val, labels, by_id)
    rows = {c: pred.row(c) for c in ids}
    flops = {r["cfg_id"]: float(r["flops"]) for r in every}
    top = max(by_id[a]["acc1"] for a in anchors)
    front = sorted((c for c in ids if c not in anchors), key=lambda c: flops[c])
    best = max(ids, key=lambda c: (by_id[c]["acc1"], -flops[c]))
    cascades = {"anchor cascade": _cascade(pred, anchors, flops, top),
                "SN-Net cascade": _cascade(pred, [front[0], best], flops, by_id[best]["acc1"])}
    bodies = [json.dumps({"image": png(Image.open(p).convert("RGB")), "budget": {"latency_ms": 20}}) for p in val]
    return {"net": loaded.net, "tf": eval_transform(loaded.data_config), "records": records, "anchors": anchors,
            "bodies": bodies, "threads": 1, "cascades": cascades,
            "correct": {c: pred.correct[rows[c]].astype(int).tolist() for c in ids},
            "confidence": {c: np.round(pred.top_prob[rows[c]].astype(float), 5).tolist() for c in ids}}


def _deit() -> dict[str, Any]:
    from snnet.data.transforms import eval_transform
    net, records = deit_served()
    bodies = [json.dumps({"image": image, "budget": {"latency_ms": 2000}}) for image in deit_images()]
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
           "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    return {"net": net, "tf": eval_transform(cfg), "records": records, "anchors": DEIT_ANCHORS, "bodies": bodies,
            "threads": 1, "cascades": {}}


def _decode(body: str, tf) -> torch.Tensor:
    from PIL import Image
    req = json.loads(body)
    return tf(Image.open(io.BytesIO(base64.b64decode(req["image"]))).convert("RGB"))


def calibrate(out: Path, quick: bool, note: str = "", names: tuple[str, ...] = ("digits", "deit")) -> None:
    """Measure on one core with one thread: where benchmarks/serve_live.py runs its servers (the load generator on
    the other core), so that the live validation checks the replay on the machine it was calibrated on. `names`:
    the networks measured (serve_live.py measures DeiT again at its start: this machine's speed moves by a third
    between hours)."""
    t_start = time.time()
    _one_core()
    repeats = 5 if quick else 40
    nets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, made in (("digits", lambda: _digits(Path(tmp))), ("deit", _deit)):
            if name not in names:
                continue
            m = made()
            torch.set_num_threads(m["threads"])
            ids = [r["cfg_id"] for r in m["records"]]
            xs = [_decode(b, m["tf"]) for b in m["bodies"]]
            service: dict[str, dict[str, list[float]]] = {}
            with torch.inference_mode():
                for size in SIZES:
                    x = torch.stack([xs[k % len(xs)] for k in range(size)])
                    n = repeats if name == "digits" else max(3, repeats // (4 * size))
                    for c in ids:
                        forward = (lambda net=m["net"], x=x, c=c: net(x, c))
                        forward()  # warm-up
                        service.setdefault(str(c), {})[str(size)] = sorted(_timed(forward, n))
                    print(f"calibrate {name}: batch {size} done ({time.time() - t_start:.0f} s)", file=sys.stderr)
            bodies = iter(m["bodies"] * (4 * repeats))
            decode = sorted(_timed(lambda tf=m["tf"], bodies=bodies: _decode(next(bodies), tf), 4 * repeats))
            logits = m["net"](xs[0][None], ids[0]).detach()
            answer_ms = sorted(_timed(lambda logits=logits: json.dumps(labelled(logits, None, 5)[0]), 4 * repeats))
            nets[name] = {"records": m["records"], "anchors": m["anchors"], "threads": m["threads"],
                          "service_ms": service, "decode_ms": decode, "answer_ms": answer_ms,
                          "cascades": m["cascades"], "images": len(m["bodies"]),
                          **({"correct": {str(c): v for c, v in m["correct"].items()},
                              "confidence": {str(c): v for c, v in m["confidence"].items()}}
                             if "correct" in m else {})}
            nets[name]["choice_us"] = choice_us(nets[name], 200 if quick else 2000)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    saved = {"measured": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
                          "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}",
                          "torch": torch.__version__, "load_average_after": round(os.getloadavg()[0], 2),
                          "command": "benchmarks/serve_replay.py --calibrate" + (" --quick" if quick else "")
                          + ("" if set(names) == {"digits", "deit"} else " --nets " + " ".join(names)),
                          "cores": sorted(os.sched_getaffinity(0)), "note": note,
                          "seconds": round(time.time() - t_start)},
             "nets": nets}
    write_text_atomic(out, json.dumps(saved, indent=1) + "\n")
    print(f"calibration written to {out} in {time.time() - t_start:.0f} s", file=sys.stderr)


def _one_core() -> None:
    """Run on the first core only (the server's core in benchmarks/serve_live.py; the other is the client's)."""
    cores = os.sched_getaffinity(0)
    if len(cores) > 1:
        os.sched_setaffinity(0, cores - {max(cores)})


def choice_us(cal: dict[str, Any], repeats: int) -> dict[str, dict[str, list[float]]]:
    """The dispatch's cost for one network's calibration (serve_plan.py's measurement: {"switch" (the front),
    "fixed" (the largest anchor): {depth: [p50 µs, p99 µs]}}) at the calibrated SLO."""
    menu, largest, _ = menu_of(cal)
    slo = SLO_FACTOR * menu.batch_ms(largest, 1) + float(np.median(cal["decode_ms"])) + \
        float(np.median(cal["answer_ms"]))
    return choice_costs({"switch": (menu, menu.front(), slo), "fixed": (menu, [largest], slo)}, repeats)


def calibrate_choice(path: Path, note: str, repeats: int = 2000) -> None:
    """Measure the dispatch's cost again into the calibration at `path`, its forward, decode and answer times kept:
    the dispatch's cost is the code's (a change to the scheduler), the rest is the machine's. Its provenance goes
    under measured["choice_us"]."""
    t_start = time.time()
    _one_core()
    saved = json.loads(path.read_text())
    for cal in saved["nets"].values():
        cal["choice_us"] = choice_us(cal, repeats)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    saved["measured"]["choice_us"] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
                                      "command": "benchmarks/serve_replay.py --calibrate-choice", "note": note,
                                      "cores": sorted(os.sched_getaffinity(0)),
                                      "load_average_after": round(os.getloadavg()[0], 2),
                                      "seconds": round(time.time() - t_start)}
    write_text_atomic(path, json.dumps(saved, indent=1) + "\n")
    print(f"the dispatch's cost measured again into {path} in {time.time() - t_start:.0f} s", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ the replay
class Calibrated:
    """One network's calibration, ready to draw from."""

    def __init__(self, name: str, cal: dict[str, Any]):
        self.name = name
        self.records = cal["records"]
        self.anchors = cal["anchors"]
        self.service = {int(c): {int(b): list(v) for b, v in t.items()} for c, t in cal["service_ms"].items()}
        self.decode, self.answer = np.array(cal["decode_ms"]), np.array(cal["answer_ms"])
        self.menu, self.largest, _ = menu_of(cal)
        b1 = self.menu.batch_ms(self.largest, 1)
        self.slo_ms = SLO_FACTOR * b1 + float(np.median(self.decode)) + float(np.median(self.answer))
        self.capacity = 1e3 / b1
        self.images = int(cal["images"])
        if "correct" in cal:
            self.correct = {int(c): [float(x) for x in v] for c, v in cal["correct"].items()}
            self.confidence = {int(c): list(v) for c, v in cal["confidence"].items()}
        else:  # the expected correctness: the published top-1
            self.correct = {c: [r["acc1"] / 100.0] * self.images for c, r in self.menu.by_id.items()}
            self.confidence = {}
        self.tables: dict = {}  # the schedulers' choice tables, built once for every trace replayed here
        # what a server that has run for a while has measured (its mode tables are simulated from it): every
        # calibrated forward time of every stitch and size, and the decoding times
        self.warm = Learned.on(VirtualClock())
        for c in self.menu.cfg_ids:
            for b, samples in sorted(self.service[c].items()):
                for ms in samples:
                    self.warm.batches.add(self.menu.batch_ms(c, b), ms, c)
        for ms in self.decode:
            self.warm.before_ms.add(float(ms))
        self.after_p95 = float(np.quantile(self.answer, 0.95))
        self.cascades = cal.get("cascades", {})
        choice = cal["choice_us"]
        deepest = max(int(d) for v in choice.values() for d in v)
        self.choice = {k: np.interp(np.arange(deepest + 1), [int(d) for d in v], [p[0] for p in v.values()]).tolist()
                       for k, v in choice.items()}  # µs at each depth up to the deepest measured
        self.choice_p99 = max(p[1] for v in choice.values() for p in v.values())

    def service_ms(self, c: int, n: int, u: float) -> float:
        """The forward time of a batch of `n` on `c` at quantile `u` of its calibrated distribution (sizes
        between the measured ones: linear between their quantiles)."""
        table = self.service[c]
        if n in table:
            s = table[n]
            return s[min(int(u * len(s)), len(s) - 1)]
        lo = max(b for b in table if b < n)
        hi = min((b for b in table if b > n), default=None)
        if hi is None:
            full, rest = divmod(n, lo)
            return full * self.service_ms(c, lo, u) + (self.service_ms(c, rest, u) if rest else 0.0)
        a, b = self.service_ms(c, lo, u), self.service_ms(c, hi, u)
        return a + (b - a) * (n - lo) / (hi - lo)

    def choose_us(self, kind: str, depth: int) -> float:
        at = self.choice[kind]
        return at[min(depth, len(at) - 1)]


def arrivals(kind: str, n: int, rate: float, slo_s: float, seed: int) -> np.ndarray:
    if kind == "poisson":
        return arrival_times(n, rate, 1.0, seed)
    if kind.startswith("gamma"):
        return arrival_times(n, rate, float(kind[5:]), seed)
    return onoff_times(n, rate, ONOFF[0] * slo_s, ONOFF[1] * slo_s, seed)  # Poisson at 3x the rate while ON


def history(kind: str, rate: float, slo_s: float, seed: int) -> np.ndarray:
    """The arrivals a server saw before a trace began (the same load, its own random numbers), ending before 0."""
    past = arrivals(kind, GAPS + 1, rate, slo_s, WARM_SEED + seed)
    return past - past[-1] - 1.0 / rate


def replay(net: Calibrated, system: dict[str, Any], times: np.ndarray, draws: np.ndarray,
           seen: np.ndarray | None = None, speed: float | Callable[[float], float] = 1.0,
           past: list[tuple[float, str, tuple[float, ...]]] | None = None,
           tables_from: list[tuple[list[int], int, int]] | None = None) -> dict[str, float]:
    """One system on one trace: effective accuracy (percent), SLO attainment, shed share, mean FLOPs. `seen`: the
    arrivals before it (`history`), which the server has counted. `speed`: the machine's forward times over the
    calibration's, one number or a function of the trace's time (serve_live.py: measured through a live run; the
    server's latency table stays the calibration's, and it learns the difference from its batches as a live server
    does).

    Without `past` the server is one that has run for a while on this calibration: its mode tables simulated from
    every calibrated forward time. `past` is one live server's own history before the trace (serve_live.py: its
    warm-up and earlier traces), (time, kind, values) on the trace's clock with kind "plan" (a batch was chosen:
    where the live server looked its mode table up, and simulated one when its batches measured had grown enough),
    "batch" (cfg_id, batch size, forward ms), "before" (decode ms) or "after" (ms from a batch's end to its
    answer): fed to the replayed server's own estimates in time order with the arrivals `seen`, so that it starts
    the trace with the slowdown, jitter, answer time and mode tables that live server had (simulated from its
    measured batches by the same code). `tables_from`: the live server's mode tables in use when the trace began,
    (candidates, budget bucket, batches measured when it was simulated) as its GET / reported them: each is
    simulated when the replayed server has measured as many, and none changes during the trace (a live server
    simulates a new one in the background while idle); without it, a table is simulated where the live server's
    rule asked for one ("plan") and takes over at once."""
    n = len(times)
    clock = VirtualClock()
    own = past is not None
    sched = DeadlineScheduler(lambda x, c: x, net.menu, MAX_BATCH, shed=True, arrivals=system.get("arrivals", True),
                              rest_on_same=system.get("rest_on_same", True), modes=system.get("modes", True),
                              clock=clock, tables=_without_modes(net.tables) if own else net.tables, build_now=True)
    sched.learned = Learned.on(clock, after_ms=net.after_p95)  # a server that has answered before
    if not own:  # its mode tables are simulated from the warm server's measurements, not from the trace's
        mode = sched.choices.mode
        sched.choices.mode = lambda lane, budget_ms, load, _: mode(lane, budget_ms, load, net.warm)  # type: ignore[method-assign]
        for t in (seen if seen is not None else ()):
            sched.arrivals.add(float(t))
    else:
        sched.choices.simulate = _simulated_once(sched.choices.simulate, sched.rule)  # type: ignore[method-assign]
        lane = sched.choices.lane(tuple(system["stages"][0])) if len(system["stages"][0]) > 1 else None
        timeline = sorted([(float(t), "arrive", ()) for t in (seen if seen is not None else ())] + list(past or ()),
                          key=lambda e: e[0])
        known = {b: n for c, b, n in tables_from or () if lane is not None and tuple(c) == lane.candidates}
        for t, what, values in timeline:
            clock.now = t
            if what == "arrive":
                sched.arrivals.add(t)
            elif what == "plan":
                if lane is not None and sched.rule.modes and tables_from is None:
                    sched.choices.mode(lane, net.slo_ms - sched.learned.after_ms.value, sched.arrivals.load(),
                                       sched.learned)
            elif what == "batch":
                sched.done_batch(int(values[0]), int(values[1]), values[2])
                for bucket, count in known.items():
                    if lane is not None and sched.learned.batches.count == count:
                        lane.modes[bucket] = sched.choices.simulate(lane.candidates, bucket, sched.learned)
                        lane.built[bucket] = count
            elif what == "before":
                sched.observe_before(values[0])
            else:
                sched.observe_after(values[0])
        if tables_from is not None:  # the live server's tables stay for the trace
            sched.choices.simulate = lambda c, b, _: sched.choices.lane(c).modes.get(b)  # type: ignore[method-assign]
        clock.now = 0.0
    kind = "fixed" if len(system["stages"][0]) == 1 else "switch"
    slo = net.slo_ms / 1e3
    image = (draws[:, 0] * net.images).astype(int).tolist()
    decode = (net.decode[(draws[:, 1] * len(net.decode)).astype(int)] / 1e3).tolist()
    answer = (net.answer[(draws[:, 3] * len(net.answer)).astype(int)] / 1e3).tolist()
    u_service = draws[:, 2].tolist()
    times = times.tolist()
    stages, thresholds = system["stages"], system.get("thresholds", [])
    owner: dict[int, tuple[int, int]] = {}
    x = torch.empty(0)

    def job(i: int, stage: int) -> Pending:
        made = Pending(x, stages[stage], times[i], times[i] + slo)
        owner[id(made)] = (i, stage)
        return made

    admissions = []  # admitted by one decoding thread in arrival order
    free = 0.0
    for i in range(n):
        free = max(free, times[i]) + decode[i]
        admissions.append((free, (i, 0), job(i, 0)))
    credit, met, shed, flops = [0.0] * n, [False] * n, [False] * n, [0.0] * n
    picks: dict[int, int] = {}  # answers per cfg_id (serve_live.py compares them with a live run's)

    def service_ms(c: int, batch: list[Pending]) -> float:
        now_speed = speed(clock.now) if callable(speed) else speed  # a batch runs at the machine's speed when it starts
        return now_speed * net.service_ms(c, len(batch), u_service[owner[id(batch[0])][0]])

    def answered(done_job: Pending, c: int, t: float) -> tuple | None:
        i, stage = owner.pop(id(done_job))
        done = t + answer[i]
        sched.observe_after(answer[i] * 1e3)
        flops[i] += net.menu.by_id[c]["flops"]
        picks[c] = picks.get(c, 0) + 1
        if stage + 1 < len(stages) and net.confidence[c][image[i]] < thresholds[stage] and \
                done + sched.batch_ms(stages[stage + 1][0], 1) / 1e3 <= done_job.deadline:
            credit[i] = 0.0  # the escalation's answer replaces this one
            met[i] = done <= done_job.deadline
            if met[i]:
                credit[i] = net.correct[c][image[i]]  # stands if the escalation is shed
            return done, (i, stage + 1), job(i, stage + 1)
        met[i] = done - times[i] <= slo
        credit[i] = net.correct[c][image[i]] if met[i] else 0.0
        return None

    def shed_one(shed_job: Pending) -> None:
        i, stage = owner.pop(id(shed_job))
        shed[i] = stage == 0  # a shed escalation keeps its first answer

    simulate.replay(sched, clock, admissions, service_ms, answered, shed_one,
                    lambda depth: net.choose_us(kind, depth) / 1e6)
    return {"effacc": 100.0 * sum(credit) / n, "attain": sum(met) / n, "shed": sum(shed) / n, "flops": sum(flops) / n,
            "picks": picks}


def _without_modes(tables: dict) -> dict:
    """The shared tables of a replay without its mode tables (the slack tables depend on the menu alone)."""
    return {k: v for k, v in tables.items() if k[0] not in ("modes", "built")}


_SIMULATED: dict[tuple, Any] = {}  # mode tables simulated in this process, by what they were simulated from


def _simulated_once(simulate: Callable, rule: Any) -> Callable:
    """`simulate` (a scheduler's mode-table simulation) that reuses a table simulated before in this process from the
    same candidates, budget bucket, rule, decoding time and measured ratios (the replays of one live server's traces
    share the history before each: a table takes seconds to simulate)."""
    def run(candidates: tuple[int, ...], bucket: int, learned: Learned) -> Any:
        key = (candidates, bucket, rule, learned.before_ms.value,
               tuple(sorted((c, tuple(v)) for c, v in learned.batches.ratios().items())))
        if key not in _SIMULATED:
            _SIMULATED[key] = simulate(candidates, bucket, learned)
        return _SIMULATED[key]
    return run


def anchors_front(net: Calibrated) -> list[int]:
    """What a server of the anchors alone (`snnet serve --exported` the anchors) switches among: the anchors' own
    latency front, where a stitch that beats an anchor on the SN-Net's front (digits' largest) does not remove it."""
    alone = StitchMenu([net.menu.by_id[a] for a in net.anchors], {a: net.menu.latency[a] for a in net.anchors},
                       net.menu.source)
    return alone.front()


def systems(net: Calibrated) -> dict[str, dict[str, Any]]:
    front = net.menu.front()
    out: dict[str, dict[str, Any]] = {r: {"stages": [front], **knobs} for r, knobs in RULES.items()}
    defaults = {k: v.default for k, v in inspect.signature(DeadlineScheduler).parameters.items()}
    out["switch"] = {"stages": [front], **{k: defaults[k] for k in KNOBS}}  # the server's own defaults
    out["anchors"] = {"stages": [anchors_front(net)]}
    for name, cas in net.cascades.items():
        out[name] = {"stages": [[c] for c in cas["chain"]], "thresholds": cas["thresholds"]}
    for c in sorted(net.menu.by_id):
        out[f"fixed cfg {c}"] = {"stages": [[c]]}
    return out


def _run_one(job: tuple[str, dict[str, Any], str, str, float, int, int]) -> tuple[str, str, float, int, dict]:
    name, cal, sys_name, kind, load, seed, n = job
    net = _NETS.get(name)
    if net is None:
        net = _NETS[name] = Calibrated(name, cal)
    system = systems(net)[sys_name]
    rate = load * net.capacity
    times = arrivals(kind, n, rate, net.slo_ms / 1e3, seed)
    draws = np.random.default_rng(10_000 + seed).random((n, 4))
    return sys_name, kind, load, seed, replay(net, system, times, draws, history(kind, rate, net.slo_ms / 1e3, seed))


_NETS: dict[str, Calibrated] = {}


def _mode_tables(job: tuple[str, dict[str, Any], str]) -> dict:
    """The mode tables one switching system's traces look up (simulated from the warm server's measurements, as in
    `replay`), for `prebuild`."""
    name, cal, sys_name = job
    net = Calibrated(name, cal)
    system = systems(net)[sys_name]
    clock = VirtualClock()
    sched = DeadlineScheduler(lambda x, c: x, net.menu, MAX_BATCH, shed=True, arrivals=system.get("arrivals", True),
                              rest_on_same=system.get("rest_on_same", True), clock=clock, tables=net.tables,
                              build_now=True)
    sched.choices.mode(sched.choices.lane(tuple(system["stages"][0])), net.slo_ms - net.after_p95, (1.0, 1.0),
                       net.warm)
    return {k: v for k, v in net.tables.items() if k[0] in ("modes", "built")}


def prebuild(pool, nets: dict[str, Calibrated], cal: dict[str, Any]) -> None:
    """Simulate every mode table once, in parallel, before the traces (each worker process would otherwise
    simulate its own copy); the workers forked afterwards inherit them."""
    jobs, seen = [], set()
    for name, net in nets.items():
        for s, system in systems(net).items():
            key = (name, tuple(system["stages"][0]), system.get("arrivals", True), system.get("rest_on_same", True))
            if system.get("modes", True) and len(system["stages"]) == 1 and len(system["stages"][0]) > 1 \
                    and key not in seen:
                seen.add(key)
                jobs.append((name, cal[name], s))
    for name, got in zip([j[0] for j in jobs], pool.imap(_mode_tables, jobs)):
        for key, tables in got.items():  # {candidates: {budget bucket: ...}} of one rule
            for candidates, by_bucket in tables.items():
                nets[name].tables.setdefault(key, {}).setdefault(candidates, {}).update(by_bucket)
    _NETS.update(nets)


def _tagged(pool, jobs: list[tuple], what: str, t_start: float) -> dict[tuple[str, str, str, float, int], dict]:
    """Run `jobs` on the pool: {(network, system, arrivals, load, seed): its replay}, with progress and an ETA."""
    got = {}
    t0 = time.time()
    for i, (s, k, ld, seed, res) in enumerate(pool.imap_unordered(_run_one, jobs, chunksize=4)):
        got[jobs[0][0], s, k, ld, seed] = res
        if (i + 1) % max(1, len(jobs) // 5) == 0:
            left = (time.time() - t0) / (i + 1) * (len(jobs) - i - 1)
            print(f"{what}: {i + 1}/{len(jobs)} runs, {time.time() - t_start:.0f} s, ~{left:.0f} s left",
                  file=sys.stderr, flush=True)
    return got


def interval(values: list[float]) -> tuple[float, float]:
    """The mean and the half-width of its 95 % interval (Student's t with n - 1 degrees of freedom; nan for one
    value). serve_live.py's intervals are these too."""
    from scipy import stats
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.nan
    return m, float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibrate", action="store_true", help="measure this machine into --calibration, then stop")
    p.add_argument("--calibrate-choice", action="store_true",
                   help="measure only the dispatch's cost again into --calibration (after a change to the scheduler: "
                        "the forward, decode and answer times stay), then stop")
    p.add_argument("--note", default="", help="with --calibrate(-choice): how the machine was kept quiet, stored")
    p.add_argument("--calibration", type=Path, default=CALIBRATION, help="the calibration file (default: committed)")
    p.add_argument("--seed-offset", type=int, default=1000, help="the evaluation traces' first seed (tuning: 0..9)")
    p.add_argument("--traces", type=int, default=30, help="evaluation traces per setting (default 30)")
    p.add_argument("--requests", type=int, default=2000, help="requests per trace (default 2000)")
    p.add_argument("--nets", nargs="+", default=["digits", "deit"], choices=["digits", "deit"],
                   help="the networks replayed (with --calibrate: measured; default both)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: few traces and requests, two loads, mode tables from 100 arrivals per load")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: every core)")
    args = p.parse_args()
    if args.calibrate:
        calibrate(args.calibration, args.quick, args.note, tuple(args.nets))
        return
    if args.calibrate_choice:
        calibrate_choice(args.calibration, args.note)
        return
    if args.seed_offset < len(TUNING_SEEDS):
        p.error(f"--seed-offset {args.seed_offset} overlaps the tuning seeds 0..{len(TUNING_SEEDS) - 1}; "
                f"pass one of at least {len(TUNING_SEEDS)}")
    t_start = time.time()
    saved = json.loads(args.calibration.read_text())
    loads = (0.5, 2.0) if args.quick else LOADS
    tuning = range(2) if args.quick else TUNING_SEEDS
    evaluation = range(args.seed_offset, args.seed_offset + args.traces)
    lines = [f"$ .venv/bin/python benchmarks/serve_replay.py --seed-offset {args.seed_offset} --traces {args.traces} "
             f"--requests {args.requests}" + (" --quick" if args.quick else ""),
             f"calibration: {args.calibration.name} ({json.dumps(saved['measured'])})", ""]
    behind = ahead_deit = settings_deit = 0
    settings = [(k, ld) for k in ARRIVALS for ld in loads]
    nets = {name: Calibrated(name, saved["nets"][name]) for name in args.nets}

    if args.quick:
        simulate.MODE_REQUESTS = 100
    t0 = time.time()
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        prebuild(pool, nets, saved["nets"])
    print(f"mode tables simulated in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        # 1. tuning traces: every system of every network: the best fixed stitch per setting and the rule
        tuned: dict[tuple[str, str, str, float], list[float]] = {}
        for name, net in nets.items():
            tuned_systems = [s for s in systems(net) if s in RULES or s.startswith("fixed")]  # what tuning chooses
            jobs = [(name, saved["nets"][name], s, k, ld, seed, args.requests) for k, ld in settings
                    for s in tuned_systems for seed in tuning]
            for (_, s, k, ld, _), res in _tagged(pool, jobs, f"{name} tuning", t_start).items():
                tuned.setdefault((name, s, k, ld), []).append(res["effacc"])
        mean = {key: statistics.fmean(v) for key, v in tuned.items()}
        rule_score = {r: statistics.fmean(mean[n, r, k, ld] for n in nets for k, ld in settings) for r in RULES}
        chosen = max(RULES, key=lambda r: rule_score[r])
        # beside it on the evaluation traces: the rules that differ from it in one knob (each knob's effect)
        others = [r for r in RULES if sum(RULES[r].get(k, True) != RULES[chosen].get(k, True)
                                          for k in KNOBS) == 1]
        # 2. evaluation traces: the chosen rule ("switch"), the others, the best fixed, the rest
        for name, net in nets.items():
            names = list(systems(net))
            fixed = [s for s in names if s.startswith("fixed")]
            best_fixed = {(k, ld): max(fixed, key=lambda s: mean[name, s, k, ld]) for k, ld in settings}
            judged = [chosen, *others, "anchors", *net.cascades]
            jobs = [(name, saved["nets"][name], s, k, ld, seed, args.requests) for k, ld in settings
                    for s in [*judged, best_fixed[k, ld]] for seed in evaluation]
            got = {(s, k, ld, seed): res for (_, s, k, ld, seed), res in
                   _tagged(pool, jobs, f"{name} evaluation", t_start).items()}
            alts = ["best fixed", "anchors", *net.cascades]
            lines += [f"### {name}: {len(net.menu.records)} served stitches ({len(net.menu.front())} on the latency "
                      f"front), SLO {net.slo_ms:.1f} ms, 1x = {net.capacity:.1f} req/s (the largest anchor, cfg "
                      f"{net.largest}, at batch 1), batches of up to {MAX_BATCH}",
                      f"tuning (seeds {tuning.start}..{tuning.stop - 1}, both networks): the rule "
                      f"'{chosen}' scored best ({rule_score[chosen]:.2f} mean effective accuracy; "
                      + ", ".join(f"'{r}' {rule_score[r]:.2f}" for r in others) + "); 'switch' below is that rule",
                      "", "| arrivals | load | switch | attain | " + " | ".join(f"switch - {a}" for a in alts) +
                      " | " + " | ".join(f"switch - '{r}'" for r in others) + " | best fixed (tuning) |",
                      "|---|---:|---:|---:|" + "---:|" * (len(alts) + len(others)) + "---|"]
            for k, ld in settings:
                sw = [got[chosen, k, ld, s]["effacc"] for s in evaluation]
                cells, diffs = [], []
                for a in alts:
                    key = best_fixed[k, ld] if a == "best fixed" else a
                    d, h = interval([x - got[key, k, ld, s]["effacc"] for x, s in zip(sw, evaluation)])
                    cells.append(f"{d:+.2f} ± {h:.2f}")
                    diffs.append((d, h))
                behind += any(d + h < 0 for d, h in diffs)
                variants = [interval([x - got[r, k, ld, s]["effacc"] for x, s in zip(sw, evaluation)])
                            for r in others]
                attain = statistics.fmean(got[chosen, k, ld, s]["attain"] for s in evaluation)
                lines.append(f"| {k} | {ld:g}x | {statistics.fmean(sw):.2f} | {100 * attain:.1f}% | "
                             + " | ".join(cells + [f"{d:+.2f} ± {h:.2f}" for d, h in variants])
                             + f" | {best_fixed[k, ld]} |")
                if name == "deit":
                    settings_deit += 1
                    ahead_deit += all(d - h > 0 for d, h in diffs)
            lines.append("")
    p99 = max(Calibrated(n, saved["nets"][n]).choice_p99 for n in args.nets)
    lines += [f"{time.time() - t_start:.0f} s on {args.workers} processes; load average {os.getloadavg()[0]:.2f}",
              f"RESULT replay_behind={behind} replay_ahead_deit={ahead_deit} replay_settings_deit={settings_deit} "
              f"choice_p99_us={p99:.1f}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
