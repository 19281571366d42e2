"""The request path of `snnet serve`, free of any serving engine: body -> checked request -> stitch -> batch -> JSON.

A request is one JSON object (POST, any path but the info paths):

    {"image": "<base64 of a PNG/JPEG/... file>",
     "budget": {"latency_ms": 5.0, "flops": 2.5e6},    # optional; either or both
     "cfg_id": 3,                                      # optional: this stitch, no choice (a fixed deployment)
     "cascade": {"chain": [0, 2], "thresholds": [0.9]},  # optional: escalate an unsure answer (not with cfg_id)
     "top_k": 5}                                       # optional, default 5

and is answered with the class and its name (`label`, from the training data), the top-k probabilities, the stitch
that ran (cfg_id, route), the server time predicted at dispatch and the measured one, whether the budget was
predicted to hold, the time the dispatch took to choose (switch_us), the batch size, the queue depth it found and
where its time went (timing_ms). GET / (or /info) describes the stitches; GET /health answers {"ok": true}.

A bad request is answered with a 4xx status and {"error": "<one line naming the value and the fix>"}: 400 bad JSON,
image, budget or field; 404 unknown path; 405 other methods; 413 a body over the limit; 422 a budget no stitch
meets even on an idle server (the closest stitch named). A server started with `shed` answers 503 at once to a
request whose latency budget cannot be met under the current load. Nothing a client sends stops the server: any
other failure is a 500 for that request only.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import gc
import io
import json
import re
import resource
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from snnet.data.checks import WIDE_MODES
from snnet.data.transforms import eval_transform
from snnet.deploy.export import labelled, load_exported, load_snnet
from snnet.deploy.latency import measure_latency
from snnet.results.records import check_checkpoint_sha, check_routes, file_sha256, read_results
from snnet.results.select import BudgetError, route_costs
from snnet.serve import exported_stitches
from snnet.serve.policy import StitchMenu, finite_positive
from snnet.serve.scheduler import NO_DEADLINE, DeadlineScheduler, Done, Pending, Shed, release_free_heap
from snnet.train.device import device_from_flag
from snnet.utils.errors import SNNetError

MAX_PIXELS = 40_000_000  # a decoded image above this is refused before it is decoded (decompression bombs)
DECODE_THREADS = 2  # threads that decode and transform images, off the event loop
FIELDS = {"image", "budget", "cfg_id", "top_k", "cascade", "sent_at"}
BUDGETS = {"latency_ms": "a time in ms the request may spend in the server, e.g. 5",
           "flops": "the most FLOPs the stitch may cost, e.g. 2.5e6"}


class RequestError(SNNetError):
    """A request the server cannot answer; `status` is its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class ServeSpec:
    """What a server replica loads (plain values: the engine ships them to every replica, on any machine)."""
    checkpoint: str | None = None
    stitch_config: str | None = None
    results: str | None = None
    exported: list[str] = field(default_factory=list)  # export folders instead of a checkpoint (one model each)
    img_size: int | None = None
    num_classes: int | None = None
    max_batch: int = 16
    max_wait_ms: float = 0.0
    shed: bool = False  # answer 503 at once when a latency budget cannot be met even on the fastest stitch
    max_body_bytes: int = 4 << 20
    device: str = "cpu"
    threads: int | None = None
    latency_repeats: int = 10


class ExportedSet(torch.nn.Module):
    """Separately exported networks, one per cfg_id, called as an SN-Net is: ``model(x, cfg_id)``."""

    def __init__(self, nets: dict[int, torch.nn.Module]):
        super().__init__()
        self.nets = torch.nn.ModuleDict({str(c): n for c, n in nets.items()})

    def forward(self, x: torch.Tensor, cfg_id: int) -> torch.Tensor:
        return self.nets[str(cfg_id)](x)


