"""`snnet serve`: the stitch choice (budget and load), per-stitch batching, bad requests, and a real HTTP server
(Ray Serve) started on a free port, answered under a bounded load and stopped by SIGTERM."""
import asyncio
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_refused, run_cli
from PIL import Image

from snnet.serve.handler import ServeCore, ServeSpec
from snnet.serve.load import get, percentile, post, run_load
from snnet.serve.policy import BudgetError, StitchMenu


def png(seed: int = 0, size: int = 16) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ------------------------------------------------------------------------------------------------ the choice
RECORDS = [{"cfg_id": 0, "flops": 100, "params": 10, "acc1": 60.0}, {"cfg_id": 1, "flops": 400, "params": 40,
           "acc1": 80.0}, {"cfg_id": 2, "flops": 200, "params": 20, "acc1": 72.0}]
LATENCY = {0: {1: 1.0, 8: 2.0}, 1: {1: 4.0, 8: 10.0}, 2: {1: 2.0, 8: 4.0}}


def test_budget_picks_the_best_stitch_that_fits_an_idle_server():
    menu = StitchMenu(RECORDS, LATENCY, "t")
    assert menu.choose().cfg_id == 1  # no budget: the most accurate
    assert menu.choose(latency_ms=3.0) == menu.choose(latency_ms=3.0, queued={})
    assert menu.choose(latency_ms=3.0).cfg_id == 2 and menu.choose(latency_ms=4.0).cfg_id == 1
    assert menu.choose(latency_ms=1.5).cfg_id == 0
    assert menu.choose(flops=250).cfg_id == 2 and menu.choose(flops=250, latency_ms=1.0).cfg_id == 0
    with pytest.raises(BudgetError, match=r"latency_ms <= 0.5.*cfg_id 0.*raise budget.latency_ms to at least 1"):
        menu.choose(latency_ms=0.5)
    with pytest.raises(BudgetError, match=r"flops <= 50.*raise budget.flops to at least 100"):
        menu.choose(flops=50)


def test_load_moves_requests_to_faster_stitches():
    menu = StitchMenu(RECORDS, LATENCY, "t")
    assert menu.batch_ms(1, 8) == 10.0 and menu.batch_ms(1, 4) == pytest.approx(4 + 6 * 3 / 7)
    assert menu.batch_ms(0, 17) == pytest.approx(2 * 2.0 + 1.0)  # two full batches and one of 1
    # 4 ms fits stitch 1 idle; with stitch 0's queue of 8 ahead (2 ms) only stitch 0 (joins its queue: +0.14 ms)
    # or stitch 2 (2 + 2 ms) fit; stitch 2 is the more accurate
    loaded = menu.choose(latency_ms=4.0, queued={0: 8})
    assert (loaded.cfg_id, loaded.within_budget) == (2, True) and loaded.predicted_ms == pytest.approx(4.0)
    busy = menu.choose(latency_ms=4.0, queued={0: 8}, busy_ms=1.0)
    assert busy.cfg_id == 0 and busy.within_budget
    # a load no stitch can meet: the fastest answers, flagged; the budget itself is fine on an idle server
    over = menu.choose(latency_ms=4.0, queued={1: 40})
    assert (over.cfg_id, over.within_budget) == (0, False) and over.predicted_ms > 4.0
    # the server's observed time outside the network counts too
    assert menu.choose(latency_ms=4.0, overhead_ms=2.5).cfg_id == 0


def test_the_choice_is_selects_rule():
    from snnet.results.select import select
    rng = np.random.default_rng(0)
    records = [{"cfg_id": c, "flops": int(f), "params": 1, "acc1": float(a)} for c, (f, a) in
               enumerate(zip(rng.integers(1, 5, 30) * 100, rng.integers(50, 60, 30)))]  # many ties
    latency = {r["cfg_id"]: {1: float(rng.uniform(1, 5))} for r in records}
    menu = StitchMenu(records, latency, "t")
    with_ms = [{**r, "ms": latency[r["cfg_id"]][1]} for r in records]
    for budget in np.linspace(1.01, 5, 25):
        for flops in (None, 250):
            limits = {"ms": budget, **({"flops": flops} if flops else {})}
            try:
                want = select(with_ms, limits)[0]["cfg_id"]
            except BudgetError:
                with pytest.raises(BudgetError):
                    menu.choose(latency_ms=budget, flops=flops)
                continue
            assert menu.choose(latency_ms=budget, flops=flops).cfg_id == want


