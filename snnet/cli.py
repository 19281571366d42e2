"""snnet: from stitches_res.txt to a deployed network.

    snnet quickstart DATA --out DIR [--anchors NAME...] [--img-size S] [--anchor-epochs N] [--snnet-epochs N]
    snnet pareto RESULTS... [--out DIR] [--by flops|params|latency] [--anchors N] [--baselines]
    snnet report RESULTS... --out report.html [--by flops|params|latency] [--anchors N] [--title T] [--baselines]
    snnet select RESULTS --max-flops 5G | --max-params 20M | --max-latency-ms 3 | --min-acc 78
    snnet export CKPT --cfg-id N --out DIR [--stitch_config CFG] [--img-size S]
    snnet latency CKPT [--stitch_config CFG] [--batch 1 --batch 32] [--warmup 5 --repeats 20] [--results FILE]
    snnet convert SNNET_PTH OUT --trust
    snnet similarity --anchors A B | --stitch_config CFG --data DIR --out DIR [--batches N] [--img-size S]
    snnet search --anchors A B C | --stitch_config CFG --data DIR --out DIR [--score cka|ls|kl] [--threshold 0.9]
    snnet stitch-train --sweep SWEEP.yaml [--out DIR] | DATA --front A --end B --cut I [--gap G] --out DIR
    snnet shards FOLDER OUT --shard-size N
    snnet serve CKPT --results stitches_res.txt [--stitch_config CFG] [--host 127.0.0.1 --port 8000]

A bad input (a foreign or empty results file, a budget no stitch meets, a cfg_id the checkpoint lacks, a missing
file, an unparseable number) ends with one line on stderr naming the value and the fix, exit code 2, and no
output file.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from snnet.data.options import CLASS_FOLDERS, DATA_ROOT
from snnet.results.pareto import cost_key, human, infer_anchors, latency_keys, pareto_report, route_of, save_report
from snnet.results.records import RESULTS_FILE, check_checkpoint_sha, file_sha256, read_results
from snnet.results.report import write_report
from snnet.results.select import select
from snnet.stitching.config import load_stitch_config
from snnet.utils.distributed import say_refusal, usable_cores, world
from snnet.utils.errors import OneLineParser, SNNetError, UsageError, one_line
from snnet.utils.fileio import check_out_dir, checkpoint_path, data_folder, export_out, release_paths
from snnet.utils.options import add_options, option, shared

if TYPE_CHECKING:  # hints only: the modules import torch or timm (see below)
    from snnet.data.options import DataOptions, LoaderOptions
    from snnet.explore.similarity import SimilarityOptions
    from snnet.explore.stitch_train.jobs import SweepSummary
    from snnet.explore.stitch_train.sweep import Sweep

# The modules that import torch or timm (deploy, serve, data, train.device, explore: torch alone is ~1,100 modules,
# timm ~800 more) are imported by the command that runs them, so that `snnet --help`, `pareto`, `select` and `report`
# start in a fraction of a second (tests/test_results.py checks that torch stays out).

_Parser = OneLineParser  # one line, no usage block


_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*([kmgt]?)\s*$", re.IGNORECASE)
_SCALE = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def parse_amount(text: str, flag: str = "the budget", suffixes: bool = True) -> float:
    """'5G' -> 5e9, '20M' -> 2e7, '3.5k' -> 3500, '4.5e9' -> 4.5e9 (K/M/G/T, any case); refuses anything else."""
    m = _AMOUNT.match(str(text))
    if m is None or (m.group(3) and not suffixes):
        if _AMOUNT.match(str(text).strip().removeprefix("-")):
            raise UsageError(f"{text!r} is negative; write e.g. {flag} {'5G' if suffixes else '3'} (0 or more)")
        if suffixes:
            raise UsageError(f"{text!r} is not a number with an optional K/M/G/T suffix; write e.g. {flag} 5G "
                             f"(or 750K, 20M, 4.5e9)")
        raise UsageError(f"{text!r} is not a plain number; write e.g. {flag} 3 or {flag} 0.5")
    value = float(f"{m.group(1)}e{m.group(2) or 0}") * _SCALE[m.group(3).lower()]  # 1e400 -> inf, refused below
    if not math.isfinite(value):
        raise UsageError(f"{text!r} is not a finite number; write e.g. {flag} 5G")
    return value


def _amount(flag: str, suffixes: bool = True):
    def parse(text: str) -> float:
        try:
            return parse_amount(text, flag, suffixes)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def _percent(text: str) -> float:
    try:
        value = parse_amount(str(text).rstrip("%"), "--min-acc", suffixes=False)
    except UsageError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a top-1 in percent; write e.g. --min-acc 78") from None
    if value > 100:
        raise argparse.ArgumentTypeError(f"{text!r} is above 100; top-1 is in percent, e.g. --min-acc 78")
    if 0 < value < 1 and not str(text).endswith("%"):  # 0.78 for 78 % would choose nearly any stitch
        raise argparse.ArgumentTypeError(f"{text!r} reads as a fraction; top-1 is in percent: --min-acc "
                                         f"{value * 100:g} (or {text}% if you mean under 1 %)")
    return value


def _magnitude(v: float) -> str:
    """A small difference as its power of ten ('< 1e-05'), so the line reads the same on CPUs whose float kernels
    differ in the last bits (2.3e-06 on one, 1.7e-06 on another); larger ones as they are."""
    if v == 0 or v >= 1e-3:
        return f"{v:.2g}"
    return f"< {10.0 ** math.ceil(math.log10(v)):.0e}"


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer; write e.g. 32")
    return int(text)


def _port(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give one in 1-65535, e.g. 8000")
    return int(text)


def _count(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 0; write e.g. 5")
    return int(text)


def _cfg_id(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text):
        raise argparse.ArgumentTypeError(f"cfg_id {text!r} is not an integer >= 0; write e.g. --cfg-id 5 (see snnet "
                                         f"pareto / snnet select)")
    return int(text)


# ---------------------------------------------------------------------------------------------------- pareto
def cmd_pareto(args: ParetoCommand) -> int:
    if args.out:
        check_out_dir(args.out)
    report = pareto_report(args.results, cost_key(args.by, args.latency_batch), args.anchors, args.before,
                           args.baselines)
    files = save_report(report, args.out, args.title) if args.out else []  # written before anything is printed
    for note in report.notes:
        print(note, file=sys.stderr)
    print(report.text, end="")
    if files:
        print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


# ---------------------------------------------------------------------------------------------------- report
def cmd_report(args: ReportCommand) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out!r} is a folder; pass the HTML file to write, e.g. --out "
                         f"{str(out / 'report.html')!r}")
    if out.suffix.lower() not in (".html", ".htm"):  # a browser opens a page by its name: r.png would show nothing
        raise UsageError(f"--out {args.out!r} is not an .html file: the report is one HTML page; pass e.g. --out "
                         f"{str(out.with_suffix('.html'))!r} (the plot as a PNG: snnet pareto --out DIR)")
    check_out_dir(out.parent, "--out")  # its folder: made if missing, refused if it is a file or not writable
    if out.is_file():  # a page written before is replaced; anything else (a results file, notes) is kept
        with open(out, "rb") as f:
            head = f.read(512).lstrip().lower()
        if not head.startswith((b"<!doctype html", b"<html")):
            raise UsageError(f"--out {args.out!r} exists and is no HTML page (a results file?): the report would "
                             f"replace it; pass another --out, e.g. {str(out.with_name('report.html'))!r}")
    path, notes = write_report(args.results, out, cost_key(args.by, args.latency_batch), args.anchors, args.title,
                               baselines=args.baselines)
    for note in notes:
        print(note, file=sys.stderr)
    print(f"wrote {path} (open it in a browser; it fetches nothing)")
    return 0


# ---------------------------------------------------------------------------------------------------- select
def cmd_select(args: SelectCommand) -> int:
    records = read_results(args.results)
    lat = f"latency_ms_b{args.latency_batch}"
    limits, flags = {}, {"flops": "--max-flops", "params": "--max-params", lat: "--max-latency-ms",
                         "acc1": "--min-acc"}
    for key, value in (("flops", args.max_flops), ("params", args.max_params), (lat, args.max_latency_ms)):
        if value is not None:
            limits[key] = value
    if not limits and args.min_acc is None:
        raise UsageError("give a budget: --max-flops 5G, --max-params 20M, --max-latency-ms 3 or --min-acc 78")
    rec, n_fit = select(records, limits, args.min_acc, args.results, flags)
    if args.json:
        print(json.dumps(rec))
        return 0
    what = "cheapest by FLOPs reaching top-1 " + f"{args.min_acc:g}" if args.min_acc is not None else "best top-1"
    budget = " and ".join(f"{k} <= {human(v)}" for k, v in limits.items())
    print(f"cfg_id {rec['cfg_id']}: {what}{' with ' + budget if budget else ''} "
          f"({n_fit} of {len(records)} stitches qualify)")
    print(f"  route   {route_of(rec, infer_anchors(records))}")
    for key, name in (("flops", "FLOPs"), ("params", "params")):
        if rec.get(key) is not None:
            print(f"  {name:<7} {human(rec[key])} ({rec[key]:,})")
    acc5 = f"   top-5 {rec['acc5']:.2f}" if rec.get("acc5") is not None else ""
    print(f"  top-1   {rec['acc1']:.2f}{acc5}")
    for key in latency_keys([rec]):
        batch = key[len("latency_ms_b"):]
        print(f"  latency {rec[key]:.3f} ms at batch {batch} ({rec.get('latency_device', 'device not recorded')})")
    return 0


# ---------------------------------------------------------------------------------------------------- export
def _load(args: TrainedNetwork):
    from snnet.deploy.export import load_snnet
    return load_snnet(args.checkpoint, args.stitch_config, args.img_size, args.num_classes)


def _inputs_first(checkpoint: str | None = None, stitch_config: str | None = None, results: str | None = None) -> None:
    """The files a command reads, checked before it imports torch and timm (seconds here): a mistyped path is
    refused at once. Loading them checks them again, with the same messages."""
    if checkpoint:
        checkpoint_path(checkpoint, "checkpoint")
    if stitch_config:
        load_stitch_config(stitch_config)
    if results:
        read_results(results)


@contextlib.contextmanager
def _held_output():
    """Hold what is written on stdout and stderr (fds 1 and 2, native code included) and pass it on afterwards,
    unless the block fails.

    torch's TorchScript ONNX exporter prints its whole IR graph from C++ before it raises on an op the opset cannot
    express (its `setup_onnx_logging` enables that log whatever `verbose` says); the error is then only the one line
    `main` prints.
    """
    streams = ((1, sys.stdout), (2, sys.stderr))
    held = []
    try:
        for fd, stream in streams:
            stream.flush()
            saved = os.dup(fd)
            held.append((fd, stream, saved, tempfile.TemporaryFile()))
            os.dup2(held[-1][3].fileno(), fd)
    except (OSError, ValueError):  # a closed or odd stream: hold nothing
        for fd, _, saved, tmp in held:
            os.dup2(saved, fd)
            os.close(saved)
            tmp.close()
        held = []
    ok = False
    try:
        yield
        ok = True
    finally:
        for fd, stream, saved, tmp in held:
            stream.flush()
            os.dup2(saved, fd)
            os.close(saved)
            if ok:
                tmp.seek(0)
                stream.write(tmp.read().decode(errors="replace"))
                stream.flush()
            tmp.close()


def cmd_export(args: ExportCommand) -> int:
    check_out_dir(args.out)
    export_out(args.out)  # files of another program there: refused, not replaced
    _inputs_first(args.checkpoint, args.stitch_config)
    import torch

    from snnet.deploy.export import ONNX_OPSET, WEIGHTS, check_cfg_id, check_opset, export_stitch
    formats = [f for f, off in (("torchscript", args.no_torchscript), ("onnx", args.no_onnx)) if not off]
    if "onnx" in formats:  # refused before the checkpoint is read; with --no-onnx the opset is unused
        check_opset(args.opset)
    loaded = _load(args)
    check_cfg_id(loaded.net, args.cfg_id, args.checkpoint)
    try:
        with _held_output() if "onnx" in formats else contextlib.nullcontext():
            spec = export_stitch(loaded, args.cfg_id, args.out, formats, opset=args.opset)
    except torch.onnx.OnnxExporterError as e:  # an op this (supported) opset cannot express; nothing was written
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"ONNX export of cfg_id {args.cfg_id} at --opset {args.opset} failed ({first}); pass "
                         f"--opset {ONNX_OPSET} (the default) or --no-onnx") from None
    out = Path(args.out)
    h, w = spec["img_size"]
    print(f"exported cfg_id {spec['cfg_id']}: {spec['route']}")
    print(f"  params {spec['params']:,} (= SNNet.params({spec['cfg_id']})), {human(spec['flops'])} FLOPs at {h}x{w}, "
          f"{spec['num_classes']} classes")
    sizes = ", ".join(f"{name} ({(out / name).stat().st_size / 1024:.1f} KiB)"
                      for name in [*spec["files"].values(), "model.json"])
    print(f"  {out}/: {sizes}")
    diffs = ", ".join(f"{k} {'n/a (onnxruntime not installed)' if v is None else _magnitude(v)}"
                      for k, v in spec["max_abs_diff_vs_snnet"].items())
    print(f"  max |logits - SN-Net logits| on 3 random images: {diffs}")
    print(f"  load: from snnet.deploy.export import load_exported; net = load_exported({str(out)!r})  "
          f"# weights: {WEIGHTS}")
    return 0


# ---------------------------------------------------------------------------------------------------- latency
def _check_threads(threads: int | None) -> None:
    """--threads within the cores this process may use: more threads than cores take turns on them and slow every
    call (several times over), so a latency table or a server would measure and serve that."""
    cores = usable_cores()
    if threads and threads > cores:
        raise UsageError(f"--threads {threads} is more than the {cores} CPU core(s) this process may use; give "
                         f"--threads {cores} or fewer (threads beyond the cores take turns and slow every call)")


def cmd_latency(args: LatencyCommand) -> int:
    _check_threads(args.threads)
    _inputs_first(args.checkpoint, args.stitch_config)
    if args.results:  # another checkpoint's results: refused before torch loads (measuring checks them again)
        check_checkpoint_sha(read_results(args.results), file_sha256(args.checkpoint),
                             f"checkpoint {args.checkpoint!r}", f"results file {args.results!r}")
    import torch

    from snnet.deploy.export import check_cfg_id
    from snnet.deploy.latency import add_latency, device_name, measure_latency, results_cfg_ids
    from snnet.train.device import device_from_flag
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_from_flag(args.device)  # the one reading of --device
    loaded = _load(args)
    net = loaded.net
    # another SN-Net's, checkpoint's or image size's file: refused now, before measuring
    in_file = results_cfg_ids(net, args.results, args.checkpoint, loaded.img_size, loaded.in_chans) \
        if args.results else None
    if args.cfg_ids:
        ids = [check_cfg_id(net, c, args.checkpoint) for c in args.cfg_ids]
    else:
        ids = in_file if in_file is not None else list(range(net.num_configs))
    ids = list(dict.fromkeys(ids))  # --cfg-ids 3 3 measures 3 once
    batches = sorted(set(args.batch or [1, 32]))
    table = measure_latency(net, ids, batches, loaded.img_size, loaded.in_chans, args.warmup, args.repeats, device)
    dev = device_name(device)
    h, w = loaded.img_size
    print(f"latency on {dev}, {h}x{w} images, median of {args.repeats} after {args.warmup} warm-up calls")
    head = " | ".join(f"ms @ b{b}" for b in batches)
    print(f"| cfg_id | route | {head} | img/s @ b{batches[-1]} |")
    print("|---:|---|" + "---:|" * (len(batches) + 1))
    for c in ids:
        cells = " | ".join(f"{table[c][f'latency_ms_b{b}']:.3f}" for b in batches)
        ips = batches[-1] / table[c][f"latency_ms_b{batches[-1]}"] * 1e3
        print(f"| {c} | {net.describe(c)} | {cells} | {ips:,.0f} |")
    if args.results:
        n = add_latency(args.results, table, {"latency_device": dev, "latency_img_size": [h, w]})
        keys = ", ".join([f"latency_ms_b{b}" for b in batches] + ["latency_device", "latency_img_size"])
        print(f"updated {n} records of {args.results} ({keys})")
    return 0


# ---------------------------------------------------------------------------------------------------- serve
def cmd_serve(args: ServeCommand) -> int:
    from snnet.serve import check_port
    if (args.checkpoint is None) == (not args.exported):
        raise UsageError("pass the SN-Net checkpoint (snnet serve CKPT ...) or --exported DIR... (export folders), "
                         "not both")
    if args.engine == "local" and (args.replicas > 1 or args.address != "local"):
        flag = f"--replicas {args.replicas}" if args.replicas > 1 else f"--address {args.address}"
        raise UsageError(f"{flag} needs Ray Serve: add --engine ray (the local engine serves one process on this "
                         f"machine)")
    if args.engine == "local" or args.address == "local":
        _check_threads(args.threads)  # this machine's cores (a cluster's replicas run on its nodes')
        check_port(args.host, args.port)  # another program's port: refused before anything loads
    _inputs_first(args.checkpoint, args.stitch_config)
    # the results against what is served (export folders' stitches, the checkpoint's bytes): before torch loads
    from snnet.serve import exported_stitches
    records, source = read_results(args.results), f"results file {args.results!r}"
    if args.exported:
        exported_stitches(args.exported, records, source)
    elif args.checkpoint and any("checkpoint_sha256" in r for r in records):
        check_checkpoint_sha(records, file_sha256(args.checkpoint), f"checkpoint {args.checkpoint!r}", source)
    from snnet.serve.handler import ServeSpec, load_served
    spec = ServeSpec(checkpoint=args.checkpoint, stitch_config=args.stitch_config, results=args.results,
                     exported=list(args.exported or []), img_size=args.img_size, num_classes=args.num_classes,
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, shed=args.shed,
                     max_body_bytes=args.max_body_kb * 1024, device=args.device,
                     threads=args.threads)
    served = load_served(spec)  # refuses a bad checkpoint, config or results file here, before anything starts
    n, what = len(served.records), args.checkpoint or f"{len(spec.exported)} export folders"
    del served

    def ready() -> None:
        where = f"{args.replicas} Ray replica(s)" if args.engine == "ray" else "one local process"
        print(f"serving {n} stitches of {what} at http://{args.host}:{args.port}/ ({where}, batches up to "
              f"{args.max_batch}, {args.max_wait_ms:g} ms wait{', shedding late requests' if args.shed else ''}); "
              f"POST {{\"image\": base64, \"budget\": {{\"latency_ms\": 5}}}}; GET / lists the stitches; "
              f"Ctrl-C stops", flush=True)
    if args.engine == "local":
        from snnet.serve.local import serve_until_stopped as serve_local
        serve_local(spec, args.host, args.port, ready)
        return 0
    try:
        from snnet.serve.app import serve_until_stopped  # Ray: imported only by the command that runs it
    except ImportError as e:
        raise UsageError(f"--engine ray needs Ray Serve, which is not installed here ({e}); install it with "
                         f"pip install 'ray[serve]' (requirements-extras.txt), or use --engine local") from None
    serve_until_stopped(spec, args.host, args.port, args.address, args.replicas, ready)
    return 0


# ---------------------------------------------------------------------------------------------------- parser
# Each command's options are a frozen dataclass of option() fields (snnet.utils.options), its parser derived from them
# by add_options; an option two commands share is declared once, below, and copied with shared().
#: the results files pareto and report read
RESULTS_FILES = option(MISSING, nargs="+", metavar="RESULTS", help="stitches_res.txt files (ours or SN-Net's)")
LATENCY_BATCH = option(1, "--latency-batch", parse=_positive_int, metavar="B",
                       help="with --by latency: the batch size of latency_ms_b<B> (default 1)")
TITLE = option("", "--title", help="plot title")
#: the trained SN-Net a command loads (export, latency, serve)
CHECKPOINT = option(MISSING, metavar="CKPT", help="SN-Net checkpoint written by train.py (e.g. last.pth.tar)")
TRAINED_STITCH_CONFIG = option(None, "--stitch_config", "--stitch-config", metavar="CFG",
                               help="the stitch config it was trained with (default: the one the checkpoint recorded)")
TRAINED_IMG_SIZE = option(None, "--img-size", parse=_positive_int, metavar="S",
                          help="image size (default: the checkpoint's training --img-size)")
TRAINED_NUM_CLASSES = option(None, "--num-classes", parse=_positive_int, metavar="N",
                             help="classifier classes (default: the checkpoint's)")
CPU_DEVICE = option("cpu", "--device", help="cpu or cuda[:i] (default cpu)")


@dataclass(frozen=True, kw_only=True)
class ParetoCommand:
    """`snnet pareto`."""
    results: tuple[str, ...] = shared(RESULTS_FILES)
    out: str | None = option(None, "--out", metavar="DIR", help="write pareto_<cost>.{md,json,png} here")
    by: str = option("flops", "--by", choices=("flops", "params", "latency"), help="cost axis")
    latency_batch: int = shared(LATENCY_BATCH)
    anchors: int | None = option(None, "--anchors", parse=int, metavar="N",
                                 help="files without routes (SN-Net's): cfg 0..N-1 are anchors "
                                      "(default: inferred, see docs/deploy.md)")
    before: str | None = option(None, "--before", metavar="RESULTS",
                                help="results file from before SN-Net training (e.g. train.py --eval of the untrained "
                                     "SN-Net): adds each file's anchor drift to the front-quality table")
    baselines: bool = option(False, "--baselines",
                             help="also the baselines that need no training, from the per-image predictions beside "
                                  "each file (stitches_pred.npz, written by train.py's evaluation): random anchor "
                                  "mixing and a confidence cascade of the anchors, their hypervolumes and how many "
                                  "stitches beat them (dashed on the plot)")
    title: str = shared(TITLE)


@dataclass(frozen=True, kw_only=True)
class ReportCommand:
    """`snnet report`."""
    results: tuple[str, ...] = shared(RESULTS_FILES)
    out: str = option(MISSING, "--out", required=True, metavar="FILE",
                      help="the HTML file to write, e.g. report.html")
    by: str = option("flops", "--by", choices=("flops", "params", "latency"),
                     help="cost axis shown first (default flops)")
    latency_batch: int = shared(LATENCY_BATCH)
    anchors: int | None = option(None, "--anchors", parse=int, metavar="N",
                                 help="files without routes (SN-Net's): cfg 0..N-1 are anchors (default: inferred)")
    baselines: bool = option(False, "--baselines",
                             help="also draw the no-training baselines (random anchor mixing, confidence cascade; "
                                  "dashed) from the per-image predictions beside each file (as snnet pareto "
                                  "--baselines)")
    title: str = option("", "--title", help="page title")


@dataclass(frozen=True, kw_only=True)
class SelectCommand:
    """`snnet select`."""
    results: str = option(MISSING, metavar="RESULTS", help="a stitches_res.txt")
    max_flops: float | None = option(None, "--max-flops", parse=_amount("--max-flops"), metavar="F", help="e.g. 5G")
    max_params: float | None = option(None, "--max-params", parse=_amount("--max-params"), metavar="P",
                                      help="e.g. 20M")
    max_latency_ms: float | None = option(None, "--max-latency-ms", parse=_amount("--max-latency-ms", suffixes=False),
                                          metavar="MS", help="e.g. 3 (needs snnet latency --results first)")
    latency_batch: int = option(1, "--latency-batch", parse=_positive_int, metavar="B",
                                help="batch size of the latency budget (default 1)")
    min_acc: float | None = option(None, "--min-acc", parse=_percent, metavar="TOP1", help="e.g. 78 (percent)")
    json: bool = option(False, "--json", help="print the chosen record as one JSON line")


@dataclass(frozen=True, kw_only=True)
class TrainedNetwork:
    """The trained SN-Net export and latency load (the checkpoint and what it was trained with)."""
    checkpoint: str = shared(CHECKPOINT)
    stitch_config: str | None = shared(TRAINED_STITCH_CONFIG)
    img_size: int | None = shared(TRAINED_IMG_SIZE)
    num_classes: int | None = shared(TRAINED_NUM_CLASSES)
    no_pretrained: bool = option(False, "--no-pretrained",
                                 help="accepted for train.py compatibility; anchors are never downloaded here (the "
                                      "checkpoint's weights replace everything)")


@dataclass(frozen=True, kw_only=True)
class ExportCommand(TrainedNetwork):
    """`snnet export`."""
    cfg_id: int = option(MISSING, "--cfg-id", "--cfg_id", parse=_cfg_id, required=True, metavar="N",
                         help="the stitch to export")
    out: str = option(MISSING, "--out", required=True, metavar="DIR", help="export folder")
    no_torchscript: bool = option(False, "--no-torchscript", help="skip model.torchscript.pt")
    no_onnx: bool = option(False, "--no-onnx", help="skip model.onnx")
    opset: int = option(17, "--opset", parse=_positive_int, help="ONNX opset (default 17)")


@dataclass(frozen=True, kw_only=True)
class LatencyCommand(TrainedNetwork):
    """`snnet latency`."""
    batch: tuple[int, ...] | None = option(None, "--batch", parse=_positive_int, action="append", metavar="B",
                                           help="batch size, repeatable (default: --batch 1 --batch 32)")
    warmup: int = option(5, "--warmup", parse=_count, help="untimed calls per stitch and batch (default 5)")
    repeats: int = option(20, "--repeats", parse=_positive_int, help="timed calls; the median is kept (default 20)")
    results: str | None = option(None, "--results", metavar="FILE",
                                 help="add latency_ms_b<B>, latency_device to this results file")
    cfg_ids: tuple[int, ...] | None = option(None, "--cfg-ids", parse=_cfg_id, nargs="+", metavar="N",
                                             help="only these stitches (default: those in --results, else all)")
    device: str = shared(CPU_DEVICE)
    threads: int | None = option(None, "--threads", parse=_positive_int,
                                 help="torch intra-op threads, at most the cores here (default: torch's)")


@dataclass(frozen=True, kw_only=True)
class ConvertCommand:
    """`snnet convert`."""
    src: str = option(MISSING, metavar="SNNET_PTH", help="SN-Net's released checkpoint")
    dst: str = option(MISSING, metavar="OUT", help="our checkpoint to write (e.g. snnet_deit.pth.tar)")
    trust: bool = option(False, "--trust", help="required: you trust this file's origin")
    levit_depths: tuple[int, ...] | None = option(None, "--levit-depths", parse=_positive_int, nargs=3, metavar="D",
                                                  help="LeViT stage depths every anchor of the release must have "
                                                       "(default: each anchor's, read from its keys)")


@dataclass(frozen=True, kw_only=True)
class ServeCommand:
    """`snnet serve`."""
    checkpoint: str | None = option(None, nargs="?", metavar="CKPT",
                                    help="SN-Net checkpoint written by train.py (or --exported)")
    stitch_config: str | None = shared(TRAINED_STITCH_CONFIG)
    results: str = option(MISSING, "--results", required=True, metavar="FILE",
                          help="the checkpoint's stitches_res.txt: the accuracies the choice ranks by (its routes are "
                               "checked)")
    exported: tuple[str, ...] | None = option(None, "--exported", nargs="+", metavar="DIR",
                                              help="serve these snnet export folders (one network each) instead of a "
                                                   "checkpoint")
    host: str = option("127.0.0.1", "--host", help="address to listen on (default 127.0.0.1: this machine only)")
    port: int = option(8000, "--port", parse=_port, help="HTTP port, 1-65535 (default 8000)")
    img_size: int | None = shared(TRAINED_IMG_SIZE)
    num_classes: int | None = shared(TRAINED_NUM_CLASSES)
    max_batch: int = option(16, "--max-batch", parse=_positive_int, metavar="B",
                            help="largest batch of one stitch (default 16)")
    max_wait_ms: float = option(0.0, "--max-wait-ms", parse=_amount("--max-wait-ms", suffixes=False), metavar="MS",
                                help="wait up to this long for a fuller batch when the worker is free (default 0: run "
                                     "at once; the wait counts in every prediction)")
    shed: bool = option(False, "--shed",
                        help="answer 503 at once to a request whose budget.latency_ms cannot be met even on the "
                             "fastest stitch (default: it runs on the fastest and says within_budget false)")
    max_body_kb: int = option(4096, "--max-body-kb", parse=_positive_int, metavar="KB",
                              help="largest request body; larger ones get 413 (default 4096)")
    device: str = shared(CPU_DEVICE)
    threads: int | None = option(None, "--threads", parse=_positive_int,
                                 help="torch intra-op threads per replica, at most the cores here (default: torch's)")
    engine: str = option("local", "--engine", choices=("local", "ray"),
                         help="local: aiohttp in this process (default, one machine); ray: Ray Serve (replicas, "
                              "clusters)")
    replicas: int = option(1, "--replicas", parse=_positive_int,
                           help="Ray replicas (across a cluster's nodes; default 1; needs --engine ray)")
    address: str = option("local", "--address",
                          help="with --engine ray: 'local' starts a private Ray instance here (default); 'auto' or "
                               "HOST:PORT joins a cluster")


def _command(sub: Any, name: str, options: type, fn: Callable[[Any], int], **parser: Any) -> None:
    """The subcommand `name`: its parser derived from its options class, running `fn` on the typed options."""
    p = sub.add_parser(name, **parser)
    add_options(p, [options])
    p.set_defaults(fn=fn, options=options)


def typed_options(args: argparse.Namespace) -> Any:
    """The parsed command's options as its options class (a list value as a tuple): what its function takes."""
    return args.options(**{f.name: tuple(v) if isinstance(v := getattr(args, f.name), list) else v
                           for f in dataclasses.fields(args.options)})


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="snnet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{quickstart,pareto,report,select,export,latency,convert,similarity,search,"
                                   "stitch-train,shards,serve}")
    _command(sub, "pareto", ParetoCommand, cmd_pareto,
             help="Pareto-optimal stitches of results files: table, JSON, plot",
             description="Prints the Pareto-optimal stitches of each results file (and, with several files, the "
             "combined front saying which file each network comes from) and each file's front quality (hypervolume, "
             "area under the front, mean gap, anchor drift with --before); with --out also writes pareto_<cost>.md "
             "(every stitch, front marked), .json and .png.")
    _command(sub, "report", ReportCommand, cmd_report,
             help="one self-contained HTML page: cost-accuracy scatter, fronts, budget slider, route diagram",
             description="Writes one HTML file (inline SVG and JavaScript, no network) showing every stitch of each "
             "results file against a cost (a selector offers each cost the records hold), the Pareto fronts, details "
             "on hover/click, a budget slider marking the best stitch within it (snnet select's rule) and the route "
             "diagram of the selected stitch.")
    _command(sub, "select", SelectCommand, cmd_select, help="the best stitch within a budget",
             description="Highest top-1 within the budgets (all must hold); with --min-acc the cheapest by FLOPs that "
             "reaches it. Budgets take K/M/G suffixes: 5G, 20M, 750K, 4.5e9.")
    _command(sub, "export", ExportCommand, cmd_export,
             help="one stitch as a standalone network (safetensors + JSON, TorchScript, ONNX)")
    _command(sub, "latency", LatencyCommand, cmd_latency,
             help="measured latency per stitch, optionally added to a results file")
    _command(sub, "convert", ConvertCommand, cmd_convert,
             help="a released SN-Net .pth (pickled) -> a pickle-free checkpoint",
             description="Reads SN-Net's released checkpoint with torch's weights-only unpickler, allowing only the "
             "argparse Namespace / yacs CfgNode SN-Net stored (no code from the file runs), maps keys to timm 1.0 "
             "names (Swin, LeViT), and writes a checkpoint train.py --resume accepts.")
    _similarity_parsers(sub)
    _command(sub, "serve", ServeCommand, cmd_serve,
             help="an HTTP endpoint that picks the stitch per request from its deadline and the load, batching "
             "requests that run the same stitch",
             description="Serves one trained SN-Net: requests wait in deadline order; when the worker is free, the "
             "most urgent one binds the stitch by a table lookup: the best one (snnet select's rule over --results, "
             "within budget.flops) whose batch, with the queue behind it, ends before its deadline "
             "(budget.latency_ms) by the latency table measured at start (about 30 s) and the speed measured since. "
             "A request without a latency budget always gets snnet select's stitch. docs/serving.md has the request "
             "format and the numbers.")
    _stitch_train_parser(sub)
    _quickstart_parser(sub)
    return p


