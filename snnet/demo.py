"""The digits demo (`make demo`): the whole SN-Net journey on real data that ships with scikit-learn.

1. writes scikit-learn's digits (1,797 real 8x8 scans) as an ImageFolder (train/ and val/, stratified 80/20);
2. trains three small ViT anchors of widths 16/32/64, labelled w16, w32, w64 in configs/demo_digits.json, as plain
   models (train.py --model), two at a time;
3. stitches them with configs/demo_digits.json (anchors point at those checkpoints) and trains the SN-Net on two
   processes with distributed_train.sh (gloo on CPU);
4. keeps the trained SN-Net (snnet.pth.tar: weights and the run's identity, no optimizer state, 1.1 MB, so the
   deployment guide's export, load and latency run on the committed demo without training it), evaluates every
   stitch from that file (stitches_res.txt naming its sha256, and the anchors' per-image predictions
   stitches_pred.npz) and writes
   what `snnet pareto --baselines --out DIR` writes: the Pareto table (pareto_flops.md, .json) with the
   no-training baselines (random anchor mixing, confidence cascade), the FLOPs-accuracy plot (pareto_flops.png) and
   the HTML report; last, one line of what the picture shows (stitches within the anchors' range, front vs. mixing).

Everything goes to output/demo (gitignored; results in output/demo/results/demo). Each step's full log is a file
there; the console gets the step's progress line (epoch, loss, ETA) every few seconds. The committed results/demo
and results/demo_v2 change only through tools/publish_demo.py (`make demo-results`); `--check` (`make demo-check`)
compares a fresh run with them. The demo's process and every process it starts run on one thread each with
ATen's AVX2 kernels, MKL's SSE2 code branch for every CPU vendor and oneDNN off (PINNED_ENV): the numbers are then
the same on every x86-64 CPU with AVX2, Intel or AMD, AVX-512 or not (docs/demo.md says what can still move them).

`python -m snnet.demo --v2` (`make demo-v2`) compares SN-Net with SN-Netv2 on the same two anchors (w16 and w64,
the same checkpoints as above): step 3 trains, with the same epochs and learning rates, an SN-Net with SN-Net's
sliding-window plan (configs/demo_digits_v1_pair.json) and an SN-Netv2 (configs/demo_digits_v2.json: two-way
plan, LoRA stitching layers, ROS sampling), and step 4 writes both results files (demo_v2/v1/ and v2/) and one
table and plot with both fronts and their combined front (demo_v2/pareto_flops.{md,json,png}).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from snnet.results.baselines import against_mixing, file_baselines
from snnet.results.pareto import infer_anchors, is_anchor, pareto_report, save_report
from snnet.results.predictions import load_for, predictions_path, write_predictions
from snnet.results.quality import in_anchor_range
from snnet.results.records import (
    RESULTS_FILE,
    file_sha256,
    read_class_names,
    read_results,
    write_class_names,
    write_results,
)
from snnet.results.report import write_report
from snnet.train.device import ONEDNN_ENV
from snnet.utils.checkpoint import VERSION as CHECKPOINT_VERSION
from snnet.utils.checkpoint import CheckpointError, load_checkpoint
from snnet.utils.fileio import atomic_path, shown_path, write_text_atomic
from snnet.utils.options import add_options, option

WEIGHTS_FILE = "snnet.pth.tar"  # the demo's trained SN-Net beside its results (save_weights)

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "demo_digits.json"
WORK = ROOT / "output" / "demo"  # scratch: data, checkpoints, logs and the fresh results (gitignored)
#: the committed results, changed only by tools/publish_demo.py (make demo-results)
PUBLISHED = {"demo": ROOT / "results" / "demo", "demo_v2": ROOT / "results" / "demo_v2"}
TITLE = "SN-Net on digits: 3 ViT anchors w16, w32, w64 (widths 16/32/64)"
# --v2: the same two anchors (w16, w64) stitched by SN-Net (sliding windows) and by SN-Netv2 (two-way, LoRA, ROS)
V2_CONFIGS = {"v1": ROOT / "configs" / "demo_digits_v1_pair.json", "v2": ROOT / "configs" / "demo_digits_v2.json"}
V2_TITLE = "SN-Net (v1) vs. SN-Netv2 (v2) on digits: anchors w16 and w64"
ANCHOR_EPOCHS = 30
SNNET_EPOCHS = 60  # the budget per route: with 30 the front is above random mixing on fewer budgets (docs/demo.md)
ANCHOR_FLAGS = ["--lr", "2e-3", "--warmup-epochs", "2"]
#: how the demo runs train.py (not what it trains): no loader workers, validation (a panel of stitches) every 5th
#: epoch and the last (the demo reads only the final evaluation). The SN-Net's recipe is its stitch config's
#: "recipe" (configs/demo_digits*.json): one LR for anchors and stitching layers, as SN-Net trains DeiTs; with the
#: anchors at a tenth of it only the stitching layers adapt, and stitches between the two small anchors fall 5-15
#: points below both (docs/demo.md, the recipe study)
RUN = ["-j", "0", "--seed", "0", "--log-interval", "10", "--val-interval", "5"]
#: the anchors' recipe beside ANCHOR_FLAGS (the values of the SN-Net's, for plain models), then RUN
COMMON = ["--img-size", "16", "-b", "32", "--opt", "adamw", "--weight-decay", "0.05", "--scale", "0.7", "1",
          "--hflip", "0", "--smoothing", "0.1", *RUN]
EVAL_FLAGS = ["--img-size", "16", "-b", "32", "-j", "0"]  # evaluate_weights: COMMON's evaluation settings
SEED = 0  # COMMON's seed of the anchors and the SN-Net (--seed; the data split is always the same)
THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # see _child_env
#: what the demo sets for its own process and every process it starts (main: before any kernel runs; torch and MKL
#: choose their kernels at first use): one thread per process, and kernels that do not depend on the CPU beyond AVX2:
#: ATen's AVX2 build, MKL's SSE2 code branch (the one MKL runs alike on Intel and AMD CPUs; its AVX2 branch is
#: Intel-only, elsewhere MKL dispatches by vendor), and no oneDNN (ONEDNN_ENV: its kernels block by the CPU's cache
#: sizes, so even pinned to AVX2 they sum in another order on an Intel CPU than on an AMD one). Any other order of
#: the sums moves the last bits, and a few hundred training steps amplify them into other top-1 on 360 images.
PINNED_ENV = {**THREADS_ENV, "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", ONEDNN_ENV: "0"}
RELAY_SECONDS = 5.0  # the console gets the running step's newest progress line this often (run)
RANGE_MARGIN = 3.0  # summary(): stitches within the anchors' top-1 range +- this many points


def common(seed: int = SEED, flags: list[str] = COMMON) -> list[str]:
    """`flags` (COMMON or RUN) with this training seed."""
    i = flags.index("--seed")
    return [*flags[:i], "--seed", str(seed), *flags[i + 2:]]


def write_digits(root: Path, seed: int = 0) -> Path:
    """scikit-learn's digits as PNG files (16x16, nearest upsampling), stratified train/val split."""
    from sklearn.datasets import load_digits  # scikit-learn loads scipy (~1 s): only this step needs it
    from sklearn.model_selection import train_test_split

    data = root / "digits"
    if (data / "val").is_dir():
        return data
    digits = load_digits()
    idx = np.arange(len(digits.images))
    train, val = train_test_split(idx, test_size=0.2, random_state=seed, stratify=digits.target)
    tmp = root / "digits.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = tmp / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            Image.fromarray(img).resize((16, 16), Image.NEAREST).convert("RGB").save(folder / f"{i:04d}.png")
    tmp.rename(data)
    return data


