"""Experiment logging as timm users expect it: ``--log-tensorboard DIR`` and ``--log-wandb`` (rank 0 only).

Per epoch: ``train/loss``, ``train/lr``, the validation panel's means ``eval/loss``, ``eval/top1``, ``eval/top5``,
each panel stitch's ``eval/top1@<cfg_id>`` and, when the panel is every stitch (--val-stitches all), the front's
hypervolume ``eval/front_hv`` (the keys of summary.csv, grouped by ``/``). At the end: the final front (of
stitches_res.txt, the all-stitch evaluation) as a table and as the Pareto plot `snnet pareto` draws, both also
written to the run folder (pareto_flops.{md,json,png}), and its hypervolume ``front/hypervolume``.

Neither package is part of the core install (requirements-extras.txt has both): they are imported only when asked
for, and `check_loggers` refuses a run at startup, in one line naming the pip command, when one is missing.

    TensorBoard: event files in DIR/<experiment> (``tensorboard --logdir DIR``): scalars, the front as a markdown
                 text (``front/table``) and an image (``front/figure``).
    wandb:       project --wandb-project, run named <experiment>, files in <output>/<experiment>/wandb; with
                 WANDB_MODE=offline nothing leaves the machine (``wandb sync`` uploads later). The front is a
                 wandb.Table (``front/table``) and a wandb.Image (``front/figure``).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from snnet.results.pareto import pareto_report, save_report
from snnet.results.records import ResultsError
from snnet.train.options import LoggerOptions
from snnet.utils.errors import UsageError

_logger = logging.getLogger("snnet")
FRONT_COLUMNS = ("cfg_id", "route", "flops", "params", "acc1", "acc5")
_PACKAGES = {"log_tensorboard": ("--log-tensorboard", "tensorboard"), "log_wandb": ("--log-wandb", "wandb")}


class ExperimentLogger:
    """One backend. `log_metrics` gets flat ``{tag: number}`` dicts; `log_front` the final front."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_front(self, rows: list[dict[str, Any]], markdown: str, figure: Path, step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardLogger(ExperimentLogger):
    def __init__(self, log_dir: Path, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter  # optional (requirements-extras.txt): only when asked for
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # an interrupted run keeps its epochs

    def log_front(self, rows: list[dict[str, Any]], markdown: str, figure: Path, step: int) -> None:
        self.writer.add_text("front/table", markdown, step)
        with Image.open(figure) as img:
            self.writer.add_image("front/figure", np.asarray(img.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger(ExperimentLogger):
    def __init__(self, out_dir: Path, project: str, name: str, config: dict[str, Any]):
        import wandb  # optional (requirements-extras.txt): only when asked for
        self.wandb = wandb
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        try:  # console="off": wandb leaves stdout/stderr alone (our one-line errors stay one line)
            self.run = wandb.init(project=project, name=name, dir=str(out_dir), config=config,
                                  settings=wandb.Settings(console="off"))
        except Exception as e:  # no API key, no network: say so now, before any training
            if created:  # a refused run leaves no trace
                shutil.rmtree(out_dir, ignore_errors=True)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--log-wandb: wandb could not start a run ({first}); run `wandb login`, or set "
                             f"WANDB_MODE=offline and upload later with `wandb sync`") from None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_front(self, rows: list[dict[str, Any]], markdown: str, figure: Path, step: int) -> None:
        table = self.wandb.Table(columns=list(FRONT_COLUMNS), data=[[r.get(c) for c in FRONT_COLUMNS] for r in rows])
        self.run.log({"front/table": table, "front/figure": self.wandb.Image(str(figure))}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """The backends a run logs to (none, one or both); with none every call does nothing."""

    def __init__(self, backends: Sequence[ExperimentLogger] = ()):
        self.backends = list(backends)

    def __bool__(self) -> bool:
        return bool(self.backends)

    def log_epoch(self, epoch: int, train_metrics: dict[str, float], eval_metrics: dict[str, float],
                  lr: float) -> None:
        if self.backends:
            metrics = epoch_metrics(train_metrics, eval_metrics, lr)
            for b in self.backends:
                b.log_metrics(metrics, epoch)

    def log_final_front(self, results: Path, out_dir: Path, step: int) -> None:
        """The front of the results file `results` (the all-stitch evaluation): pareto_flops.{md,json,png} into
        `out_dir` (what `snnet pareto --out` writes), then the table, the figure and the hypervolume to every
        backend."""
        if not self.backends or not Path(results).exists():
            return
        try:
            report = pareto_report([results], "flops")
        except ResultsError as e:  # nothing to plot (e.g. no FLOPs): the epochs are logged all the same
            _logger.warning(f"experiment loggers: no final front ({e})")
            return
        figure = save_report(report, out_dir, out_dir.name)[2]
        entry = report.data["files"][0]
        rows = [{c: r.get(c) for c in FRONT_COLUMNS} for r in entry["front_records"]]
        quality = entry.get("quality") or {}
        for b in self.backends:
            b.log_front(rows, report.markdown, figure, step)
            if quality.get("hypervolume") is not None:
                b.log_metrics({"front/hypervolume": float(quality["hypervolume"])}, step)

    def close(self) -> None:
        for b in self.backends:
            b.close()
        self.backends = []


def epoch_metrics(train_metrics: dict[str, float], eval_metrics: dict[str, float], lr: float) -> dict[str, float]:
    """summary.csv's columns as tags: train/loss, train/lr, eval/top1, eval/top1@3, eval/front_hv, ..."""
    out = {f"train/{k}": float(v) for k, v in train_metrics.items()}
    out["train/lr"] = float(lr)
    out.update({f"eval/{k}": float(v) for k, v in eval_metrics.items()})
    return out


def check_loggers(options: LoggerOptions) -> None:
    """At startup: every requested backend's package is installed, else one line naming the pip command."""
    for dest, (flag, package) in _PACKAGES.items():
        if getattr(options, dest) and importlib.util.find_spec(package) is None:
            raise UsageError(f"{flag} needs the {package} package, which is not installed: pip install {package} "
                             f"(or pip install -r requirements-extras.txt), or drop {flag}")


def create_loggers(options: LoggerOptions, out_dir: Path, primary: bool = True) -> Loggers:
    """The backends the flags ask for, on the primary process (rank 0) only."""
    if not primary or not (options.log_tensorboard or options.log_wandb):
        return Loggers()
    check_loggers(options)
    config = json.loads(json.dumps(dict(options.run_config), default=str))
    backends: list[ExperimentLogger] = []
    if options.log_wandb:  # first: the one that can be refused (no API key) has left nothing behind then
        backends.append(WandbLogger(out_dir, options.wandb_project, out_dir.name, config))
    if options.log_tensorboard:
        log_dir = Path(options.log_tensorboard) / out_dir.name
        try:
            backends.append(TensorBoardLogger(log_dir, config))
        except OSError as e:
            Loggers(backends).close()
            raise UsageError(f"--log-tensorboard {options.log_tensorboard!r}: cannot write {str(log_dir)!r} "
                             f"({e.strerror or e}); pass another DIR") from None
    where = [f"TensorBoard {Path(options.log_tensorboard) / out_dir.name}"] if options.log_tensorboard else []
    where += [f"wandb project {options.wandb_project!r}"] if options.log_wandb else []
    _logger.info("experiment logging: " + ", ".join(where))
    return Loggers(backends)