# ------------------------------------------------------------------------------------------------------ quickstart
@dataclass(frozen=True, kw_only=True)
class QuickstartCommand:
    """`snnet quickstart`'s flags (snnet.quickstart.QuickstartOptions is what they make)."""
    data: str = option(MISSING, metavar="DATA",
                       help="a folder with one sub-folder of images per class (split 80/20 into DIR/data), or with "
                            "train/ and val/ (or test/, any case) holding one sub-folder per class each; or tar shards "
                            "(_info.json, as snnet shards writes them) or a local Hugging Face dataset's parquet files")
    out: str = option(MISSING, "--out", required=True, metavar="DIR",
                      help="everything goes here: anchors, SN-Net, logs, results")
    anchors: tuple[str, ...] | None = option(None, "--anchors", nargs="+", metavar="NAME",
                                             help="timm models to fine-tune as anchors instead, smallest first "
                                                  "(pretrained where their weights are on this machine)")
    no_pretrained: bool = option(False, "--no-pretrained", help="with --anchors: random weights")
    widths: tuple[int, ...] | None = option(None, "--widths", nargs="+", parse=_positive_int, metavar="W",
                                            help="widths of the CNN anchors, smallest first (default 4 12)")
    stitch_stages: tuple[int, ...] | None = option(None, "--stitch-stages", nargs="+", parse=_count, metavar="S",
                                                   help="stages of hierarchical anchors to stitch in, from 0 (default: "
                                                        "the CNN anchors' deep stages, 2 3; --anchors: the family's)")
    stitch_plan: str | None = option(None, "--stitch-plan", choices=("large_to_small", "two_way", "sliding_window"),
                                     help="which anchor runs first in a stitch: large_to_small (the larger anchor's "
                                          "front, the smaller's last blocks; the default for the CNN anchors), "
                                          "sliding_window (SN-Net: the smaller in front; --anchors' default) or "
                                          "two_way (both); large_to_small takes anchors stitched stage by stage "
                                          "(CNNs, Swin, LeViT), not plain ViTs")
    bn_stats: str | None = option(None, "--bn-stats", choices=("per_stitch", "shared"),
                                  help="BatchNorm statistics of the anchors' blocks after a stitch: per_stitch (the "
                                       "default: each stitch keeps its own) or shared (SN-Net's)")
    img_size: int | None = option(None, "--img-size", parse=_positive_int, metavar="S",
                                  help="image side the anchors see (default: 64; smaller images twice their side, up "
                                       "to 64)")
    anchor_epochs: int | None = option(None, "--anchor-epochs", parse=_positive_int, metavar="N",
                                       help="epochs of each anchor (default: 30-60, enough for 600 steps)")
    snnet_epochs: int | None = option(None, "--snnet-epochs", parse=_positive_int, metavar="N",
                                      help="epochs of the SN-Net (default: as many as the anchors')")
    batch: int | None = option(None, "--batch", parse=_positive_int, metavar="B",
                               help="batch per process (default 32; the CNN anchors 128)")
    nproc: int | None = option(None, "--nproc", parse=_positive_int, metavar="N",
                               help="SN-Net processes (default: one per core)")
    seed: int = option(0, "--seed", parse=int,
                       help="seeds the 80/20 split and every training step (default 0; another redoes every step)")
    fresh: bool = option(False, "--fresh",
                         help="redo every step, even those a run of the same arguments finished")