def demo_anchors(*configs: Path) -> list[tuple[str, str, dict]]:
    """(run folder, timm name, model kwargs) of each anchor, read from configs/demo_digits.json (or the given demo
    configs, each anchor once): the config names the checkpoint <work>/<run folder>/last.pth.tar that step 2 trains."""
    anchors: dict[str, tuple[str, dict]] = {}
    for config in configs or (CONFIG,):
        for a in json.loads(Path(config).read_text())["anchors"]:
            anchors.setdefault(Path(a["checkpoint"]).parent.name, (a["name"], a["model_kwargs"]))
    return [(name, model, kwargs) for name, (model, kwargs) in anchors.items()]


def stitch_config_for(work: Path, config: Path = CONFIG) -> Path:
    """A demo config (configs/demo_digits.json unless given) names the anchors' checkpoints under the default work
    folder; another --work gets a copy of it (same file name) pointing at the anchors trained there."""
    if work.resolve() == WORK.resolve() or Path(config).resolve().parent == work.resolve():
        return config  # the default work folder, or a config written for this work folder (snnet quickstart)
    cfg = json.loads(Path(config).read_text())
    for anchor in cfg["anchors"]:
        anchor["checkpoint"] = str((work / Path(anchor["checkpoint"]).parent.name / "last.pth.tar").resolve())
    path = work / Path(config).name
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _child_env() -> dict[str, str]:
    """The environment of every training process (the demo's and snnet quickstart's): one OpenMP/MKL thread each.
    A CPU reduction split over threads sums in another order, so top-1 would depend on the machine's core count.
    The demo's own main adds PINNED_ENV's instruction-set pins to os.environ, and so to this."""
    return {**os.environ, **THREADS_ENV, "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str | Path], log: Path, step: str, env: dict[str, str] | None = None) -> float:
    """Run one step, its whole output to `log`. Every RELAY_SECONDS the console gets the step's latest progress line
    (epoch, loss, ETA), or, while it prints none (starting, the preflight check), how long it has been running: a
    newcomer sees it move at least every 10 s; the step's last progress line is always shown. Exits with the log's
    tail on failure. `env`: added to _child_env's."""
    print(f"[{step}] $ {' '.join(str(c) for c in cmd)}", flush=True)
    print(f"[{step}]   (full log: {log})", flush=True)
    t0 = time.perf_counter()
    latest = [""]  # the newest progress line not yet echoed (written by the reader below, taken by the heartbeat)
    stop = threading.Event()

    def heartbeat() -> None:
        quiet = 0
        while not stop.wait(RELAY_SECONDS):
            line, latest[0] = latest[0], ""
            quiet = 0 if line else quiet + 1
            if line:
                print(f"[{step}] {line}", flush=True)
            elif quiet % 2 == 0:  # nothing new for 10 s
                print(f"[{step}] running for {time.perf_counter() - t0:.0f}s (see {log})", flush=True)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        with open(log, "w", buffering=1) as f:  # line-buffered: the log can be followed while the step runs
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env={**_child_env(), **(env or {})},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                f.write(line)
                if "ETA" in line:
                    latest[0] = line.rstrip()
            code = proc.wait()
    finally:
        stop.set()
        beat.join()
    if latest[0]:  # the step's last progress line, when it ended before the heartbeat echoed it (a fast machine)
        print(f"[{step}] {latest[0]}", flush=True)
    if code in (-signal.SIGINT, 128 + signal.SIGINT):  # Ctrl-C reached the step too: not its failure
        raise KeyboardInterrupt
    if code != 0:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"step {step} failed (exit {code}; full log: {log}):\n" + "\n".join(tail))
    took = time.perf_counter() - t0
    print(f"[{step}] done in {took:.0f}s", flush=True)
    return took


