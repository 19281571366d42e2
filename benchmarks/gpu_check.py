"""One command for a borrowed GPU machine: what of the CUDA path works, what breaks, and how fast it is.

    make gpu-check                                        # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --smoke --device cpu --out DIR    # every step at toy size, on CPU

A GPU is lent now and then, for minutes, so everything runs in one go within --budget seconds (default 570: the
whole run stays under 10 minutes), in this order, each step timed, a failing step reported with its one-line cause
and the next step run anyway:

1. cuda_tests   tests/test_cuda.py (pytest -m cuda): fp16 + GradScaler, bf16, channels_last, --torchcompile routes,
                EMA, SyncBatchNorm with --sample-sync, pinned-memory loaders, GPU <-> CPU checkpoint round trip;
2. distributed  ./distributed_train.sh <all visible GPUs> (nccl, fp16, pinned memory) on the digits demo's config
                (random anchors), then --eval --resume on the GPUs and a CPU evaluation of the same checkpoint:
                the top-1 of every stitch must agree to one image (fp32 on both sides, TF32 off).
                A failed launch is retried with less (--no-ls-init, then one process), so one broken feature does
                not hide whether the rest works; the step still fails, naming the first cause;
3. train_step   DeiT-Ti/S/B SN-Net training step vs. the same route as a standalone network, 224 px, batch 128,
                fp16 + GradScaler (benchmarks/train_step.py's measurement): seconds, images/s, ratio, peak memory;
4. eval_all     the 71 stitches in one pass vs. a pass per stitch (benchmarks/eval_all_stitches.py's measurement)
                on 5,000 generated JPEGs with 8 loader workers, pinned memory, fp16: ratio, images/s, GPU use;
5. ls_init      least-squares init of the DeiT-Ti/S/B SN-Net (100 images, as its config): seconds, peak memory
                (the images are handed over on the device; train.py's own way of feeding them is a cuda test);
6. v2_step      SN-Netv2's S/L two-way step with LoRA rank 64 (configs/deit3_s_l_v2.json, ROS sampler).

It writes <out>/<gpu name>.md (default out: results/gpu; tables, torch/CUDA versions, every failure with its cause)
and the same numbers as <out>/<gpu name>.json, both atomically, and prints a summary. Exit code 0 when no step
failed, 1 when one did, 2 when no CUDA device is visible (nothing is run) or an option is wrong.

Each step runs in its own process (forked from a server that imported torch once), so a CUDA error that poisons one
process's context, or a hang, costs that step only: a step past its time is killed with what it started.
With --smoke every step runs at toy size (reduced anchors, a few images, one epoch); on --device cpu the CUDA-only
step (1) is reported as skipped and step 2 runs one CPU process. tests/test_gpu_check.py runs the smoke mode.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

STEPS = ("cuda_tests", "distributed", "train_step", "eval_all", "ls_init", "v2_step")
CUDA_ONLY = {"cuda_tests"}
# seconds each step may take at real size; what a step leaves unused goes to the next ones
# (the tests compile blocks with inductor from a cold cache: the largest share)
ALLOT = {"cuda_tests": 150, "distributed": 110, "train_step": 70, "eval_all": 130, "ls_init": 40, "v2_step": 70}
THREAD_ENV = {"OMP", "KMP", "GOMP", "MKL", "OPENBLAS"}  # thread and affinity settings the eval_all step logs
GRACE = 20  # a step's own deadline comes first; the parent kills it only this long after

# the sizes of each step: real (a GPU machine) and smoke (toy size, for the test suite)
SIZES = {
    "real": {"dist_epochs": 3, "dist_subset": None, "dist_workers": 4, "ts_img": 224, "ts_batch": 128, "ts_reps": 10,
             "ts_stitches": 3, "ts_reduced": False, "ev_images": 5000, "ev_jpeg": 256, "ev_img": 224,
             "ev_batch": 128, "ev_workers": 8, "ev_reduced": False, "ev_stitches": None, "ls_images": 100,
             "v2_rank": 64, "v2_gap": 1.0},
    "smoke": {"dist_epochs": 1, "dist_subset": (6, 3), "dist_workers": 0, "ts_img": 32, "ts_batch": 4, "ts_reps": 1,
              "ts_stitches": 1, "ts_reduced": True, "ev_images": 8, "ev_jpeg": 72, "ev_img": 64, "ev_batch": 8,
              "ev_workers": 0, "ev_reduced": True, "ev_stitches": 6, "ls_images": 8, "v2_rank": 4, "v2_gap": 0.02},
}


class StepSkipped(Exception):
    """A step that cannot run here (its message says why): reported as skipped, not failed."""


class StepFailed(Exception):
    """A step that failed after measuring something: the report keeps its `tables` beside the cause."""

    def __init__(self, message: str, tables: list[str]):
        super().__init__(message)
        self.tables = tables


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [gpu-check] {msg}", flush=True)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")[:300]


# ------------------------------------------------------------------------------------------------ small helpers
def run_cmd(cmd: list, log_path: Path, timeout: float, env: dict | None = None) -> int:
    """Run `cmd` from the repository root, output to `log_path`; past `timeout` its whole process group (torchrun
    and its workers, pytest) is killed and TimeoutError raised."""
    log(f"$ {' '.join(str(c) for c in cmd)}  (log: {log_path})")
    with open(log_path, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group we started: torchrun's workers go with it
            proc.wait()
            raise TimeoutError(f"{Path(str(cmd[0])).name} ran past {timeout:.0f} s (log: {log_path})") from None


def log_cause(log_path: Path) -> str:
    """The line of a failed command's log that says why: train.py's one-line `error: ...`, else the last exception
    line of a worker's traceback (torchrun's own ChildFailedError summary says only that a worker failed), else the
    last line."""
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    for pattern in (r"^error: ", r"^(\[rank\d+\]: )?[\w.]*(Error|Exception|Interrupt)\b:? "):
        found = [ln for ln in lines if re.search(pattern, ln) and "ChildFailedError" not in ln]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else "no output"


def md_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    align = align or "|".join("---:" if i else "---" for i in range(len(header)))
    out = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def gib(n: float | None) -> str:
    return "-" if not n else f"{n / 2 ** 30:.2f}"


class Utilisation:
    """Mean GPU utilisation (percent) while it runs: NVML through torch when pynvml is installed, else nvidia-smi
    polled every 0.5 s; None where neither answers (then the report says "-")."""

    def __init__(self, device):
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _read(self) -> float | None:
        import torch
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # no pynvml: ask nvidia-smi
            pass
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  "-i", str(self.device.index or 0)], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        except Exception:
            return None

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            v = self._read()
            if v is None:
                return
            self.samples.append(v)

    def __enter__(self):
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=6)

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def parse_junit(path: Path) -> dict:
    """pytest's JUnit XML: counts and, per test that failed or errored, its one-line cause."""
    import xml.etree.ElementTree as ET
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        seconds = float(case.get("time", 0) or 0)
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            kind = "failed" if bad.tag == "failure" else "error"
            msg = (bad.get("message") or bad.text or "").strip().splitlines()
            cause = msg[0][:300] if msg else kind
        elif case.find("skipped") is not None:
            kind, cause = "skipped", (case.find("skipped").get("message") or "").splitlines()[0:1]
            cause = cause[0][:200] if cause else ""
        else:
            kind, cause = "passed", ""
        counts[kind] += 1
        rows.append([name, kind, f"{seconds:.1f}", cause.replace("|", "\\|")])
    return {"counts": counts, "rows": rows}