def _quickstart_parser(sub: Any) -> None:
    _command(sub, "quickstart", QuickstartCommand, cmd_quickstart,
             help="your image folder -> anchors -> SN-Net -> every stitch evaluated -> front and report, offline, in "
             "one command",
             description="The digits demo for your own images (docs/own_data.md): chooses small CNN anchors for the "
             "data, trains them from scratch (or fine-tunes --anchors NAME ...), writes the stitch config, trains the "
             "SN-Net on every core (distributed_train.sh's launcher), evaluates every stitch and writes "
             "stitches_res.txt, the Pareto table and plot with their baselines and report.html under --out. Prints "
             "each choice and the flag that changes it; a second run with the same arguments continues where the "
             "first stopped.")


def cmd_quickstart(args: QuickstartCommand) -> int:
    data_folder(args.data, "DATA", CLASS_FOLDERS)  # before torch and timm are imported (seconds)
    check_out_dir(args.out)
    from snnet.quickstart import QuickstartOptions
    from snnet.quickstart import main as quickstart
    return quickstart(QuickstartOptions.from_values(dataclasses.asdict(args)))


# ---------------------------------------------------------------------------------------------------- stitch-train
def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: write key=value, e.g. epochs=3")
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


SLURM, ONE_RUN = "Slurm (docs/slurm.md)", "one run (without --sweep)"  # stitch-train's help groups