def _kwarg(value) -> str:
    """A model_kwargs value as --model-kwargs reads it back (a list without spaces: [16,32,64])."""
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple, dict)) else str(value)


def anchor_command(work: Path, data: Path, name: str, model: str, kwargs: dict, epochs: int, seed: int = SEED,
                   flags: list[str] | None = None, common_flags: list[str] | None = None) -> list[str]:
    """train.py's arguments for one anchor (a plain model of the config's timm name and model_kwargs). The recipe:
    `flags` (default ANCHOR_FLAGS) and `common_flags` (default COMMON with this seed)."""
    return ["train.py", str(data), "--model", model, "--model-kwargs", *[f"{k}={_kwarg(v)}" for k, v in kwargs.items()],
            "--epochs", str(epochs), *(ANCHOR_FLAGS if flags is None else flags), "--output", str(work),
            "--experiment", name, *(common(seed) if common_flags is None else common_flags)]


STAMP = "demo_command.json"  # beside a finished step's output: its command and its outputs' SHA-256 (`finished`)
STARTED = "demo_started.json"  # written when a step starts: the command an interrupted run continues only under


OUTPUTS = ("last.pth.tar", RESULTS_FILE)  # a step's outputs whose SHA-256 its stamp keeps


def _output_digests(run_dir: Path) -> dict[str, str]:
    return {name: file_sha256(run_dir / name) for name in OUTPUTS if (run_dir / name).is_file()}


