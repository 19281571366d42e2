"""Where a request's time goes in `snnet serve`, and the server's memory: Ray Serve (`--engine ray`, what `snnet
serve` ran before) vs. the local engine (`--engine local`, aiohttp in one process, the default now).

The network is the committed digits demo (results/demo/snnet.pth.tar, 16x16), whose forward pass takes about a
millisecond: what is left of a request's time is the server's own. One idle client sends --requests requests one
after another (closed loop, concurrency 1) to each engine, every request to one stitch, and the answer's
`timing_ms` splits the server's time into decode (base64, PIL, transform, checks: a thread pool), queue (until its
batch starts), forward (the batch) and answer (softmax, top-k, the event loop); the client's end-to-end time less
the server's time is the HTTP path (for Ray: its proxy and the hand-off to the replica). Memory: PSS summed over
every process of the server (Ray starts a dozen), after the requests.

    .venv/bin/python benchmarks/serve_overhead.py [--requests 200] [--out results/bench_serve_overhead.txt]

Last line: RESULT ray_e2e_ms=<median> local_e2e_ms=<median> ray_pss_mb=<sum> local_pss_mb=<sum>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from loadgen import get, post  # noqa: E402  (after the path insert: the benchmark runs from a checkout)

from snnet.utils.fileio import write_text_atomic  # noqa: E402

PARTS = ("decode", "queue", "forward", "answer")


def tree_pss_mb(pid: int) -> tuple[float, int]:
    """PSS summed over `pid` and every process descended from it, and how many processes that is."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += children.get(p, [])
    total = 0.0
    for p in seen:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total, len(seen)


def measure(engine: str, requests: int, work: Path, image: str) -> dict[str, float]:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / f"{engine}.log"
    out = open(log, "w+")
    cmd = [sys.executable, "-m", "snnet.cli", "serve", str(ROOT / "results" / "demo" / "snnet.pth.tar"),
           "--stitch_config", str(ROOT / "configs" / "demo_digits.json"), "--results",
           str(ROOT / "results" / "demo" / "stitches_res.txt"), "--port", str(port), "--threads", "1",
           "--engine", engine]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    try:
        while "serving" not in log.read_text():
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"{engine} did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        started = time.monotonic() - t0
        url = f"http://127.0.0.1:{port}/"
        cfg = min(int(c) for c in get(url)[1]["latency_ms"])
        body = json.dumps({"image": image, "cfg_id": cfg, "top_k": 1}).encode()
        for _ in range(20):  # warm-up
            post(url, body)
        rows = []
        for _ in range(requests):
            t = time.perf_counter()
            status, a = post(url, body)
            e2e = (time.perf_counter() - t) * 1e3
            if status == 200:
                rows.append({"e2e": e2e, "server": a["server_ms"], **a["timing_ms"]})
        pss, nproc = tree_pss_mb(proc.pid)
    finally:
        proc.terminate()  # the server shuts its engine down itself
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, 9)  # whatever of its processes is left
        except ProcessLookupError:
            pass
        out.close()
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {**med, "http": statistics.median(r["e2e"] - r["server"] for r in rows), "pss": pss,
            "processes": nproc, "started_s": started, "answered": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_serve_overhead.txt"))
    args = p.parse_args()
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 64, 32)).save(buf, "PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        res = {e: measure(e, args.requests, Path(tmp), image) for e in ("ray", "local")}
    load1, load5, load15 = os.getloadavg()
    lines = [f"$ .venv/bin/python benchmarks/serve_overhead.py {' '.join(sys.argv[1:])}".rstrip()
             + f"   # {time.strftime('%Y-%m-%d')}, {(time.time() - t_start) / 60:.1f} min",
             f"machine: {os.cpu_count()} CPU cores, load average {load1:.1f} / {load5:.1f} / {load15:.1f} (1/5/15 min) "
             f"at the end",
             f"{args.requests} sequential requests per engine (one client, idle server), digits demo, one stitch; "
             f"medians in ms", "",
             "| engine | end to end | HTTP path (end to end - server) | server | decode | queue | forward | answer | "
             "PSS MiB (all processes) | processes | start s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for e, r in res.items():
        lines.append(f"| {e} | {r['e2e']:.2f} | {r['http']:.2f} | {r['server']:.2f} | "
                     + " | ".join(f"{r[k]:.2f}" for k in PARTS)
                     + f" | {r['pss']:.0f} | {r['processes']} | {r['started_s']:.1f} |")
    lines += ["", f"RESULT ray_e2e_ms={res['ray']['e2e']:.2f} local_e2e_ms={res['local']['e2e']:.2f} "
                  f"ray_pss_mb={res['ray']['pss']:.0f} local_pss_mb={res['local']['pss']:.0f}"]
    text = "\n".join(lines) + "\n"
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
