"""`snnet serve` under a bounded load on 127.0.0.1: per-request switching vs. one fixed stitch vs. the anchors as
separate exported models, and the memory of one SN-Net vs. every stitch exported.

The network is the digits demo's SN-Net (configs/demo_digits.json: ViT anchors of width 16/32/64, 23 stitches at
16x16) with random weights (latency and memory do not depend on the weight values); the accuracies the choice ranks
by are the trained demo's (results/demo/stitches_res.txt, whose routes the server checks). Requests are real digits
(scikit-learn's scans as 16x16 PNG), each with a latency budget drawn (seeded) uniformly between the median server
time of the fastest stitch and 1.5x that of the slowest, both measured under the same load just before the runs
(so the budgets span what this server achieves on this machine now, busy or idle).

Settings, each served by Ray Serve (one local instance, one replica per application) and loaded by the same bounded
closed-loop generator (snnet/serve/load.py: --requests requests from --concurrency threads, stopped after
--time-limit s):

  (a) switch   the SN-Net; each request's stitch chosen from its budget and the queue ahead (snnet serve)
  (b) fixed    the same server, every request sent to one stitch: the one (a) used most (what a deployment that
               cannot switch would run)
  (c) anchors  the anchors exported separately (snnet export), one model each, chosen per request by the same rule

Columns: p50/p99 of the client's end-to-end latency; the share of requests whose server time (queue + batch) and
whose end-to-end time met their budget (the budget covers the server time; HTTP and Ray's proxy add the rest);
the mean top-1 of the stitches that answered (the demo's accuracies); switch: the server's time to choose the stitch
per request (µs, mean); mean batch size; throughput.

Switch cost inside the network: `net(x, cfg_id)` at batch 1 over all stitches in turn vs. the same calls grouped by
stitch (the same work, only the order differs), in this process, one thread; the difference per call is what a
change of stitch costs the forward pass.

    .venv/bin/python benchmarks/serve_load.py [--requests 400] [--concurrency 8] [--time-limit 60] [--port 8765]

Last line: RESULT switch_p99_ms=... fixed_p99_ms=... anchors_p99_ms=... switch_met=... switch_us=...
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from snnet.core.build import build_snnet  # noqa: E402  (after the path insert: the benchmark runs from a checkout)
from snnet.core.checkpoint import save_checkpoint  # noqa: E402
from snnet.core.config import parse_stitch_config  # noqa: E402
from snnet.deploy.export import WEIGHTS, export_stitch, load_snnet  # noqa: E402
from snnet.results.records import read_results  # noqa: E402
from snnet.serve import app  # noqa: E402
from snnet.serve.handler import ServeSpec  # noqa: E402
from snnet.serve.load import get, percentile, run_load  # noqa: E402

CONFIG = ROOT / "configs" / "demo_digits.json"
RESULTS = ROOT / "results" / "demo" / "stitches_res.txt"
IMG = 16


def make_checkpoint(work: Path) -> tuple[Path, Path]:
    """The demo config without its anchors' checkpoints, and a random-weight SN-Net checkpoint of it."""
    raw = json.loads(CONFIG.read_text())
    for a in raw["anchors"]:
        a.pop("checkpoint", None)
    config = work / "demo_digits.json"
    config.write_text(json.dumps(raw))
    torch.manual_seed(0)
    net = build_snnet(parse_stitch_config(raw), pretrained=False, num_classes=10, img_size=IMG).eval()
    ckpt = work / "last.pth.tar"
    save_checkpoint(ckpt, {"state_dict": net.state_dict(), "epoch": 0,
                           "args": json.dumps({"num_classes": 10, "img_size": IMG, "model_kwargs": {}})})
    return ckpt, config


def digit_pngs(n: int) -> list[str]:
    from PIL import Image
    from sklearn.datasets import load_digits
    images = load_digits().images
    out = []
    for i in range(n):
        img = Image.fromarray((images[i % len(images)] / 16.0 * 255).astype(np.uint8)).resize((IMG, IMG))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def switch_cost_us(net: torch.nn.Module, ids: list[int], rounds: int = 40, repeats: int = 5) -> tuple[float, float]:
    """(µs per call interleaved, µs per call grouped): median over `repeats` alternating measurements."""
    x = torch.randn(1, 3, IMG, IMG)
    orders = {"interleaved": [c for _ in range(rounds) for c in ids],
              "grouped": [c for c in ids for _ in range(rounds)]}
    times: dict[str, list[float]] = {k: [] for k in orders}
    with torch.inference_mode():
        for c in ids:
            net(x, c)
        for _ in range(repeats):
            for name, order in orders.items():
                t0 = time.perf_counter()
                for c in order:
                    net(x, c)
                times[name].append((time.perf_counter() - t0) / len(order) * 1e6)
    return statistics.median(times["interleaved"]), statistics.median(times["grouped"])