# ------------------------------------------------------------------------------------------------ the steps
def step_cuda_tests(ctx: dict) -> dict:
    if ctx["device"].type != "cuda":
        raise StepSkipped("needs CUDA (tests/test_cuda.py runs only where CUDA exists)")
    junit = ctx["work"] / "cuda_tests.xml"
    log_path = ctx["work"] / "cuda_tests.log"
    rc = run_cmd([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider",
                  f"--junitxml={junit}", "tests/test_cuda.py"], log_path, ctx["deadline"] - time.time())
    if not junit.exists():
        raise RuntimeError(f"pytest exit {rc} without a report: {log_cause(log_path)}")
    res = parse_junit(junit)
    c = res["counts"]
    summary = f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped"
    table = md_table(["test", "result", "s", "cause"], res["rows"], "---|---|---:|---")
    failed = c["failed"] + c["error"]
    out = {"summary": summary, "tables": [table], "data": res}
    if failed or c["passed"] == 0:
        bad = [r for r in res["rows"] if r[1] in ("failed", "error")]
        out["cause"] = (f"{bad[0][0]}: {bad[0][3]}" if bad else "no test passed") + \
            (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
        out["status"] = "failed"
    return out


def _digits_subset(data: Path, dest: Path, per_class: tuple[int, int]) -> Path:
    """A few images per class of each split (smoke mode: a toy run of the same pipeline)."""
    if dest.is_dir():
        return dest
    for split, n in zip(("train", "val"), per_class):
        for cls in sorted((data / split).iterdir()):
            (dest / split / cls.name).mkdir(parents=True, exist_ok=True)
            for f in sorted(cls.iterdir())[:n]:
                shutil.copy(f, dest / split / cls.name / f.name)
    return dest


def step_distributed(ctx: dict) -> dict:
    import torch

    from snnet.demo import COMMON, write_digits
    from snnet.results.records import read_results
    from snnet.train.main import main as train_main
    size, work, device = ctx["size"], ctx["work"], ctx["device"]
    data = write_digits(ctx["cache"])
    if size["dist_subset"]:
        data = _digits_subset(data, work / "digits_subset", size["dist_subset"])
    # the demo's config with random anchors: this step checks the path (nccl, AMP, pinned memory, resume), not
    # accuracy, and needs no trained anchors
    cfg = json.loads((ROOT / "configs" / "demo_digits.json").read_text())
    for a in cfg["anchors"]:
        a.pop("checkpoint", None)
    if size["dist_subset"]:
        cfg["stitch_init_bs"] = 16
    config = work / "demo_digits_random.json"
    config.write_text(json.dumps(cfg, indent=1))
    cuda = device.type == "cuda"
    nproc = torch.cuda.device_count() if cuda else 1
    dev_flags = ["--amp", "--pin-mem"] if cuda else ["--device", "cpu"]
    common = [*COMMON, "-j", str(size["dist_workers"]), "--no-pretrained"]
    ckpt = work / "train" / "last.pth.tar"
    rows, failures = [], []

    def attempts(what: str, variants: list[tuple[str, int, list]], run_name: str, env: dict | None = None) -> int:
        """Run the first variant, and on failure the next ones (fewer features), so that one broken feature does
        not hide whether the rest of the path works: the step still fails, naming the first cause. Returns the
        process count of the variant that worked."""
        for k, (label, procs, extra) in enumerate(variants):
            t = time.time()
            name = f"{run_name}{k or ''}"
            rc = run_cmd(["./distributed_train.sh", procs, *extra, "--output", work, "--experiment", run_name],
                         work / f"{name}.log", ctx["deadline"] - time.time(), env)
            ok = rc == 0
            rows.append([f"{what}, {procs} process(es){label}", "ok" if ok else f"failed (exit {rc})",
                         f"{time.time() - t:.1f}", "" if ok else log_cause(work / f"{name}.log").replace("|", "/")])
            if ok:
                return procs
            failures.append(f"{what}, {procs} process(es){label}: {log_cause(work / f'{name}.log')}")
            shutil.rmtree(work / run_name, ignore_errors=True)  # the retry starts clean
        raise StepFailed(failures[0] + (f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""),
                         [md_table(["phase", "result", "s", "cause"], rows, "---|---|---:|---")])

    # one process is no process group (torchrun's WORLD_SIZE 1): nccl itself runs from 2 GPUs on (and in the tests)
    group = lambda n: (("nccl" if cuda else "gloo") if n > 1 else "no process group") + \
        (", fp16 + GradScaler, pinned memory" if cuda else ", CPU")
    # the demo's recipe (its config's "recipe"; a warm-up as long as the run is fitted to none)
    train = [data, "--stitch_config", config, "--epochs", size["dist_epochs"], *common, *dev_flags]
    variants = [(f", {group(nproc)}", nproc, train), (f", {group(nproc)}, --no-ls-init", nproc,
                                                      [*train, "--no-ls-init"])]
    if nproc > 1:
        variants.append((f", {group(1)}, --no-ls-init", 1, [*train, "--no-ls-init"]))
    attempts(f"train {size['dist_epochs']} epoch(s)", variants, "train")
    # evaluation in fp32 on both sides (no --amp), so the two may differ by float rounding only
    evaluate = [data, "--stitch_config", config, "--eval", "--resume", ckpt, *common,
                *(["--pin-mem"] if cuda else ["--device", "cpu"])]
    variants = [("", nproc, evaluate)] + ([("", 1, evaluate)] if nproc > 1 else [])
    # NVIDIA_TF32_OVERRIDE=0: no TF32 in cuDNN/cuBLAS (torch lets cuDNN convolutions use it by default), so the
    # GPU's fp32 differs from the CPU's by summation order only and a flipped top-1 means a real difference.
    # SNNET_NO_PREFLIGHT: the training launch checked this data and config; the ranks check the checkpoint
    nproc = attempts(f"--eval --resume on {device.type}", variants, "eval_device",
                     {"NVIDIA_TF32_OVERRIDE": "0", "SNNET_NO_PREFLIGHT": "1"})
    t = time.time()
    log("CPU evaluation of the same checkpoint (in this process)")
    rc = train_main([str(data), "--stitch_config", str(config), "--eval", "--resume", str(ckpt), *map(str, common),
                     "--device", "cpu", "--output", str(work), "--experiment", "eval_cpu"])
    if rc == 130:  # Ctrl-C: train.py's main says so and returns 130; the whole check stops
        raise KeyboardInterrupt
    if rc != 0:
        raise RuntimeError(f"CPU evaluation of the checkpoint failed (exit {rc})")
    rows.append(["--eval --resume on cpu, 1 process (in process)", "ok", f"{time.time() - t:.1f}", ""])
    dev = {r["cfg_id"]: r for r in read_results(work / "eval_device" / "stitches_res.txt")}
    cpu = {r["cfg_id"]: r for r in read_results(work / "eval_cpu" / "stitches_res.txt")}
    n_val = sum(1 for _ in (data / "val").rglob("*.png"))
    one_image = 100.0 / n_val
    if sorted(dev) != sorted(cpu):
        raise RuntimeError(f"the device evaluation has stitches {sorted(dev)}, the CPU one {sorted(cpu)}")
    d_acc = {c: abs(dev[c]["acc1"] - cpu[c]["acc1"]) for c in dev}
    d_loss = max(abs(dev[c]["loss"] - cpu[c]["loss"]) for c in dev)
    same = sum(1 for v in d_acc.values() if v == 0)
    worst = max(d_acc.values())
    summary = (f"{len(dev)} stitches on {nproc} {device.type} process(es): top-1 equal to CPU's for {same}, max "
               f"|diff| {worst:.3f} pp (one image = {one_image:.3f} pp), max loss diff {d_loss:.2e}")
    tables = [md_table(["phase", "result", "s", "cause"], rows, "---|---|---:|---")]
    out = {"summary": summary, "tables": tables,
           "data": {"nproc": nproc, "stitches": len(dev), "equal": same, "max_acc1_diff": worst,
                    "max_loss_diff": d_loss, "val_images": n_val}}
    if worst > one_image + 1e-9:
        failures.append(f"top-1 differs from the CPU evaluation by {worst:.3f} pp (> one image)")
    if failures:  # a later variant worked: the comparison above is real, but the path as asked is broken
        out.update(status="failed", cause=failures[0] + (f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""))
    return out


def _train_step_table(ctx: dict, config: str, sets: list[str], label: str) -> dict:
    """benchmarks/train_step.py's measurement at this step's size: its config, stitches and interleaved timing, on
    the device, fp16 + GradScaler on CUDA; the batch is halved (down to 8) where it does not fit."""
    import torch
    import train_step as ts

    from snnet import build_snnet
    size, device = ctx["size"], ctx["device"]
    cuda = device.type == "cuda"
    amp = torch.float16 if cuda else None
    cfg, overrides = ts.load_config(str(ROOT / config), size["ts_reduced"], sets)
    torch.manual_seed(0)
    net = build_snnet(cfg, pretrained=False, img_size=size["ts_img"]).to(device).train()
    picks = ts.pick_stitches(net, cfg, size["ts_stitches"])
    batch, notes, rows, ratios = size["ts_batch"], [], [], []
    for cfg_id in picks:
        if time.time() > ctx["deadline"] - 5:
            notes.append(f"stopped after {len(rows)} of {len(picks)} stitches at the step's deadline")
            break
        while True:
            x = torch.randn(batch, 3, size["ts_img"], size["ts_img"], device=device)
            y = torch.randint(0, 1000, (batch,), device=device)
            try:
                m = ts.measure_stitch(net, cfg_id, x, y, size["ts_reps"], amp, peak_memory=cuda)
                break
            except torch.cuda.OutOfMemoryError:
                del x, y
                torch.cuda.empty_cache()
                if batch <= 8:
                    raise
                notes.append(f"cfg {cfg_id}: batch {batch} ran out of memory, measured at {batch // 2}")
                batch //= 2
        ratios.append(m["snnet"] / m["alone"])
        rows.append([cfg_id, net.describe(cfg_id), batch, f"{m['snnet']:.4f}", f"{m['alone']:.4f}",
                     f"{m['snnet'] / m['alone']:.3f}", f"{batch / m['snnet']:.0f}", f"{batch / m['alone']:.0f}",
                     gib(m.get("snnet_peak")), gib(m.get("alone_peak"))])
        log(f"{label}: cfg {cfg_id} ratio {m['snnet'] / m['alone']:.3f}, {batch / m['snnet']:.0f} img/s")
    if not rows:
        raise TimeoutError("no stitch measured before the step's deadline")
    extra = "".join(f", {k}={json.dumps(v)}" for k, v in overrides.items())
    head = (f"{config}{', reduced' if size['ts_reduced'] else ''}{extra}, {net.num_configs} routes, "
            f"{size['ts_img']} px, {'fp16 + GradScaler' if cuda else 'fp32'}, {size['ts_reps']} reps (median), "
            f"interleaved, random weights")
    table = md_table(["cfg_id", "route", "batch", "SN-Net step (s)", "standalone step (s)", "ratio",
                      "SN-Net img/s", "standalone img/s", "SN-Net peak (GiB)", "standalone peak (GiB)"], rows,
                     "---:|---|---:|---:|---:|---:|---:|---:|---:|---:")
    mean = sum(ratios) / len(ratios)
    return {"summary": f"ratio {mean:.3f} (SN-Net / standalone, mean over {len(ratios)} stitches; target <= 1.05)",
            "tables": [head + "\n\n" + table + "".join(f"\n\n{n}" for n in notes)],
            "data": {"ratio": mean, "rows": rows, "notes": notes}}


def step_train_step(ctx: dict) -> dict:
    return _train_step_table(ctx, "configs/deit_ti_s_b.json", [], "DeiT-Ti/S/B step")


def step_v2_step(ctx: dict) -> dict:
    size = ctx["size"]
    sets = [f'stitch_layer={{"type": "lora", "rank": {size["v2_rank"]}}}',
            f'sampler={{"type": "ros", "gap": {size["v2_gap"]}}}']
    return _train_step_table(ctx, "configs/deit3_s_l_v2.json", sets, "SN-Netv2 S/L step")


def _deit_ti_s_b(ctx: dict, reduced: bool):
    """The DeiT-Ti/S/B SN-Net (71 stitches, random weights) at this step's size, on the device."""
    import eval_all_stitches as eas
    import torch

    from snnet import build_snnet, load_stitch_config
    size = ctx["size"]
    torch.manual_seed(0)
    if reduced:  # eval_all_stitches.py's reduced anchors (widths 32/64/128, patch 8, 64 px)
        return eas.build_model("sliding_window").to(ctx["device"])
    cfg = load_stitch_config(str(ROOT / "configs" / "deit_ti_s_b.json"))
    return build_snnet(cfg, pretrained=False, img_size=size["ev_img"]).to(ctx["device"])


def _loader_rate(make, label: str, batches: int, deadline: float) -> list:
    """[label, images, images/s] of the first `batches` batches of the loader `make()` gives (the workers' start
    counted, as a real evaluation pays it), stopping early at `deadline` (time.time())."""
    t, n = time.perf_counter(), 0
    for i, (x, *_) in enumerate(make()):
        n += x.shape[0]
        if i + 1 >= batches or time.time() > deadline:
            break
    return [label, n, f"{n / (time.perf_counter() - t):.0f}"]


def cpu_quota() -> float | None:
    """The CPUs' worth of time a container's cgroup lets this process use (cgroup v2 cpu.max, else v1's CFS quota),
    None where unlimited or unknown: a machine may show 16 cores to nproc and grant fewer."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def step_eval_all(ctx: dict) -> dict:
    import eval_all_stitches as eas
    import torch
    size, device = ctx["size"], ctx["device"]
    cuda = device.type == "cuda"
    amp = torch.float16 if cuda else None
    img, n, workers, batch = size["ev_img"], size["ev_images"], size["ev_workers"], size["ev_batch"]
    folder = ctx["cache"] / f"jpeg_{n}_{size['ev_jpeg']}px"
    t = time.time()
    if not (folder / "done").exists():  # generated once per work folder: a rerun on the same machine reuses them
        log(f"writing {n} JPEGs of {size['ev_jpeg']} px to {folder}")
        shutil.rmtree(folder, ignore_errors=True)
        eas.make_folder(folder, n, size=size["ev_jpeg"])
        (folder / "done").touch()
    gen_s = time.time() - t
    model = _deit_ti_s_b(ctx, size["ev_reduced"]).eval()
    floor = eas.flops_floor_of(model, img)
    ids = list(range(model.num_configs))
    if size["ev_stitches"]:  # smoke: a few stitches spread over the plan (the anchors first)
        ids = sorted(set(ids[:: max(1, len(ids) // size["ev_stitches"])][: size["ev_stitches"]]))
    jpeg = lambda pin=cuda: eas.loader_for(folder, batch, workers, img=img, pin_mem=pin)
    # compute only first (the ratio that is the model's, not the machine's loader's), then with JPEG decoding: the
    # first GPU run's loader delivered 57-70 images/s, so the JPEG modes took its whole share and the compute-only
    # pass per stitch never ran
    modes, outs = [("ours_tensors", "tensors"), ("snnet_tensors", "tensors"), ("ours", "JPEG"), ("snnet", "JPEG")], {}
    # the loader alone first, each row logged as it is measured (a step stopped later still shows them), with the
    # CPUs and the quota this process may use: the first GPU runs' loader gave 8-87 images/s with 8 workers, until
    # `_child` forked them (they had been started by forkserver, each importing torch)
    log(f"eval_all: this process may run on {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs; "
        f"cgroup CPU quota {cpu_quota() or 'none'}; torch threads {torch.get_num_threads()}; "
        + (", ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.split("_")[0] in THREAD_ENV) or "-"))
    probe = [(f"0 workers (in this process), pinned memory: {cuda}", 0, cuda)] + (
        [(f"{workers} workers, pinned memory: False", workers, False)] if cuda else [])
    loader_rows = []
    for label, w, pin in probe:
        make = lambda w=w, pin=pin: eas.loader_for(folder, batch, w, img=img, pin_mem=pin)
        loader_rows.append(_loader_rate(make, label, 4, ctx["deadline"] - 60))
        log(f"eval_all: loader alone, {label}: {loader_rows[-1][2]} images/s")
    tensors, rate, n_tensors = None, None, n
    for k, (mode, _) in enumerate(modes):
        left = ctx["deadline"] - time.time()
        if left < 10 and outs:
            log(f"eval_all: no time left for {mode}")
            break
        if mode.endswith("tensors") and tensors is None:  # pre-decoded, on the device: compute only
            # at most 40 % of the time left (a slow loader must not take the step's time: 5000 images at the 40
            # images/s of the first GPU runs took 125 s); the compute-only modes use the images decoded by then
            t, tensors, stop = time.perf_counter(), [], time.time() + 0.4 * left
            for x, y, *_ in jpeg():  # (images, labels[, sample ids])
                tensors.append((x.to(device), y.to(device)))
                if time.time() > stop:
                    break
            n_tensors = sum(x.shape[0] for x, _ in tensors)
            rate = n_tensors / (time.perf_counter() - t)
            part = "all images" if n_tensors == n else f"{n_tensors} of {n} images: the time share ran out"
            loader_rows.append([f"{workers} workers, pinned memory: {cuda} ({part}, into device memory)",
                                n_tensors, f"{rate:.0f}"])
            log(f"eval_all: loader alone, {loader_rows[-1][0]}: {rate:.0f} images/s")
        # a JPEG mode is bound by the loader's rate just measured: one pass (ours) or one stitch's pass (SN-Net's
        # first) that cannot end in the time left is not started (the step would be stopped, reporting nothing)
        if not mode.endswith("tensors") and rate and n / rate > left - 5:
            log(f"eval_all: {mode} skipped: one pass of {n} images at {rate:.0f} images/s needs {n / rate:.0f} s, "
                f"{left:.0f} s left")
            continue
        # SN-Net's way gets a share of what is left and is extrapolated from the stitches it finished
        share = (left - 5) / (len(modes) - k) if mode.startswith("snnet") else None  # 5 s to write the report
        images = n_tensors if mode.endswith("tensors") else n
        log(f"eval_all: {mode} ({len(ids)} stitches, {images} images)")
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with Utilisation(device) as util:
            o = eas.time_mode(model, mode, tensors if mode.endswith("tensors") else jpeg, ids, device, amp,
                              deadline=time.perf_counter() + share if share else None)
        o["util"] = util.mean
        o["peak"] = torch.cuda.max_memory_allocated(device) if cuda else None
        o["full_seconds"] = o["seconds"] * len(ids) / len(o["done"])
        o["images"] = images
        outs[mode] = o
    # each way against the one pass on the same data (the JPEG modes may not have run)
    same_data = lambda m: "ours_tensors" if m.endswith("tensors") else "ours"
    diffs = [abs(outs[m]["results"][c]["acc1"] - outs[same_data(m)]["results"][c]["acc1"])
             for m in outs if same_data(m) in outs for c in outs[m]["done"]]
    same, worst = max(diffs) == 0, max(diffs)
    rows = []
    names = {"ours": "ours: one pass, shared prefixes", "snnet": "SN-Net: a pass per stitch",
             "ours_tensors": "ours: one pass, shared prefixes", "snnet_tensors": "SN-Net: a pass per stitch"}
    for mode, data in modes:
        if mode not in outs:
            continue
        o = outs[mode]
        part = "" if len(o["done"]) == len(ids) else f" ({len(o['done'])} of {len(ids)} measured, extrapolated)"
        rows.append([names[mode], data, f"{o['full_seconds']:.1f}{part}",
                     f"{len(ids) * o['images'] / o['full_seconds']:.0f}", f"{o['images'] / o['full_seconds']:.0f}",
                     "-" if o["util"] is None else f"{o['util']:.0f}", gib(o["peak"]),
                     f"{o['peak_activation_bytes'] / 2 ** 20:.1f}" if o["peak_activation_bytes"] else "-"])
    ratio = outs["ours"]["full_seconds"] / outs["snnet"]["full_seconds"] if {"ours", "snnet"} <= set(outs) else None
    cratio = (outs["ours_tensors"]["full_seconds"] / outs["snnet_tensors"]["full_seconds"]
              if "snnet_tensors" in outs else None)
    head = (f"{'reduced DeiT-Ti/S/B (widths 32/64/128, patch 8)' if size['ev_reduced'] else 'DeiT-Ti/S/B'}, "
            f"{len(ids)} of {model.num_configs} stitches, {n} JPEGs ({size['ev_jpeg']} px -> {img} px, "
            f"written in {gen_s:.0f} s), batch "
            f"{batch}, {workers} loader workers{', pinned memory, fp16' if cuda else ''}; identical top-1 for "
            f"every stitch in all modes: {same}" + ("" if same else f" (max difference {worst:.3f} pp)")
            + f"; FLOPs floor {floor:.3f}")
    table = md_table(["mode", "data", "time (s)", "stitch-images/s", "images/s", "GPU use (%)", "peak memory (GiB)",
                      "peak live activations (MiB)"], rows, "---|---|---:|---:|---:|---:|---:|---:")
    if loader_rows:
        table += "\n\nThe loader alone (decoding, resizing, collating; no model):\n\n" + md_table(
            ["loader", "images", "images/s"], loader_rows, "---|---:|---:")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    out = {"summary": f"ratio {fmt(ratio)} with JPEG decoding, {fmt(cratio)} compute only (floor {floor:.3f})",
           "tables": [head + "\n\n" + table],
           "data": {"ratio": ratio, "compute_ratio": cratio, "floor": floor, "identical": same,
                    "max_acc1_diff": worst, "rows": rows, "loader_rows": loader_rows}}
    # both ways run the same kernels on the same batches and should agree exactly; one flipped image (a library
    # may pick another kernel from one call to the next) is shown, not failed: more is a real difference
    if worst > 100.0 / min(o["images"] for o in outs.values()) + 1e-9:  # one image of the smallest set
        out.update(status="failed", cause=f"the one-pass top-1 differs from the pass-per-stitch top-1 by {worst:.3f} "
                                          f"pp (> one image)")
    return out


def step_ls_init(ctx: dict) -> dict:
    import torch

    from snnet.stitching.ls_init import ls_init
    size, device = ctx["size"], ctx["device"]
    cuda = device.type == "cuda"
    model = _deit_ti_s_b(ctx, size["ev_reduced"])
    img = 64 if size["ev_reduced"] else size["ev_img"]
    g = torch.Generator().manual_seed(0)
    # random images in batches of 50, as clean_images yields them; the step measures time and memory, not the fit
    batches = [torch.randn(min(50, size["ls_images"] - i), 3, img, img, generator=g).to(device)
               for i in range(0, size["ls_images"], 50)]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    reports = ls_init(model, batches, mode="joint")
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    rows = [[f"{'reduced ' if size['ev_reduced'] else ''}DeiT-Ti/S/B", size["ls_images"], len(reports),
             f"{seconds:.2f}", gib(peak)]]
    table = md_table(["SN-Net", "images", "stitching layers", "LS init (s)", "peak memory (GiB)"], rows)
    return {"summary": f"{len(reports)} layers in {seconds:.1f} s, peak {gib(peak)} GiB",
            "tables": [table], "data": {"seconds": seconds, "peak": peak, "layers": len(reports)}}


STEP_FUNCS = {"cuda_tests": step_cuda_tests, "distributed": step_distributed, "train_step": step_train_step,
              "eval_all": step_eval_all, "ls_init": step_ls_init, "v2_step": step_v2_step}


def _child(name: str, opts: dict, result_path: str) -> None:
    """One step in its own process; its outcome as JSON at `result_path`."""
    # a forkserver child's default start method is forkserver, so its DataLoader workers would each start a fresh
    # interpreter and import torch, timm and snnet (8 workers: 8 images/s on the H200 machine, 755 with none);
    # train.py's workers under torchrun are forked (Linux, Python <= 3.13), and so are these now
    import multiprocessing
    multiprocessing.set_start_method("fork", force=True)
    import torch
    os.setsid()  # its own process group: the parent can stop it with everything it started
    ctx = {"size": SIZES[opts["size"]], "device": torch.device(opts["device"]), "work": Path(opts["work"]) / name,
           "cache": Path(opts["work"]), "deadline": opts["deadline"]}
    # a rerun into the same --work folder: the step starts from a clean folder of its own (a finished run's
    # results would be refused as another checkpoint's); the shared data cache (ctx["cache"]) stays
    shutil.rmtree(ctx["work"], ignore_errors=True)
    ctx["work"].mkdir(parents=True, exist_ok=True)
    if ctx["device"].type == "cuda":
        torch.cuda.set_device(ctx["device"])
    if opts["size"] == "smoke":  # toy tensors: a second intra-op thread only waits (as in the test suite)
        torch.set_num_threads(1)
    try:
        out = STEP_FUNCS[name](ctx)
        out.setdefault("status", "ok")
    except StepSkipped as e:
        out = {"status": "skipped", "cause": str(e)}
    except StepFailed as e:
        out = {"status": "failed", "cause": str(e), "tables": e.tables}
    except BaseException as e:  # reported, and the next step runs
        import traceback
        traceback.print_exc()
        out = {"status": "failed", "cause": one_line(e)}
    Path(result_path).write_text(json.dumps(out, default=str))


# ------------------------------------------------------------------------------------------------ the report
def environment(device) -> dict:
    import timm
    import torch
    env = {"date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "host": platform.node(),
           "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "CUDA (torch built with)": torch.version.cuda or "-", "cpu cores": os.cpu_count(),
           "cpu cores this process may use": len(os.sched_getaffinity(0))}
    quota = cpu_quota()
    env["cpu quota (cgroup)"] = "-" if quota is None else f"{quota:g} cores"
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout
        # "+changes": the tree had uncommitted changes to tracked files (the first GPU run did: its adapter fix)
        env["commit"] = (git("rev-parse", "--short", "HEAD").strip() or "-") + (
            " +changes" if git("status", "--porcelain", "--untracked-files=no").strip() else "")
    except Exception:
        env["commit"] = "-"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({"GPU": props.name, "GPUs visible": torch.cuda.device_count(),
                    "GPU memory (GiB)": f"{props.total_memory / 2 ** 30:.1f}",
                    "compute capability": f"{props.major}.{props.minor}",
                    "cuDNN": torch.backends.cudnn.version()})
        try:  # a tuple in recent torch, an int in older ones
            v = torch.cuda.nccl.version()
            env["NCCL"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:
            env["NCCL"] = "-"
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=5).stdout.split("\n")[0] or "-"
        except Exception:
            env["driver"] = "-"
    return env


def report_name(device, smoke: bool) -> str:
    import torch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")
    return name + ("-smoke" if smoke else "")


def render(env: dict, results: dict, smoke: bool, total: float) -> str:
    lines = [f"# GPU check: {env.get('GPU', 'CPU')}{' (smoke: toy sizes)' if smoke else ''}", "",
             "Written by `make gpu-check` (`benchmarks/gpu_check.py`); random weights and generated images, so the "
             "numbers measure speed and the CUDA path, not accuracy.", "",
             md_table(["", ""], [[k, v] for k, v in env.items()], "---|---"), "",
             f"Total {total:.0f} s.", "", "## Summary", ""]
    rows = [[name, r["status"], f"{r['seconds']:.1f}", (r.get("summary") or r.get("cause") or "").replace("|", "/")]
            for name, r in results.items()]
    lines += [md_table(["step", "status", "s", "result"], rows, "---|---|---:|---"), ""]
    bad = [(n, r) for n, r in results.items() if r["status"] == "failed"]
    if bad:
        lines += ["## Failures", ""] + [f"* `{n}`: {r.get('cause', '?')}" for n, r in bad] + [""]
    for name, r in results.items():
        if r.get("tables"):
            lines += [f"## {name}", ""] + [t + "\n" for t in r["tables"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    from snnet.utils.errors import OneLineParser
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--smoke", action="store_true", help="every step at toy size (the test suite runs this)")
    p.add_argument("--out", default=str(ROOT / "results" / "gpu"), help="where <gpu name>.md/.json go")
    p.add_argument("--budget", type=float, default=570.0,
                   help="seconds for all steps, shared out by step (default 570); steps left then are not run")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="run only these steps")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    if not args.budget > 0:  # a negative or zero budget would mark every step failed without saying why
        p.error(f"--budget {args.budget:g}: must be > 0 seconds (the time all steps share; default 570)")
    t_start = time.time()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine with "
              "an NVIDIA GPU, or `benchmarks/gpu_check.py --smoke --device cpu` to test the script", file=sys.stderr)
        return 2
    device = torch.device("cuda:0" if args.device == "cuda" else "cpu")
    budget = args.budget
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"gpu-check: --out {args.out!r} cannot be made ({e.strerror}); pass another folder", file=sys.stderr)
        return 2
    env = environment(device)
    name = report_name(device, args.smoke)
    log(f"{env.get('GPU', 'CPU')}, torch {env['torch']}, CUDA {env['CUDA (torch built with)']}; steps "
        f"{', '.join(args.steps)}; budget {budget:.0f} s")
    tmp = None if args.work else tempfile.mkdtemp(prefix="snnet-gpu-check-")
    work = Path(args.work or tmp)
    # a fork server that imported torch, timm and snnet once: each step's process starts from it in a moment,
    # with no CUDA context inherited from this process
    mpctx = mp.get_context("forkserver")
    mpctx.set_forkserver_preload(["torch", "timm", "snnet.train.main", "snnet.demo", "train_step",
                                  "eval_all_stitches"])
    results, end = {}, t_start + budget
    spent_allot = 0.0
    try:
        for k, step in enumerate(args.steps, 1):
            now = time.time()
            if args.device != "cuda" and step in CUDA_ONLY:
                results[step] = {"status": "skipped", "cause": "needs CUDA", "seconds": 0.0}
                log(f"step {k}/{len(args.steps)} {step}: skipped (needs CUDA)")
                continue
            if now > end - 5:
                results[step] = {"status": "failed", "cause": "not run: the budget was spent", "seconds": 0.0}
                continue
            # this step's allotment plus whatever the earlier steps left, never past the whole budget
            spent_allot += ALLOT[step] * budget / sum(ALLOT[s] for s in args.steps)
            deadline = min(end, max(t_start + spent_allot, now + 10))
            log(f"step {k}/{len(args.steps)} {step}: up to {deadline - now:.0f} s")
            result_path = work / f"{step}.result.json"
            result_path.unlink(missing_ok=True)  # an earlier run's outcome is not this one's
            opts = {"size": "smoke" if args.smoke else "real", "device": str(device), "work": str(work),
                    "deadline": deadline}
            proc = mpctx.Process(target=_child, args=(step, opts, str(result_path)), name=f"gpu-check-{step}")
            proc.start()
            proc.join(timeout=deadline - time.time() + GRACE)
            if proc.is_alive():
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the step's own group: what it started goes too
                except ProcessLookupError:
                    pass
                proc.join()
                r = {"status": "failed", "cause": f"timed out after {time.time() - now:.0f} s and was stopped"}
            elif result_path.exists():
                r = json.loads(result_path.read_text())
            else:
                r = {"status": "failed", "cause": f"its process died (exit code {proc.exitcode})"}
            r["seconds"] = time.time() - now
            results[step] = r
            log(f"step {k}/{len(args.steps)} {step}: {r['status']} in {r['seconds']:.0f} s: "
                f"{r.get('summary') or r.get('cause', '')}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    from snnet.utils.fileio import write_text_atomic
    total = time.time() - t_start
    md = out_dir / f"{name}.md"
    write_text_atomic(md, render(env, results, args.smoke, total))
    write_text_atomic(out_dir / f"{name}.json", json.dumps({"environment": env, "smoke": args.smoke,
                                                           "total_seconds": total, "steps": results},
                                                          indent=1, default=str))
    print(f"\ngpu-check summary ({env.get('GPU', 'CPU')}, {total:.0f} s):")
    for step, r in results.items():
        print(f"  {step:<11} {r['status']:<8} {r['seconds']:6.1f} s  {r.get('summary') or r.get('cause', '')}")
    print(f"wrote {md} and {md.with_suffix('.json')}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