@dataclass(frozen=True, kw_only=True)
class StitchTrainCommand:
    """`snnet stitch-train` (snnet/explore/stitch_train: sweeps of stitching layers between frozen anchors)."""
    data: str | None = option(None, nargs="?", metavar="DATA",
                              help="dataset folder with train/ and val/ (overrides the sweep's `data`)")
    sweep: str | None = option(None, "--sweep", metavar="YAML",
                               help="a sweep file (e.g. configs/sweeps/digits_3x3.yaml)")
    out: str | None = option(None, "--out", metavar="DIR", help="output folder (overrides the sweep's `out`)")
    train: tuple[tuple[str, Any], ...] = option((), "--train", parse=_key_value, nargs="+", action="extend",
                                                metavar="FLAG=VALUE",
                                                help="train.py flags for every run, e.g. epochs=3 lr=1e-3 img_size=16 "
                                                     "(over the sweep's `train`); given twice, the flags add up (a key "
                                                     "given again takes its later value)")
    dry_run: bool = option(False, "--dry-run", help="check everything and list the runs; train nothing")
    submit: bool = option(False, "--submit", group=SLURM,
                          help="submit the sweep's unfinished jobs as a Slurm job array (one run or anchor evaluation "
                               "per array task) instead of running them here")
    sbatch: str | None = option(None, "--sbatch", group=SLURM, metavar="OPTIONS",
                                help="sbatch options of --submit, one string after '=', e.g. --sbatch='--partition=gpu "
                                     "--gpus-per-task=1 --time=1:00:00'")
    max_parallel: int | None = option(None, "--max-parallel", group=SLURM, parse=int, metavar="N",
                                      help="--submit: at most N array tasks at once")
    task: int | None = option(None, "--task", group=SLURM, parse=int, metavar="K",
                              help="run job K of the sweep only (what an array task runs: --task "
                                   "$SLURM_ARRAY_TASK_ID); the task that finds every job finished writes the results")
    merge: bool = option(False, "--merge", group=SLURM,
                         help="write stitches_res.txt (and the pictures) from the finished jobs, whoever ran them; "
                              "list the unfinished ones")
    front: str | None = option(None, "--front", group=ONE_RUN, metavar="[LABEL=]ANCHOR",
                               help="NAME (timm), NAME:CHECKPOINT, FILE#INDEX of a stitch config, or a JSON anchor "
                                    "object '{\"name\": ..., \"checkpoint\": ..., \"model_kwargs\": ...}'")
    end: str | None = option(None, "--end", group=ONE_RUN, metavar="[LABEL=]ANCHOR",
                             help="the end anchor, the same way")
    cut: int | None = option(None, "--cut", group=ONE_RUN, parse=int, metavar="I",
                             help="the front anchor's last block that runs (flat, from 0)")
    end_block: int | None = option(None, "--end-block", group=ONE_RUN, parse=int, metavar="J",
                                   help="the end anchor's first block that runs")
    gap: int | None = option(None, "--gap", group=ONE_RUN, parse=int, metavar="G",
                             help="J minus the block aligned with I (default 0)")
    layer: str | None = option(None, "--layer", group=ONE_RUN, metavar="TYPE",
                               help="stitching-layer type (default linear)")
    layer_option: tuple[tuple[str, Any], ...] = option((), "--layer-option", group=ONE_RUN, parse=_key_value,
                                                       nargs="+", metavar="KEY=VALUE",
                                                       help="stitching-layer options, e.g. rank=8")
    no_ls_init: bool = option(False, "--no-ls-init", group=ONE_RUN, help="train the layer from its random init")
    ls_images: int | None = option(None, "--ls-images", group=ONE_RUN, parse=int, metavar="N",
                                   help="images of the least-squares init (default 256)")
    loss: str | None = option(None, "--loss", group=ONE_RUN, choices=("ce", "kd"),
                              help="ce (default) or kd from the end anchor's logits")
    temperature: float | None = option(None, "--temperature", group=ONE_RUN, parse=float, metavar="T",
                                       help="kd temperature (default 1)")
    kd_alpha: float | None = option(None, "--kd-alpha", group=ONE_RUN, parse=float, metavar="A",
                                    help="kd weight (default 1: KL only)")
    seed: int | None = option(None, "--seed", group=ONE_RUN, parse=int, metavar="S",
                              help="seed of the run and of the anchors' random init (default 0)")
    no_pretrained: bool = option(False, "--no-pretrained", group=ONE_RUN,
                                 help="anchors without a checkpoint start random")