def summarise(name: str, replies, budgets: list[float], acc: dict[int, float], wall: float) -> dict:
    ok = [r for r in replies if r.status == 200]
    ms = [r.ms for r in ok]
    met_server = [r.body["server_ms"] <= b for r, b in zip(replies, budgets) if r.status == 200]
    met_e2e = [r.ms <= b for r, b in zip(replies, budgets) if r.status == 200]
    return {"setting": name, "answered": len(ok), "sent": len(replies), "p50": percentile(ms, 50),
            "p99": percentile(ms, 99), "met_server": sum(met_server) / max(1, len(ok)),
            "met_e2e": sum(met_e2e) / max(1, len(ok)),
            "top1": statistics.fmean(acc[r.body["cfg_id"]] for r in ok) if ok else float("nan"),
            "stitches": len({r.body["cfg_id"] for r in ok}),
            "switch_us": statistics.fmean(r.body["switch_us"] for r in ok) if ok else float("nan"),
            "batch": statistics.fmean(r.body["batch_size"] for r in ok) if ok else float("nan"),
            "rps": len(ok) / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per setting; unsent requests are dropped")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each replica and of this process")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="serve_load."))
    ckpt, config = make_checkpoint(work)
    loaded = load_snnet(ckpt, config)
    records = read_results(RESULTS)
    acc = {r["cfg_id"]: r["acc1"] for r in records}
    anchors = [c for c in range(loaded.net.num_configs) if len(loaded.net.routes[c]) and
               all(s[0] != "stitch" for s in loaded.net.routes[c])]
    # memory: one SN-Net vs. every stitch exported (weights files; the same tensors a server would hold)
    sn_params = sum(t.numel() for t in loaded.net.parameters())
    sn_bytes = sum(t.numel() * t.element_size() for t in loaded.net.state_dict().values())
    exported, all_params, all_bytes = {}, 0, 0
    for c in range(loaded.net.num_configs):
        spec = export_stitch(loaded, c, work / f"export_{c}", formats=())
        all_params += spec["params"]
        all_bytes += (work / f"export_{c}" / WEIGHTS).stat().st_size
        exported[c] = work / f"export_{c}"
    anchor_params = sum(loaded.net.params(c) for c in anchors)
    anchor_bytes = sum((exported[c] / WEIGHTS).stat().st_size for c in anchors)
    interleaved, grouped = switch_cost_us(loaded.net, list(range(loaded.net.num_configs)))
    del loaded

    common = dict(results=str(RESULTS), max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                  threads=args.threads, latency_repeats=10)
    t0 = time.time()
    app.start({"snnet": (ServeSpec(checkpoint=str(ckpt), stitch_config=str(config), **common), "/snnet"),
               "anchors": (ServeSpec(exported=[str(exported[c]) for c in anchors], **common), "/anchors")},
              port=args.port)
    started = time.time() - t0
    base = f"http://127.0.0.1:{args.port}"
    try:
        images = digit_pngs(args.requests)
        info = {name: get(f"{base}/{name}/")[1] for name in ("snnet", "anchors")}
        idle = {int(c): t["1"] for c, t in info["snnet"]["latency_ms"].items()}
        fastest, slowest = min(idle, key=idle.get), max(idle, key=idle.get)
        # warm-up and calibration under this load: the server time of the fastest and the slowest stitch
        calib = {}
        for c in (fastest, slowest):
            replies = run_load(f"{base}/snnet/", [json.dumps({"image": im, "cfg_id": c}).encode()
                                                  for im in images[:64]], args.concurrency, 30)
            calib[c] = statistics.median(r.body["server_ms"] for r in replies[16:] if r.status == 200)
        run_load(f"{base}/anchors/", [json.dumps({"image": im}).encode() for im in images[:64]], args.concurrency, 30)
        rng = np.random.default_rng(args.seed)
        low, high = calib[fastest], 1.5 * calib[slowest]
        budgets = list(rng.uniform(low, high, args.requests))
        median = float(np.median(budgets))
        rows, used = [], {}
        settings = [("(a) switch per request", "snnet", None), ("(b) fixed stitch", "snnet", "fixed"),
                    (f"(c) anchors exported ({len(anchors)} models)", "anchors", None)]
        for name, path, fixed in settings:
            if fixed:  # the stitch (a) used most: what a deployment that cannot switch would run
                fixed = max(used, key=used.get)
                name = f"{name} cfg_id {fixed}"
            bodies = [json.dumps({"image": im, "budget": {"latency_ms": b}, **({"cfg_id": fixed} if fixed else {})})
                      .encode() for im, b in zip(images, budgets)]
            t1 = time.perf_counter()
            replies = run_load(f"{base}/{path}/", bodies, args.concurrency, args.time_limit)
            rows.append(summarise(name, replies, budgets, acc, time.perf_counter() - t1))
            if not used:
                for r in replies:
                    if r.status == 200:
                        used[r.body["cfg_id"]] = used.get(r.body["cfg_id"], 0) + 1
        info = {name: get(f"{base}/{name}/")[1] for name in ("snnet", "anchors")}
    finally:
        app.stop()

    load = os.getloadavg()
    print(f"$ .venv/bin/python benchmarks/serve_load.py --requests {args.requests} --concurrency {args.concurrency} "
          f"--time-limit {args.time_limit:g} --max-batch {args.max_batch} --max-wait-ms {args.max_wait_ms:g} "
          f"--threads {args.threads}   # {time.strftime('%Y-%m-%d', time.gmtime())}, "
          f"{(time.time() - t_start) / 60:.1f} min")
    busy = "BUSY with other jobs: latencies are noisy, rerun on an idle machine to quote them" \
        if load[2] > 1.5 else "idle apart from this run"
    print(f"machine: {os.cpu_count()} CPU cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"(1/5/15 min) at the end: {busy}")
    print(f"network: digits demo SN-Net (configs/demo_digits.json, random weights, {IMG}x{IMG}), "
          f"{len(idle)} stitches; accuracies: {RESULTS.relative_to(ROOT)} (the trained demo's)")
    print(f"server: Ray Serve {app.ray.__version__}, 1 replica per application, batches of up to {args.max_batch} "
          f"per stitch, {args.max_wait_ms:g} ms wait, {args.threads} torch thread(s); started in {started:.1f} s "
          f"(both applications, latency tables included)")
    print(f"load: {args.requests} requests per setting from {args.concurrency} client threads (closed loop, "
          f"{args.time_limit:g} s limit); latency budgets uniform in [{low:.2f}, {high:.2f}] ms (median {median:.2f}): "
          f"the median server time of the fastest stitch (cfg_id {fastest}) .. 1.5x the slowest's (cfg_id {slowest}), "
          f"each measured under this load ({args.concurrency} threads) before the runs; idle batch-1 latencies "
          f"{min(idle.values()):.2f} .. {max(idle.values()):.2f} ms")
    print()
    print("| setting | answered | p50 ms | p99 ms | server time within budget | end-to-end within budget | "
          "mean top-1 | stitches used | switch µs | mean batch | req/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | {r['answered']}/{r['sent']} | {r['p50']:.1f} | {r['p99']:.1f} | "
              f"{r['met_server']:.0%} | {r['met_e2e']:.0%} | {r['top1']:.2f} | {r['stitches']} | "
              f"{r['switch_us']:.0f} | {r['batch']:.1f} | {r['rps']:.0f} |")
    print()
    print(f"switch inside the network (batch 1, {len(idle)} stitches, this process): {interleaved:.0f} µs per call "
          f"interleaved vs. {grouped:.0f} µs grouped by stitch: {interleaved - grouped:+.0f} µs per switch")
    print()
    print("| memory | params | weights |")
    print("|---|---:|---:|")
    print(f"| one SN-Net (all {len(idle)} stitches) | {sn_params:,} | {sn_bytes / 1024:.0f} KiB (state dict) |")
    print(f"| every stitch exported ({len(idle)} models) | {all_params:,} | {all_bytes / 1024:.0f} KiB "
          f"(safetensors) |")
    print(f"| the {len(anchors)} anchors exported (setting c) | {anchor_params:,} | {anchor_bytes / 1024:.0f} KiB "
          f"(safetensors) |")
    rss = {n: info[n]["max_rss_mb"] for n in info}
    print(f"replica peak RSS (torch and Ray's runtime included): SN-Net {rss['snnet']:.0f} MiB, anchors "
          f"{rss['anchors']:.0f} MiB")
    a, b, c = rows
    print(f"RESULT switch_p99_ms={a['p99']:.1f} fixed_p99_ms={b['p99']:.1f} anchors_p99_ms={c['p99']:.1f} "
          f"switch_met={a['met_server']:.2f} fixed_met={b['met_server']:.2f} anchors_met={c['met_server']:.2f} "
          f"switch_us={a['switch_us']:.0f} memory_ratio={all_bytes / sn_bytes:.2f}")


if __name__ == "__main__":
    main()