def finished(run_dir: Path, cmd: list[str], output: str = "last.pth.tar") -> bool:
    """Whether the same command already finished this step here: `output` is there, the stamp names this command,
    and the step's outputs are the bytes it left (a checkpoint truncated or replaced since, by a partial copy of
    the folder, is trained again, not reused)."""
    stamp = run_dir / STAMP
    if not ((run_dir / output).exists() and stamp.exists()):
        return False
    record = json.loads(stamp.read_text())
    return isinstance(record, dict) and record.get("command") == cmd and \
        record.get("sha256") == _output_digests(run_dir)


def run_step(cmd: list[str], run_dir: Path, log: Path, step: str, resume: bool, stamp: list[str],
             env: dict[str, str] | None = None) -> None:
    """One training step into `run_dir`: afresh, or with `resume` continuing an interrupted run of the same command
    there (train.py --auto-resume: from its last checkpoint, inside the epoch where it stopped); `stamp` (the command
    `finished` compares) is written when the step starts and again beside its output when it ends. A run of another
    command (other epochs: its schedule differs; another recipe) is never continued: it is trained afresh."""
    started = run_dir / STARTED
    again = resume and (run_dir / "last.pth.tar").exists()
    if again and not (started.exists() and json.loads(started.read_text()) == stamp):
        print(f"[{step}] {run_dir} holds a run of another command: training afresh", flush=True)
        again = False
    if again:
        try:  # a checkpoint truncated by a partial copy of the folder cannot be continued
            load_checkpoint(run_dir / "last.pth.tar", lazy=True)
        except CheckpointError:
            print(f"[{step}] {run_dir / 'last.pth.tar'} cannot be read as a checkpoint: training afresh", flush=True)
            again = False
    if again:
        print(f"[{step}] continuing the interrupted run in {run_dir} (--auto-resume)", flush=True)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        write_text_atomic(started, json.dumps(stamp))
    run([*cmd, *(["--auto-resume"] if again else [])], log, step, env)
    write_text_atomic(run_dir / STAMP, json.dumps({"command": stamp, "sha256": _output_digests(run_dir)}))


def train_anchor(work: Path, data: Path, name: str, model: str, kwargs: dict, epochs: int, fresh: bool,
                 seed: int = SEED, flags: list[str] | None = None, common_flags: list[str] | None = None,
                 resume: bool = False, tag: list[str] | None = None) -> None:
    """Train one anchor unless the same command already trained it here (its command is kept beside the checkpoint:
    a checkpoint of another recipe or epoch count is retrained, not silently reused). `flags`: the recipe
    (anchor_command); `resume`: an interrupted run of the same anchor continues (run_step); `tag`: what else must be
    the same for a reuse (the demo: its code, `code_sha256`)."""
    cmd = anchor_command(work, data, name, model, kwargs, epochs, seed, flags, common_flags)
    stamp = [*cmd, *(tag or [])]
    if not fresh and finished(work / name, stamp):
        print(f"[{name}] reusing {work / name / 'last.pth.tar'} (trained by the same command)", flush=True)
        return
    run_step([sys.executable, *cmd], work / name, work / f"{name}.log", name, resume and not fresh, stamp)


def code_sha256() -> str:
    """One SHA-256 of the code a training step runs (train.py, the launcher, the snnet and stitching_* packages): an
    anchor the demo trained before a change to it may have other weights than the same command trains now."""
    files = [ROOT / "train.py", ROOT / "distributed_train.sh", *ROOT.glob("snnet/**/*.py"),
             *ROOT.glob("stitching_*/**/*.py")]
    digest = hashlib.sha256()
    for path in sorted(f for f in files if f.is_file()):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def train_snnet(work: Path, data: Path, config: Path, name: str, epochs: int, extra: list[str], seed: int = SEED,
                flags: list[str] | None = None, common_flags: list[str] | None = None, nproc: int = 2,
                resume: bool = False, preflight: bool = True) -> Path:
    """Train (and evaluate every stitch of) one SN-Net on `nproc` processes, as a user would (distributed_train.sh;
    one process: train.py itself, which a launch of one process runs the same, without the launcher's interpreter).
    The recipe: the config's, `flags`, `extra`, `common_flags` (default RUN with this seed); `resume`: a
    run of the same command that finished is kept, an interrupted one continues (run_step); `preflight` False: the
    launcher's checks are skipped (SNNET_NO_PREFLIGHT=1; train.py checks the same again), for a config and anchors
    the caller just wrote and trained (snnet quickstart: one interpreter's torch and timm import less, ~5 s of CPU)."""
    run_dir = work / name
    config = stitch_config_for(work, config)
    launch = ["./distributed_train.sh", str(nproc)] if nproc > 1 else ["train.py"]
    cmd = [*launch, str(data), "--stitch_config", str(config),
           "--epochs", str(epochs), *(flags or []), *extra, "--output", str(work),
           "--experiment", name, *(common(seed, RUN) if common_flags is None else common_flags)]
    stamp = [*cmd, f"inputs sha256 {inputs_sha256(config)}"]  # the same command on other anchors: another run
    if resume and finished(run_dir, stamp, RESULTS_FILE):
        print(f"[{name}] reusing {run_dir} (trained and evaluated by the same command)", flush=True)
        return run_dir
    run_step(cmd if nproc > 1 else [sys.executable, *cmd], run_dir, work / f"{name}.log", name, resume, stamp,
             None if preflight else {"SNNET_NO_PREFLIGHT": "1"})
    return run_dir