# ------------------------------------------------------------------------------------------------ in process
@pytest.fixture(scope="module")
def core(tiny):
    return ServeCore.build(ServeSpec(checkpoint=str(tiny.ckpt), stitch_config=str(tiny.config),
                                     results=str(tiny.results), max_batch=8, max_wait_ms=20, latency_repeats=3))


def handle(core, body, method="POST", path="/"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return asyncio.run(core.handle(method, path, raw))


def test_batches_per_stitch_give_the_snnets_logits(core, tiny):
    imgs = [png(i) for i in range(12)]
    ids = [3, 5] * 6

    async def burst():
        return await asyncio.gather(*[core.handle("POST", "/", json.dumps({"image": im, "cfg_id": c, "top_k": 10})
                                                  .encode()) for im, c in zip(imgs, ids)])
    answers = asyncio.run(burst())
    assert all(s == 200 for s, _ in answers), answers
    assert max(a["batch_size"] for _, a in answers) > 1  # batched, and only with requests of the same stitch
    for (_, a), im, c in zip(answers, imgs, ids):
        assert a["cfg_id"] == c and a["route"] == tiny.net.describe(c)
        x = core.transform(Image.open(io.BytesIO(base64.b64decode(im))).convert("RGB"))[None]
        with torch.inference_mode():
            want = torch.softmax(tiny.net(x, c), -1)[0]
        got = {k: p for k, p in a["top_k"]}
        assert a["class"] == int(want.argmax())
        assert all(abs(got[k] - float(want[k])) < 1e-4 for k in got)


def test_budget_in_the_request_is_honoured(core, tiny):
    by_id = {r["cfg_id"]: r for r in core.menu.records}
    idle = {c: t[1] for c, t in core.menu.latency.items()}
    for budget in sorted(idle.values())[::3]:
        core.overhead_ms, core.slowdown = 0.0, 1.0  # an idle server that has seen no request (it learns them)
        status, a = handle(core, {"image": png(), "budget": {"latency_ms": budget}})
        assert status == 200 and idle[a["cfg_id"]] <= budget, a
        # no stitch that fits is more accurate
        assert all(by_id[c]["acc1"] <= by_id[a["cfg_id"]]["acc1"] for c, ms in idle.items() if ms <= budget)
    # a server whose requests spend long outside the network answers with the fastest stitch, saying so
    core.overhead_ms = 1e3
    status, a = handle(core, {"image": png(), "budget": {"latency_ms": max(idle.values())}})
    assert status == 200 and a["cfg_id"] == min(idle, key=idle.get) and not a["within_budget"], a
    flops = sorted(r["flops"] for r in tiny.records)[len(tiny.records) // 2]
    status, a = handle(core, {"image": png(), "budget": {"flops": flops}})
    assert status == 200 and by_id[a["cfg_id"]]["flops"] <= flops
    assert a["cfg_id"] == max((r for r in tiny.records if r["flops"] <= flops), key=lambda r: r["acc1"])["cfg_id"]


BAD = [  # (body, status, words of the one-line reason)
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "not an object"),
    ({"image": "%%%"}, 400, "not valid base64"),
    ({"image": base64.b64encode(b"not an image").decode()}, 400, "not a readable image"),
    ({}, 400, "image is missing"),
    ({"image": png(), "budget": {"latency_ms": -3}}, 400, "budget.latency_ms -3 is not a positive number"),
    ({"image": png(), "budget": {"latency_ms": "fast"}}, 400, "not a positive number"),
    ({"image": png(), "budget": {"seconds": 1}}, 400, "unknown budget 'seconds'"),
    ({"image": png(), "budget": 5}, 400, "is not an object"),
    ({"image": png(), "budget": {"latency_ms": 1e-6}}, 422, "raise budget.latency_ms to at least"),
    ({"image": png(), "budget": {"flops": 1}}, 422, "raise budget.flops to at least"),
    ({"image": png(), "cfg_id": 999}, 400, "cfg_id 999 is not served"),
    ({"image": png(), "top_k": 0}, 400, "top_k 0"),
    ({"image": png(), "colour": 1}, 400, "unknown field 'colour'"),
]


def test_bad_requests_get_a_4xx_and_one_line(core):
    for body, status, words in BAD:
        got, answer = handle(core, body)
        assert got == status and words in answer["error"] and "\n" not in answer["error"], (body, answer)
    assert handle(core, b"x" * (core.spec.max_body_bytes + 1))[0] == 413
    assert handle(core, b"", "DELETE")[0] == 405 and handle(core, b"", "GET", "/nope")[0] == 404
    assert handle(core, {"image": png()})[0] == 200  # still serving
    assert core.info()["responses"]["200"] >= 1


def test_serve_refuses_results_of_another_network_before_starting(tiny, tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text(json.dumps({**tiny.records[2], "route": "someone_else#0"}) + "\n")
    rc, _, err = run_cli(capsys, "serve", tiny.ckpt, "--stitch_config", tiny.config, "--results", other)
    assert_refused(rc, err, "is not of this SN-Net")
    rc, _, err = run_cli(capsys, "serve", "--results", tiny.results)
    assert_refused(rc, err, "pass the SN-Net checkpoint")


def test_serve_refuses_a_port_in_use_before_starting_ray(tiny, capsys):
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -r requirements-extras.txt)")
    import ray
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        rc, _, err = run_cli(capsys, "serve", tiny.ckpt, "--stitch_config", tiny.config, "--results", tiny.results,
                             "--port", port)
    assert_refused(rc, err, f"cannot listen on 127.0.0.1:{port}", "pass a free --port")
    assert not ray.is_initialized()


# ------------------------------------------------------------------------------------------------ over HTTP
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """`snnet serve` as a user starts it (Ray Serve, a private local instance) on a free port."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -r requirements-extras.txt)")
    port = free_port()
    log = tmp_path_factory.mktemp("serve")
    out, err = open(log / "out", "w+"), open(log / "err", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "snnet.cli", "serve", str(tiny.ckpt), "--stitch_config",
                             str(tiny.config), "--results", str(tiny.results), "--port", str(port), "--max-batch",
                             "8", "--max-body-kb", "64"], cwd=ROOT, stdout=out, stderr=err,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    deadline = time.monotonic() + 300  # Ray starts in ~20 s idle, minutes on a 2-core machine under load
    while "serving" not in open(log / "out").read():
        assert proc.poll() is None and time.monotonic() < deadline, open(log / "err").read()[-3000:]
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/", proc, log
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.dist
def test_http_server_answers_refuses_holds_up_under_load_and_stops(server):
    url, proc, log = server
    status, info = get(url)
    assert status == 200 and len(info["stitches"]) > 2
    idle = {int(c): t["1"] for c, t in info["latency_ms"].items()}
    budget = sorted(idle.values())[len(idle) // 2]
    status, a = post(url, json.dumps({"image": png(), "budget": {"latency_ms": budget}}).encode())
    assert status == 200 and idle[a["cfg_id"]] <= budget and a["within_budget"], a
    for body, want, words in BAD[:3] + BAD[5:6] + BAD[9:10]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, a = post(url, raw)
        assert status == want and words in a["error"], (body, a)
    status, a = post(url, json.dumps({"image": "A" * 70_000}).encode())  # over --max-body-kb 64
    assert status == 413 and "--max-body-kb is 64" in a["error"]
    # a bounded load: 150 requests from 6 threads, stopped after 60 s whatever happens
    bodies = [json.dumps({"image": png(i % 7), "budget": {"latency_ms": 2 * budget}}).encode() for i in range(150)]
    t0 = time.monotonic()
    replies = run_load(url, bodies, concurrency=6, time_limit=60)
    assert time.monotonic() - t0 < 75
    assert [r.status for r in replies] == [200] * len(bodies)
    assert max(r.body["batch_size"] for r in replies) > 1
    assert percentile([r.ms for r in replies], 50) <= percentile([r.ms for r in replies], 99)
    assert get(url + "health") == (200, {"ok": True})  # alive after all of it
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert "shutting down" in open(log / "err").read()