@dataclass
class Served:
    """The model a replica serves and what describes it."""
    model: torch.nn.Module
    records: list[dict[str, Any]]
    img_size: tuple[int, int]
    in_chans: int
    num_classes: int
    data_config: dict[str, Any]
    class_names: list[str] | None = None  # the training data's, by class index (None: the data named none)


def load_served(spec: ServeSpec) -> Served:
    """The model and its records: an SN-Net checkpoint (every stitch in the results file) or export folders (the
    records of their cfg_ids). Costs are the served network's at the served size; routes must match the file's."""
    if not spec.results:
        raise SNNetError("pass --results stitches_res.txt (the evaluation of this checkpoint): it holds the "
                         "accuracies the stitch choice ranks by")
    device_from_flag(spec.device)  # no torch device, or CUDA where there is none: one line, before Ray starts
    records = read_results(spec.results)
    source = f"results file {spec.results!r}"
    if spec.exported:
        specs = exported_stitches(spec.exported, records, source)
        nets: dict[int, torch.nn.Module] = {m["cfg_id"]: load_exported(f) for f, m in zip(spec.exported, specs)}
        by_id = {r["cfg_id"]: r for r in records}
        chosen = [{**by_id[m["cfg_id"]], "route": m["route"], "flops": m.get("flops"), "params": m["params"],
                   "cfg_id": m["cfg_id"]} for m in sorted(specs, key=lambda m: m["cfg_id"])]
        meta = specs[-1]
        size = (int(meta["img_size"][0]), int(meta["img_size"][1]))
        return Served(ExportedSet(nets).eval(), chosen, size, int(meta["in_chans"]), int(meta["num_classes"]),
                      dict(meta["data_config"]), meta.get("class_names"))
    if not spec.checkpoint:
        raise SNNetError("pass the SN-Net checkpoint to serve (snnet serve CKPT ...) or export folders")
    loaded = load_snnet(spec.checkpoint, spec.stitch_config, spec.img_size, spec.num_classes)
    check_routes(loaded.net, records, source)
    if any("checkpoint_sha256" in r for r in records):
        check_checkpoint_sha(records, file_sha256(spec.checkpoint), f"checkpoint {spec.checkpoint!r}", source)
    _, costs = route_costs(loaded.net, loaded.img_size)
    chosen = [{**r, **costs[r["cfg_id"]]} for r in records]  # FLOPs at the served size replace the recorded ones
    return Served(loaded.net, chosen, loaded.img_size, loaded.in_chans, int(loaded.num_classes or 0),
                  dict(loaded.data_config), loaded.class_names)


def latency_table(served: Served, spec: ServeSpec) -> dict[int, dict[int, float]]:
    """ms per batch of every stitch at batch 1 and `max_batch`: the results file's (`snnet latency --results`, taken
    on this kind of device) when it holds both for every stitch, else measured now on the serving device."""
    sizes = sorted({1, spec.max_batch})
    keys = [f"latency_ms_b{b}" for b in sizes]
    if all(finite_positive(r.get(k)) for r in served.records for k in keys):
        return {r["cfg_id"]: {b: float(r[k]) for b, k in zip(sizes, keys)} for r in served.records}
    ids = [r["cfg_id"] for r in served.records]
    measured = measure_latency(served.model, ids, sizes, served.img_size, served.in_chans, warmup=2,
                               repeats=spec.latency_repeats, device=spec.device)
    return {c: {b: measured[c][f"latency_ms_b{b}"] for b in sizes} for c in ids}