def inputs_sha256(config: Path) -> str:
    """One SHA-256 of a stitch config's text and its anchors' checkpoints: what an SN-Net run starts from beside its
    command. The command names the config's path only, so a config rewritten at that path (other widths or stitch
    stages) or an anchor retrained into the same checkpoint file was taken for the run already done."""
    digest = hashlib.sha256(config.read_bytes())
    for anchor in json.loads(config.read_text()).get("anchors", []):
        checkpoint = anchor.get("checkpoint") if isinstance(anchor, dict) else None
        if checkpoint and Path(checkpoint).is_file():
            digest.update(file_sha256(checkpoint).encode())
    return digest.hexdigest()


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """`python -m snnet.demo`'s options (its parser is derived from them)."""
    work: str = option(str(WORK), "--work", help="scratch folder (data, checkpoints, logs; default output/demo)")
    results: str | None = option(None, "--results",
                                 help="where the results file, table, plot and report go (default: WORK/results/demo, "
                                      "with --v2 WORK/results/demo_v2; the committed results/demo* change only "
                                      "through tools/publish_demo.py)")
    anchor_epochs: int = option(ANCHOR_EPOCHS, "--anchor-epochs", parse=int, help="")
    snnet_epochs: int = option(SNNET_EPOCHS, "--snnet-epochs", parse=int, help="")
    fresh: bool = option(False, "--fresh", help="retrain the anchors even if the same command trained them")
    v2: bool = option(False, "--v2", help="SN-Net vs. SN-Netv2 on anchors w16 and w64 (two-way plan, LoRA stitching "
                                          "layers, ROS sampling): both fronts in one plot, in WORK/results/demo_v2")
    seed: int = option(SEED, "--seed", parse=int,
                       help="training seed of the anchors and the SN-Net (the committed results: %(default)s; recipe "
                            "studies run several)")
    snnet_flags: str = option("", "--snnet-flags",
                              help="extra train.py flags for the SN-Net runs, one string (recipe studies, "
                                   "docs/demo.md); the committed results use none")
    check: bool = option(False, "--check",
                         help="train nothing: compare the last run's top-1 per cfg_id (WORK/results/demo, demo_v2: "
                              "those present) with the committed results; exit 1 on any difference (make demo-check)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, [DemoOptions])
    args = DemoOptions(**vars(p.parse_args(argv)))  # typed from here on
    work = Path(args.work)
    if args.check:
        bad = []
        for name in fresh_results(work):
            fresh, committed = work / "results" / name, PUBLISHED[name]
            diff = compare(fresh, committed)
            print(f"{name}: " + ("identical top-1 per cfg_id to the committed results" if not diff else
                                 f"{len(diff)} difference(s) from {committed}:\n  " + "\n  ".join(diff)))
            bad += diff
        return 1 if bad else 0

    os.environ.update(PINNED_ENV)  # this process and, through _child_env, every step it starts

    results = Path(args.results or work / "results" / ("demo_v2" if args.v2 else "demo"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = write_digits(work)
    print(f"data: {data} (scikit-learn digits, ImageFolder)", flush=True)
    anchors = demo_anchors(*V2_CONFIGS.values()) if args.v2 else demo_anchors()
    code = [f"code sha256 {code_sha256()}"]  # anchors trained by other code are retrained, not reused

    # two at a time (one thread each, like the SN-Net's two processes), the largest first: on two cores the wall
    # time is about the largest anchor's, not the sum
    def train(anchor: tuple[str, str, dict]) -> None:
        name, model, kwargs = anchor
        train_anchor(work, data, name, model, kwargs, args.anchor_epochs, args.fresh, args.seed, tag=code)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(train, anchors[::-1]))
    extra = shlex.split(args.snnet_flags)

    if args.v2:
        sources = []
        for label, config in V2_CONFIGS.items():  # same anchors, epochs, learning rates, flags: only the config differs
            run_dir = train_snnet(work, data, config, f"snnet_{label}", args.snnet_epochs, extra, args.seed)
            sources.append(results / label / RESULTS_FILE)
            copy_results(run_dir, sources[-1])
        files = report(results, sources, V2_TITLE)
    else:
        run_dir = train_snnet(work, data, CONFIG, "snnet", args.snnet_epochs, extra, args.seed)
        sources = [results / RESULTS_FILE]
        save_weights(run_dir / "last.pth.tar", results / WEIGHTS_FILE)
        copy_results(evaluate_weights(work, data, results / WEIGHTS_FILE), sources[0])
        files = [results / WEIGHTS_FILE, *report(results)]
    for line in summary(sources):
        print(line)
    print(f"demo{' --v2' if args.v2 else ''} finished in {time.perf_counter() - t0:.0f}s: "
          f"{', '.join(str(f) for f in [*sources, *files])}")
    if results.resolve() != PUBLISHED["demo_v2" if args.v2 else "demo"].resolve():
        print("the committed results are unchanged; make demo-results copies these there (make demo-check "
              "compares them)")
    return 0


def summary(sources: list[Path]) -> list[str]:
    """What the picture should show, in numbers: the share of stitches whose top-1 lies within the anchors' top-1
    range (exactly, and +-3 points), and on what share of budgets the stitched front beats random mixing of the
    anchors."""
    lines = []
    for path in sources:
        records = read_results(path)
        n = infer_anchors(records)
        anchors = [r["cfg_id"] for r in records if is_anchor(r, n)]
        inside, stitches = in_anchor_range(records, anchors, RANGE_MARGIN)
        exact, _ = in_anchor_range(records, anchors, 0.0)
        above, ahead, span = against_mixing(file_baselines(path, records, anchors))
        lines.append(f"{shown_path(path)}: anchors " + ", ".join(
            f"{r['route']} {r['acc1']:.2f}" for r in records if r["cfg_id"] in anchors) +
            f"; {exact} of {stitches} stitches within the anchors' top-1 range ({inside} within it "
            f"+-{RANGE_MARGIN:g} points); front above "
            f"random mixing on {ahead} of budgets; {above} stitches above the line{span}")
    return lines


def fresh_results(work: Path) -> list[str]:
    """The names of PUBLISHED whose fresh results a run left under WORK/results (demo, demo_v2: those present);
    exits when there are none."""
    done = [name for name in PUBLISHED if any((work / "results" / name).rglob(RESULTS_FILE))]  # v2: v1/, v2/
    if not done:
        sys.exit(f"no demo results under {work / 'results'}; run make demo (and make demo-v2) first")
    return done


def compare(fresh: Path, committed: Path) -> list[str]:
    """Differences between two demo results folders: per results file (demo: one, demo_v2: v1/ and v2/), every
    cfg_id's route, FLOPs and top-1/top-5 (exact: the demo is deterministic on every CPU it pins, PINNED_ENV)."""
    out = []
    for f in sorted(committed.rglob(RESULTS_FILE)):
        g = fresh / f.relative_to(committed)
        if not g.exists():
            out.append(f"{g}: missing")
            continue
        keys = ("route", "flops", "acc1", "acc5")
        old = {r["cfg_id"]: tuple(r.get(k) for k in keys) for r in read_results(f)}
        new = {r["cfg_id"]: tuple(r.get(k) for k in keys) for r in read_results(g)}
        for cfg_id in sorted(set(old) | set(new)):
            if old.get(cfg_id) != new.get(cfg_id):
                out.append(f"{f.relative_to(committed.parent)} cfg {cfg_id}: committed {old.get(cfg_id)}, fresh "
                           f"{new.get(cfg_id)}")
    return out


def save_weights(checkpoint: Path, dest: Path) -> None:
    """The trained SN-Net of a training checkpoint without what only training needs (optimizer state, counters):
    its weights, the run's identity and, of its arguments, only what rebuilding it, its evaluation preprocessing and
    its answers read (classes and their names, image size, model kwargs, the data-config flags; no paths of this
    machine). The project's checkpoint format (tensors and JSON text, read with torch.load(weights_only=True)):
    `snnet export`, `snnet.load` and `snnet latency` take it as they take last.pth.tar. A safetensors file would hold
    the weights alone: the readers would then build the anchors at timm's default 224 px and record that in an
    export's data config."""
    state = load_checkpoint(checkpoint)
    args = json.loads(state["args"])
    keep = ("num_classes", "class_names", "img_size", "in_chans", "model_kwargs", "input_size", "crop_pct",
            "crop_mode", "mean", "std", "interpolation")
    slim = {"epoch": state["epoch"], "arch": state.get("arch", ""), "state_dict": state["state_dict"],
            "args": json.dumps({k: args[k] for k in keep if k in args}), "config": state["config"],
            "version": CHECKPOINT_VERSION}
    # torch.save names the archive inside the file after the file it writes to (atomic_path's temporary name);
    # written to memory first it is always "archive", so the same weights give the same bytes (no git noise)
    buf = io.BytesIO()
    torch.save(slim, buf)
    with atomic_path(dest) as tmp:
        Path(tmp).write_bytes(buf.getvalue())


def evaluate_weights(work: Path, data: Path, weights: Path, config: Path = CONFIG, flags: list[str] | None = None
                     ) -> Path:
    """Every stitch of the saved SN-Net evaluated from that file (train.py --eval --resume, one process), so the
    results' checkpoint_sha256 names the file committed beside them and `snnet latency --results` / `snnet serve
    --results` accept the pair. Same weights as the training run's own final evaluation: the same top-1 and top-5
    for every cfg_id (the loss differs in the last digits: one process sums in another order than two). `config`
    and `flags` (default EVAL_FLAGS): the stitch config and evaluation settings of another run (snnet quickstart)."""
    shutil.rmtree(work / "snnet_eval", ignore_errors=True)
    run([sys.executable, "train.py", data, "--stitch_config", config, "--eval", "--resume", weights,
         *(EVAL_FLAGS if flags is None else flags), "--output", work, "--experiment", "snnet_eval"],
        work / "snnet_eval.log", "snnet_eval")
    return work / "snnet_eval"


def copy_results(run_dir: Path, dest: Path) -> None:
    """A run's stitches_res.txt and the per-image predictions beside it (stitches_pred.npz, which
    `snnet pareto --baselines` reads), checked against each other, and its class names
    (stitches_res.classes.json), to `dest` and beside it."""
    records = read_results(run_dir)
    pred = load_for(run_dir / RESULTS_FILE, records)
    write_results(dest, records)
    write_predictions(predictions_path(dest), pred)
    write_class_names(dest, read_class_names(run_dir / RESULTS_FILE))


def report(results: Path, sources: list[Path] | None = None, title: str = TITLE, img_size: int | None = None
           ) -> list[Path]:
    """Step 4's table, plot and HTML report, made as `snnet pareto RESULTS... --out DIR` and `snnet report RESULTS...
    --out DIR/report.html` make them, with --baselines (the same functions): the committed
    results/demo/pareto_flops.{md,json,png} and report.html are regenerated from results/demo/stitches_res.txt (and
    the stitches_pred.npz beside it) by this (`python -c "from pathlib import Path;
    from snnet.demo import report; report(Path('results/demo'))"` from the repository root), and results/demo_v2's
    (both fronts and the combined one) from its v1/ and v2/ results files.

    The plot's subtitle names `img_size`, by default the size the demo trains and evaluates at (COMMON's
    --img-size), for records that carry none; records that carry one keep theirs."""
    img_size = img_size or int(COMMON[COMMON.index("--img-size") + 1])
    # the report names the files it read as the results do (relative to the repository root for `make demo`)
    paths = [shown_path(s) for s in sources or [results / RESULTS_FILE]]
    rep = pareto_report(paths, "flops", baselines=True)
    print(rep.text, end="")
    page, _ = write_report(paths, results / "report.html", "flops", title=title, img_size=img_size, baselines=True)
    return [*save_report(rep, results, title, img_size), page]


if __name__ == "__main__":
    sys.exit(main())