def _stitch_train_parser(sub: Any) -> None:
    _command(sub, "stitch-train", StitchTrainCommand, cmd_stitch_train,
             help="train one stitching layer between two frozen anchors, or a YAML sweep of them",
             description="Front anchor up to block i, a stitching layer, end anchor from block j (any gap); only the "
             "layer trains, the anchors stay frozen in eval mode. Each run writes trajectory.jsonl, "
             "stitch_layer.pth.tar and result.json (last) in its folder; the sweep folder gets stitches_res.txt for "
             "snnet pareto. Finished runs are skipped on rerun. Under torchrun the runs are split across the "
             "processes. See docs/stitch_train.md.")


_ONE_RUN = {"front": "--front", "end": "--end", "cut": "--cut", "end_block": "--end-block", "gap": "--gap",
            "layer": "--layer", "ls_images": "--ls-images", "loss": "--loss", "temperature": "--temperature",
            "kd_alpha": "--kd-alpha", "seed": "--seed"}


def sweep_from_args(args: StitchTrainCommand) -> Sweep:
    """The sweep the command line asks for: --sweep FILE, or one run from the run flags."""
    # the sweep's checks load without torch, so a bad sweep or flag is refused at once
    from snnet.explore.stitch_train.sweep import TRAIN_REFUSED, SweepError, anchor_argument, load_sweep, parse_sweep
    train = dict(args.train)
    given = [flag for dest, flag in _ONE_RUN.items() if getattr(args, dest) is not None]
    given += [f for f, on in (("--no-ls-init", args.no_ls_init), ("--layer-option", args.layer_option),
                              ("--no-pretrained", args.no_pretrained)) if on]
    if args.sweep:
        if given:
            raise SweepError(f"{', '.join(given)} describe one run; with --sweep put them into the sweep file")
        sweep = load_sweep(args.sweep, args.out, args.data)
        sweep.train.update({k.replace("-", "_"): v for k, v in train.items()})
        for k in sweep.train:
            if k in TRAIN_REFUSED:
                raise SweepError(f"--train {k}: {TRAIN_REFUSED[k]}")
        return sweep
    if not (args.front and args.end and args.cut is not None):
        raise SweepError("give --sweep FILE, or one run: DATA --front ANCHOR --end ANCHOR --cut I [--gap G | "
                         "--end-block J] --out DIR")
    (fl, front), (el, end) = anchor_argument(args.front, "--front"), anchor_argument(args.end, "--end")
    if fl == el and front != end:  # two different anchors that would get one label
        el = f"{el}_end"
    anchors = {fl: front, el: end}
    run: dict[str, Any] = {"pair": [fl, el], "cut": args.cut}
    for dest in ("end_block", "gap", "ls_images", "loss", "temperature", "kd_alpha", "seed"):
        if getattr(args, dest) is not None:
            run[dest] = getattr(args, dest)
    if args.layer or args.layer_option:
        run["layer"] = {"type": args.layer or "linear", **dict(args.layer_option)}
    if args.no_ls_init:
        run["ls_init"] = False
    data = {"anchors": anchors, "train": train, "runs": [run], "pretrained": not args.no_pretrained,
            "seed": args.seed or 0}
    return parse_sweep(data, "stitch-train", Path.cwd(), args.out, args.data)