class ServeCore:
    """One server's state: the model, the stitch menu, the deadline scheduler and the counters."""

    def __init__(self, spec: ServeSpec, served: Served, latency: dict[int, dict[int, float]]):
        self.spec = spec
        self.served = served
        self.menu = StitchMenu(served.records, latency, spec.results or "the records")
        # what a client reads in an error: the stitches, never the server's file paths (GET / hides them too)
        self.menu.source = "the served stitches"
        self.transform = eval_transform(served.data_config)
        device = device_from_flag(spec.device)
        model = served.model.to(device).eval()
        self.scheduler = DeadlineScheduler(lambda x, c: model(x.to(device), c).float().cpu(), self.menu,
                                           spec.max_batch, spec.max_wait_ms, spec.shed)
        for flops in sorted({r["flops"] for r in self.menu.records}):  # every FLOPs budget's table, before serving
            self.scheduler.prepare(self.menu.front(flops))
        # images are decoded and transformed here, off the event loop: a large image never stalls other clients
        self.decoder = concurrent.futures.ThreadPoolExecutor(max_workers=DECODE_THREADS,
                                                             thread_name_prefix="snnet-decode")
        self.counts: dict[int, int] = {}
        self._candidates: dict[tuple[float | None, float | None], list[list[int]] | BudgetError] = {}
        self.switch_ns = 0
        self.chosen = 0
        self.verdicts = {"within": 0, "within_met": 0}

    @classmethod
    def build(cls, spec: ServeSpec) -> ServeCore:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        served = load_served(spec)
        core = cls(spec, served, latency_table(served, spec))
        release_free_heap()  # what loading and the latency measurement freed
        # what is loaded by now (torch, timm, the network: millions of objects) leaves the garbage collector's
        # reach: a full collection, run by whichever thread allocates, holds the GIL and with it every client for
        # as long as it walks them; now it walks only what serving allocates
        gc.collect()
        gc.freeze()
        return core

    # ------------------------------------------------------------------------------------------ one request
    async def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON payload) of one request; never raises."""
        t0 = time.perf_counter()
        try:
            payload = await self._route(method, path.rstrip("/") or "/", body, t0)
            status = 200
        except RequestError as e:
            status, payload = e.status, {"error": str(e)}
        except BudgetError as e:
            status, payload = 422, {"error": str(e)}
        except Shed as e:
            status, payload = 503, {"error": f"the latency budget cannot be met under the current load ({e}); "
                                             f"retry later or raise budget.latency_ms", "shed": True}
        except Exception as e:  # a bug or a failed batch: this request fails, the server goes on
            first = (str(e).splitlines() or [""])[0][:300]
            status, payload = 500, {"error": f"internal error ({type(e).__name__}: {first}); the server goes on"}
        self.counts[status] = self.counts.get(status, 0) + 1
        return status, payload

    async def _route(self, method: str, path: str, body: bytes, t0: float) -> dict[str, Any]:
        if method == "GET":
            if path in ("/", "/info"):
                return self.info()
            if path == "/health":
                return {"ok": True}
            raise RequestError(404, f"no such path {path!r}: GET / (the stitches), GET /health, POST / (classify)")
        if method != "POST":
            raise RequestError(405, f"method {method} is not served: POST a JSON request, GET / or GET /health")
        if path not in ("/", "/classify"):
            raise RequestError(404, f"no such path {path!r}: POST the JSON request to /")
        return await self.classify(body, t0)

    def candidates(self, req: dict[str, Any]) -> list[list[int]]:
        """The stitches each stage of the request may run, best first (one stage unless it is a cascade).
        Without a latency budget: `snnet select`'s stitch for its FLOPs budget alone, whatever the load and
        whoever it is batched with. Raises BudgetError (422) when the budget is beyond every allowed stitch even on
        an idle server."""
        budget = req["budget"]
        if "cascade" in req:
            return [[c] for c in req["cascade"]["chain"]]
        if "cfg_id" in req:  # a fixed stitch: no choice, the budget is only reported against
            return [[req["cfg_id"]]]
        key = (budget.get("latency_ms"), budget.get("flops"))
        known = self._candidates.get(key)
        if known is None:  # clients send a handful of budgets: each is ranked once, not per request
            try:
                idle = self.menu.choose(*key)  # on an idle server: raises when nothing could ever fit
                known = [[idle.cfg_id]] if key[0] is None else [self.menu.front(key[1])]
            except BudgetError as e:
                known = e
            if len(self._candidates) > 4096:
                self._candidates.clear()
            self._candidates[key] = known
        if isinstance(known, BudgetError):
            raise known
        return [list(stage) for stage in known]

    async def classify(self, body: bytes, t0: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        x, req = await loop.run_in_executor(self.decoder, self.parse, body, t0)
        t_decoded = time.perf_counter()
        self.scheduler.observe_before((t_decoded - t0) * 1e3)
        start = self.since(req, t0)  # what the latency budget counts from
        budget = req["budget"]
        t_choose = time.perf_counter_ns()
        stages = self.candidates(req)
        self.switch_ns += time.perf_counter_ns() - t_choose
        self.chosen += 1
        deadline = start + budget["latency_ms"] / 1e3 if "latency_ms" in budget else NO_DEADLINE
        thresholds = req.get("cascade", {}).get("thresholds", [])
        ran: list[int] = []
        done: Done | None = None
        for stage, candidates in enumerate(stages):
            try:
                done = await self.scheduler.submit(Pending(x, candidates, start, deadline))
            except Shed:
                if done is None:  # the first stage: nothing to answer with
                    raise
                break  # an escalation too late to run: the last stage's answer stands
            ran.append(done.cfg_id)
            t_after = time.perf_counter()
            if stage + 1 < len(stages) and float(torch.softmax(done.logits.float(), -1).max()) < thresholds[stage]:
                # unsure: escalate to the next stage if it can still answer in time (else this answer stands)
                nxt = stages[stage + 1][0]
                if deadline == NO_DEADLINE or t_after + self.scheduler.batch_ms(nxt, 1) / 1e3 <= deadline:
                    continue
            break
        assert done is not None
        named = labelled(done.logits[None], self.served.class_names, req.get("top_k", 5))[0]
        t_end = time.perf_counter()
        server_ms, elapsed_ms = (t_end - t0) * 1e3, (t_end - start) * 1e3
        self.scheduler.observe_after((time.perf_counter() - t_after) * 1e3)
        flops_ok = "flops" not in budget or self.menu.by_id[done.cfg_id]["flops"] <= budget["flops"]
        within = done.within_budget and flops_ok
        if "latency_ms" in budget and within:
            self.verdicts["within"] += 1
            self.verdicts["within_met"] += elapsed_ms <= budget["latency_ms"]
        answer = {**named, "cfg_id": done.cfg_id, "route": self.menu.by_id[done.cfg_id].get("route"),
                  "budget": budget, "predicted_ms": done.predicted_ms, "within_budget": within,
                  "server_ms": server_ms, "elapsed_ms": elapsed_ms, "switch_us": done.choose_us,
                  "batch_size": done.batch_size, "queue_depth": done.queue_depth}
        # where the time went (ms): before the server read it (from `sent_at`), decoding and checks (thread pool),
        # waiting in the queue, the batch's forward pass, and the rest (softmax, top-k, the event loop's delay)
        answer["timing_ms"] = {"before": (t0 - start) * 1e3, "decode": (t_decoded - t0) * 1e3,
                               "queue": (done.started - t_decoded) * 1e3,
                               "forward": (done.finished - done.started) * 1e3,
                               "answer": (t0 + server_ms / 1e3 - done.finished) * 1e3}
        if len(stages) > 1:
            answer["stages"] = ran
        return answer

    @staticmethod
    def since(req: dict[str, Any], t0: float) -> float:
        """The perf_counter time a request's latency budget counts from: its arrival `t0`, or the client's
        `sent_at` (a Unix time) when that is earlier: a client on the server's clock (the same machine, or NTP)
        sends the time it sent the request, so the time it waited before the server read it (the socket's backlog
        behind a busy event loop, the network) counts against its budget too. A `sent_at` after the arrival (a
        client clock ahead of the server's) counts as the arrival."""
        if "sent_at" not in req:
            return t0
        return min(t0, time.perf_counter() - (time.time() - req["sent_at"]))

    # ------------------------------------------------------------------------------------------ checks
    def parse(self, body: bytes, t0: float | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """The image tensor and the checked request; RequestError (4xx) naming what is wrong. With `t0` (when the
        request came in), a request that can no longer meet its latency budget is shed (`Shed`) before its image is
        decoded: under a burst, requests that waited for these threads past hope cost no decoding."""
        limit = self.spec.max_body_bytes
        if len(body) > limit:
            raise RequestError(413, f"the request body is over {limit} bytes; send a smaller image (the server's "
                                    f"--max-body-kb is {limit // 1024})")
        try:
            req = json.loads(body)
        except RecursionError:
            raise RequestError(400, "the body nests JSON arrays/objects too deeply to read; send one flat object "
                                    '{"image": "<base64 PNG/JPEG>", "budget": {"latency_ms": 5}}') from None
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not JSON ({str(e).splitlines()[0][:80]}); send "
                                    f'{{"image": "<base64 PNG/JPEG>", "budget": {{"latency_ms": 5}}}}') from None
        if not isinstance(req, dict):
            raise RequestError(400, f"the body is JSON {type(req).__name__}, not an object; send "
                                    f'{{"image": "<base64 PNG/JPEG>"}}')
        unknown = sorted(set(req) - FIELDS)
        if unknown:
            raise RequestError(400, f"unknown field {unknown[0]!r}; a request has {', '.join(sorted(FIELDS))}")
        budget = req.get("budget", {})
        if budget is None:
            budget = {}
        if not isinstance(budget, dict):
            raise RequestError(400, f"budget {budget!r} is not an object; send e.g. "
                                    f'"budget": {{"latency_ms": 5}} or {{"flops": 2.5e6}}')
        for key, value in budget.items():
            if key not in BUDGETS:
                raise RequestError(400, f"unknown budget {key!r}; a budget has latency_ms ({BUDGETS['latency_ms']}) "
                                        f"and/or flops ({BUDGETS['flops']})")
            if not finite_positive(value):
                raise RequestError(400, f"budget.{key} {value!r} is not a positive number; send {BUDGETS[key]}")
        req["budget"] = {k: float(v) for k, v in budget.items()}
        if "cfg_id" in req:
            c = req["cfg_id"]
            if isinstance(c, bool) or not isinstance(c, int) or c not in self.menu.by_id:
                raise RequestError(400, f"cfg_id {c!r} is not served here; served cfg_ids: {self.menu.cfg_ids}")
        if "top_k" in req:
            k = req["top_k"]
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise RequestError(400, f"top_k {k!r} is not a positive integer; send e.g. 5")
        if "cascade" in req:
            self._check_cascade(req)
        if "sent_at" in req and not finite_positive(req["sent_at"]):
            raise RequestError(400, f"sent_at {req['sent_at']!r} is not a Unix time; send the client's time.time() "
                                    f"when it sent the request (on a clock the server shares), or leave it out")
        if t0 is not None and "latency_ms" in req["budget"]:
            # the stitches its first stage may run (a budget no stitch could ever meet is a 422, not a 503): the
            # fastest of them decides, so it never sheds a request that could still make it
            first = self.candidates(req)[0]
            now = time.perf_counter()
            start = self.since(req, t0)
            shed = self.scheduler.too_late(first, start, start + req["budget"]["latency_ms"] / 1e3, now)
            if shed is not None and not self.scheduler.probing(now):
                raise shed
        return self.image(req.get("image")), req

    def _check_cascade(self, req: dict[str, Any]) -> None:
        cascade = req["cascade"]
        example = '"cascade": {"chain": [0, 2], "thresholds": [0.9]}'
        if not isinstance(cascade, dict) or set(cascade) != {"chain", "thresholds"}:
            raise RequestError(400, f"cascade {cascade!r} is not an object of chain and thresholds; send {example}")
        chain, thresholds = cascade["chain"], cascade["thresholds"]
        if "cfg_id" in req:
            raise RequestError(400, "a request has cfg_id or cascade, not both; drop one")
        if not isinstance(chain, list) or not chain or any(
                isinstance(c, bool) or not isinstance(c, int) or c not in self.menu.by_id for c in chain):
            raise RequestError(400, f"cascade.chain {chain!r} is not a list of served cfg_ids "
                                    f"({self.menu.cfg_ids}); send {example}")
        if not isinstance(thresholds, list) or len(thresholds) != len(chain) - 1 or any(
                not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t <= 1 for t in thresholds):
            raise RequestError(400, f"cascade.thresholds {thresholds!r} must be {len(chain) - 1} probabilities in "
                                    f"[0, 1], one per stage but the last; send {example}")

    def image(self, data: Any) -> torch.Tensor:
        if not isinstance(data, str) or not data:
            raise RequestError(400, "image is missing or not a string; send the image file's bytes as base64 text "
                                    '("image": "iVBORw0KGgo...")')
        if data.startswith("data:") and ";base64," in data[:100]:  # a data URL (a browser's FileReader): its payload
            data = data.split(";base64,", 1)[1]
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image is not valid base64; encode the file's bytes, e.g. "
                                    "base64.b64encode(open('x.png', 'rb').read()).decode()") from None
        try:
            opened = Image.open(io.BytesIO(raw))
            w, h = opened.size
            if w * h > MAX_PIXELS:
                raise RequestError(400, f"image of {w}x{h} pixels is over the {MAX_PIXELS:,}-pixel limit; send a "
                                        f"smaller image")
            if opened.mode in WIDE_MODES:  # PIL's conversion would clip it to nearly white, as training refuses it
                raise RequestError(400, f"image is a 16/32-bit image (mode {opened.mode}), which the network was "
                                        f"not trained on; convert it to 8-bit first")
            img = opened.convert("L" if self.served.in_chans == 1 else "RGB")
        except RequestError:
            raise
        except Image.DecompressionBombError as e:  # PIL's own limit, far above ours: the same refusal
            declared = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(declared.group(1)):,} pixels" if declared else "more pixels than that"
            raise RequestError(400, f"image of {size} is over the {MAX_PIXELS:,}-pixel limit; send a smaller "
                                    f"image") from None
        except Exception as e:  # PIL raises many kinds on a file it cannot read
            raise RequestError(400, f"image is not a readable image file ({type(e).__name__}); send PNG, JPEG or "
                                    f"another format Pillow reads") from None
        x = self.transform(img)
        if x.shape[0] != self.served.in_chans:
            raise RequestError(400, f"image has {x.shape[0]} channels, the network takes {self.served.in_chans}")
        return x

    # ------------------------------------------------------------------------------------------ description
    def info(self) -> dict[str, Any]:
        keep = ("cfg_id", "route", "flops", "params", "acc1", "latency_ms")
        return {"stitches": [{k: r.get(k) for k in keep} for r in self.menu.records],
                "latency_ms": {str(c): {str(b): ms for b, ms in t.items()} for c, t in self.menu.latency.items()},
                "front": self.menu.front(),  # what a request without a FLOPs budget is switched among, best first
                "img_size": list(self.served.img_size), "num_classes": self.served.num_classes,
                "class_names": self.served.class_names,
                "max_batch": self.spec.max_batch, "max_wait_ms": self.spec.max_wait_ms,
                "max_body_bytes": self.spec.max_body_bytes, "device": self.spec.device,  # no file paths: clients
                "responses": {str(k): v for k, v in sorted(self.counts.items())},
                **self.scheduler.stats(), "shed_enabled": self.spec.shed,
                "within_budget": dict(self.verdicts),
                "switch_us_mean": self.switch_ns / 1e3 / self.chosen if self.chosen else None,
                "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "model_params": sum(p.numel() for p in self.served.model.parameters()),
                "model_bytes": sum(p.numel() * p.element_size() for p in self.served.model.parameters())
                + sum(b.numel() * b.element_size() for b in self.served.model.buffers())}