def _sweep_table(summary: SweepSummary) -> str:
    rows = ["| cfg_id | route | top-1 | init top-1 | FLOPs | params | layer params | s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary.records:
        if "run" in r:
            rows.append(f"| {r['cfg_id']} | {r['route']} | {r['acc1']:.2f} | {r['init_acc1']:.2f} | "
                        f"{human(r['flops'])} | {human(r['params'])} | {human(r['stitch_layer_params'])} | "
                        f"{r['seconds']:.0f} |")
        else:
            rows.append(f"| {r['cfg_id']} | {r['route']} (anchor) | {r['acc1']:.2f} | | {human(r['flops'])} | "
                        f"{human(r['params'])} | | |")
    return "\n".join(rows) + "\n"


def cmd_stitch_train(args: StitchTrainCommand) -> int:
    """`snnet stitch-train`. A user error is an SNNetError raised through: `snnet`'s main prints it in one line
    (rank 0 only) and exits with its code."""
    from snnet.explore.stitch_train.sweep import SWEEP_JSON, SweepError
    # a torchrun launch's (rank, world size), from its environment: no process group is made for the runs
    rank, world_size = world(launched=True)
    if not logging.getLogger().handlers:
        tag = f" [rank {rank}]" if world_size > 1 else ""
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s{tag} %(message)s", datefmt="%H:%M:%S")
    sweep = sweep_from_args(args)
    modes = [flag for flag, on in (("--submit", args.submit), ("--merge", args.merge),
                                   ("--task", args.task is not None), ("--dry-run", args.dry_run)) if on]
    if len(modes) > 1:
        raise SweepError(f"{' and '.join(modes)} exclude each other; give one")
    if (args.sbatch or args.max_parallel) and not args.submit:
        raise SweepError("--sbatch and --max-parallel are options of --submit; add --submit")
    if (args.submit or args.task is not None) and not args.sweep:
        raise SweepError("--submit and --task need --sweep FILE (the array tasks read the sweep file); write the run "
                         "into a sweep file")
    if args.max_parallel is not None and args.max_parallel < 1:
        raise SweepError(f"--max-parallel {args.max_parallel} must be >= 1")
    if not args.merge:  # --merge reads the runs' results only
        data_folder(sweep.data, "data folder", DATA_ROOT, SweepError)
    if (sweep.out / RESULTS_FILE).exists() and not (sweep.out / SWEEP_JSON).exists():
        raise SweepError(f"--out {str(sweep.out)!r} holds a {RESULTS_FILE} that no stitch-train sweep wrote (a "
                         f"training run's?): the sweep would replace it; pass another --out, or remove it first")
    # the jobs import torch and timm: only after the sweep, its data folder and the flags are checked
    from snnet.explore.stitch_train.jobs import merge, run_sweep, submit_array
    if args.submit and args.sweep:  # --submit without --sweep is refused above
        job, todo = submit_array(sweep, args.sweep, args.data, args.train, args.sbatch or "", args.max_parallel)
        if job is None:
            print(f"every job of {sweep.source} is finished; nothing to submit (results: snnet stitch-train --sweep "
                  f"{args.sweep} --merge)")
        else:
            print(f"submitted job array {job}: {len(todo)} task(s), jobs {','.join(map(str, todo))} of the sweep; "
                  f"logs {sweep.out / 'slurm'}; the last task writes {sweep.out / 'stitches_res.txt'} (or: snnet "
                  f"stitch-train --sweep {args.sweep} --merge)")
        return 0
    if args.merge:
        path, missing = merge(sweep)
        print(f"{path}: every job finished" if not missing else
              f"{path}: jobs {','.join(map(str, missing))} not finished yet (rerun --submit for them)")
        return 0
    summary = run_sweep(sweep, dry_run=args.dry_run, task=args.task)
    if rank != 0:
        return 0
    n = len(sweep.runs)
    if args.dry_run:
        print(f"{n} runs, {len(summary.skipped)} finished, in {sweep.out}:")
        for r, p in zip(sweep.runs, summary.plans):
            state = "finished" if r.index in summary.skipped else "to do"
            print(f"  cfg {r.index:>3d} {state:<8} {p.route}  (gap {p.gap:+d}; runs/{p.name})")
        return 0
    if args.task is not None:
        print(f"job {args.task} of {sweep.source} done" + (f"; every job finished: results {summary.results_file}"
                                                             if summary.results_file else ""))
        return 0
    print(_sweep_table(summary), end="")
    print(f"{n} runs: {len(summary.trained)} trained now by this process, {len(summary.skipped)} finished before"
          + (f", {len(summary.elsewhere)} by other processes" if world_size > 1 else "")
          + f"; results {summary.results_file} (plot: snnet pareto {summary.results_file} --out {sweep.out})")
    return 0


# --------------------------------------------------------------------------------------------------- similarity, search
def _fraction(text: str) -> float:
    try:
        value = parse_amount(text, "the threshold", suffixes=False)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} is above 1; scores are in [0, 1], write e.g. 0.9")
    return value


@dataclass(frozen=True, kw_only=True)
class AnchorImages:
    """The anchors similarity and search compare and the images they compare them on."""
    anchors: tuple[str, ...] | None = option(None, "--anchors", nargs="+", metavar="A",
                                             help="timm names, NAME:CHECKPOINT, FILE#INDEX (anchor INDEX of a stitch "
                                                  "config), or a config's JSON anchor object (or use --stitch_config)")
    stitch_config: str | None = option(None, "--stitch_config", "--stitch-config", metavar="CFG",
                                       help="take the anchors (names, checkpoints, model_kwargs) from this stitch "
                                            "config")
    data: str = option(MISSING, "--data", required=True, metavar="DIR", help="ImageFolder root with train/ (and val/)")
    out: str = option(MISSING, "--out", required=True, metavar="DIR", help="output folder")
    batches: int = option(4, "--batches", parse=_positive_int, metavar="N", help="calibration batches (default 4)")
    batch_size: int = option(64, "--batch-size", "-b", parse=_positive_int, metavar="B",
                             help="images per batch (default 64; at least 4 for the unbiased CKA)")
    img_size: int | None = option(None, "--img-size", parse=_positive_int, metavar="S",
                                  help="image size (default: the config's input_size, else the anchors' own)")
    num_classes: int | None = option(None, "--num-classes", parse=_positive_int, metavar="N",
                                     help="classifier classes (default: the config's, else the data's)")
    no_pretrained: bool = option(False, "--no-pretrained",
                                 help="random anchors where no checkpoint is named (default: timm's pretrained "
                                      "weights)")
    device: str | None = option(None, "--device", help="cpu or cuda[:i] (default: cuda when available)")
    seed: int = option(0, "--seed", parse=_count, help="which calibration images are drawn (default 0)")


@dataclass(frozen=True, kw_only=True)
class SimilarityCommand(AnchorImages):
    """`snnet similarity`."""
    split: str = option("train", "--split", choices=("train", "val"),
                        help="the split the images come from (default train)")
    no_kl: bool = option(False, "--no-kl", help="skip the KL map (one pass of B per stitchable pair)")


@dataclass(frozen=True, kw_only=True)
class SearchCommand(AnchorImages):
    """`snnet search`."""
    score: str = option("cka", "--score", choices=("cka", "ls", "kl"),
                        help="edge score: cka (StitchNet's), ls (1 - residual^2) or kl (exp(-KL)) (default cka)")
    threshold: float = option(0.9, "--threshold", parse=_fraction, help="an edge needs a score above this (0.9)")
    total_threshold: float = option(0.5, "--total-threshold", parse=_fraction,
                                    help="a path's product of scores must reach this (0.5)")
    max_depth: int = option(10, "--max-depth", parse=_positive_int, help="most segments per network (10)")
    beam_width: int = option(16, "--beam-width", parse=_count, help="partial paths kept per level; 0: all (16)")
    max_networks: int = option(0, "--max-networks", parse=_count, help="evaluate at most the N best-scored; 0: all")


@dataclass(frozen=True, kw_only=True)
class ShardsCommand:
    """`snnet shards`."""
    folder: str = option(MISSING, metavar="FOLDER", help="ImageFolder root with train/ and val/ class folders")
    out: str = option(MISSING, metavar="OUT", help="folder for the shards and _info.json")
    shard_size: int = option(1000, "--shard-size", parse=_positive_int, metavar="N", help="samples per shard (1000)")
    name: str | None = option(None, "--name", help="dataset name in _info.json (default: FOLDER's name)")
    clean: bool = option(False, "--clean",
                         help="OUT holds an earlier snnet shards output: remove its shards and _info.json first "
                              "(after every check passed); without it a non-empty OUT is refused")


def _similarity_parsers(sub: Any) -> None:
    _command(sub, "similarity", SimilarityCommand, cmd_similarity,
             help="compatibility maps of anchors: CKA, least-squares stitch residual, KL",
             description="For every (unit of A, unit of B) pair of every ordered anchor pair: unbiased minibatch "
             "linear CKA, the relative residual of the least-squares stitch and the KL divergence of the stitched "
             "network from B (docs/stitch_anything.md). Writes similarity.json, similarity.csv and cka.png, "
             "ls_residual.png, kl.png.")
    _command(sub, "search", SearchCommand, cmd_search,
             help="training-free composition search over anchor paths (StitchNet's options)",
             description="Beam search over (anchor, cut) paths scored by the compatibility maps of the train split, "
             "each edge a least-squares stitch; the anchors and every network found are evaluated in one pass on the "
             "validation split. Writes stitches_res.txt (snnet pareto reads it), pareto_flops.{md,json,png}, "
             "networks/cfg_<id>.svg, search.json, stitches.safetensors and the maps (similarity/).")
    _command(sub, "shards", ShardsCommand, cmd_shards,
             help="an ImageFolder as WebDataset tar shards with timm's _info.json",
             description="Writes each split folder of FOLDER (train/, val/ or validation/, test/) as tar shards "
             "<split>-NNNNNN.tar of N samples in OUT, then OUT/_info.json (splits, file names, samples per shard, "
             "classes), every file atomically. Train and evaluate from them with train.py OUT --dataset wds/NAME.")


def cmd_shards(args: ShardsCommand) -> int:
    data_folder(args.folder, "image folder", DATA_ROOT)  # before torch and timm are imported (seconds)
    check_out_dir(args.out)
    from snnet.data.datasets import write_folder_shards
    info = write_folder_shards(args.folder, args.out, args.shard_size, args.name, args.clean)
    for name, split in info["splits"].items():
        print(f"{name}: {split['num_samples']} images in {len(split['filenames'])} shard(s)")
    print(f"wrote {os.path.join(args.out, '_info.json')} ({info['num_classes']} classes); use it with train.py "
          f"{args.out} --dataset wds/{info['name']}")
    return 0


def _similarity_options(args: AnchorImages) -> tuple[SimilarityOptions, DataOptions, LoaderOptions]:
    """The flags both tools share, as typed options: (theirs, which images, how they are loaded)."""
    from snnet.explore.similarity import SimilarityOptions, data_options, loader_options
    options = SimilarityOptions(out=args.out, anchors=tuple(args.anchors or ()), stitch_config=args.stitch_config,
                                batches=args.batches, img_size=args.img_size, pretrained=not args.no_pretrained,
                                seed=args.seed)
    return options, data_options(args.data, args.num_classes), loader_options(args.batch_size)


def _anchor_images_first(args: AnchorImages) -> None:
    """similarity's and search's data folder and stitch config, before torch and timm are imported (seconds); a
    config given with --anchors is refused as the pair, later."""
    data_folder(args.data, "data folder", DATA_ROOT)
    if not args.anchors:
        _inputs_first(stitch_config=args.stitch_config)


def cmd_similarity(args: SimilarityCommand) -> int:
    _anchor_images_first(args)
    from snnet.explore.similarity import run_similarity
    run_similarity(*_similarity_options(args), args.device, split=args.split, kl=not args.no_kl)
    return 0


def cmd_search(args: SearchCommand) -> int:
    _anchor_images_first(args)
    if (Path(args.out) / RESULTS_FILE).exists() and not (Path(args.out) / "search.json").exists():
        raise UsageError(f"--out {args.out!r} holds a {RESULTS_FILE} that no snnet search wrote (a training run's?): "
                         f"the search would replace it; pass another --out, or remove it first")
    from snnet.explore.search import SearchOptions, run_search
    options, data, loader = _similarity_options(args)
    search = SearchOptions(threshold=args.threshold, total_threshold=args.total_threshold, max_depth=args.max_depth,
                           beam_width=args.beam_width, score=args.score)
    run_search(options, search, data, loader, args.device, args.max_networks)
    return 0


def cmd_convert(args: ConvertCommand) -> int:
    release_paths(args.src, args.dst)  # and --trust: before torch is imported (seconds)
    if not args.trust:
        raise UsageError(f"{args.src!r} is a pickled file: converting it means trusting where it came from; if you "
                         f"do, add --trust")
    from snnet.deploy.convert import convert_release
    summary = convert_release(args.src, args.dst, tuple(args.levit_depths) if args.levit_depths else None)
    tensors = f"{summary['tensors']} tensor{'s' if summary['tensors'] != 1 else ''}"
    if not summary["snnet"]:  # one network's weights (a timm or train.py --model checkpoint)
        print(f"converted {args.src}: one plain network's weights ({tensors}, e.g. "
              f"{summary['example']!r}; no SN-Net anchors.<i>. keys), read without running code -> {summary['dst']}; "
              f"use it as an anchor's \"checkpoint\" in a stitch config, not with train.py --resume")
        return 0
    keys = "timm 1.0" if summary["family"] == "plain" else f"{summary['family']}, mapped to timm 1.0"
    print(f"converted {args.src} ({keys} keys, {tensors}, read without running "
          f"code) -> {summary['dst']}; use it with train.py --resume {summary['dst']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # fvcore scripts a function at import; torch 2.14 calls torch.jit deprecated: noise, not the user's concern
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(typed_options(args))
    except SNNetError as e:  # the user's input, not a bug: one line (under torchrun, once per launch)
        say_refusal(f"snnet {args.command}: error: {one_line(e)}")
        return e.exit_code
    except BrokenPipeError:  # `snnet pareto ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # unwritable --out, full disk: the environment, not a bug
        print(f"snnet {args.command}: error: {e.filename!r}: {e.strerror or e}; check the path and permissions",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "; the same command continues where it stopped" if args.command == "quickstart" else ""
        print(f"snnet {args.command}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
