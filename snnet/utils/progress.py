"""Progress lines for long work: one log line per interval with rate and ETA (no carriage returns in log files),
a live bar only on a terminal, and the whole-run ETA of training (`RunClock`). Every long phase reports through
`Progress`: LS init, training, evaluation, `snnet latency`, `snnet export`."""
from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable
from typing import IO

from snnet.utils.distributed import world

_logger = logging.getLogger("snnet")
PROGRESS_SECONDS = 10.0  # phases without a step interval of their own log a line at most this often (and at the end)


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """One phase of long work: ``update(step, items)`` after each of its `total` steps.

    A line is logged every `every` steps, whenever `seconds` have passed since the last line, and at the last step
    (a phase of unknown length, ``total=None``, logs no ETA and no last line of its own: call `finish`):

        Train: 3 [  20/22] loss 0.81 (avg 0.93) lr 5.0e-04: 870.0 img/s, elapsed 0:21, ETA 0:02, run ETA 1:05

    `unit` names the `items` counted for the rate (None: no rate); ``per_phase=(n, "stitches")`` adds the rate at
    which n things of the whole phase complete (n x fraction done / elapsed, e.g. stitches evaluated per second);
    `run_eta` maps this phase's remaining seconds to the whole run's (training: `RunClock.remaining`); `done` steps
    were finished before this object was made (a resumed epoch) and count neither for the rate nor for the ETA.

    Lines go to the ``snnet`` logger (rank 0 only, when the program configured logging, as train.py does), or
    straight to stderr where nothing configured logging (the ``snnet`` command). When stderr is a terminal, a live
    bar is redrawn between the lines; a log file (not a terminal) never gets one, so it has no carriage returns.
    """

    def __init__(self, what: str, total: int | None, every: int = 0, unit: str | None = "img",
                 seconds: float | None = None, per_phase: tuple[float, str] | None = None,
                 run_eta: Callable[[float], float | None] | None = None, done: int = 0, stream: IO | None = None):
        self.what, self.total, self.every, self.unit = what, total, max(0, int(every or 0)), unit
        self.seconds, self.per_phase, self.run_eta, self.done = seconds, per_phase, run_eta, done
        self.start = self.last_line = self.last_bar = time.perf_counter()
        self.items, self.step = 0, done
        self.stream = stream if stream is not None else sys.stderr
        self.bar = _is_tty(self.stream) and _enabled()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def eta(self, step: int | None = None) -> float | None:
        """Seconds left in this phase at the measured pace, or None before the first step or when total is unknown."""
        step = self.step if step is None else step
        if self.total is None or step <= self.done:
            return None
        return self.elapsed / (step - self.done) * max(self.total - step, 0)

    def advance(self, items: int = 0, extra: str = "") -> None:
        """``update`` of the next step."""
        self.update(self.step + 1, items, extra)

    def due(self, step: int) -> bool:
        """Whether `update(step)` logs a line."""
        last = self.total is not None and step >= self.total
        return bool(last or (self.every and step % self.every == 0) or
                    (self.seconds is not None and time.perf_counter() - self.last_line >= self.seconds))

    def update(self, step: int, items: int = 0, extra: str = "") -> None:
        self.step, self.items = step, self.items + items
        now = time.perf_counter()
        last = self.total is not None and step >= self.total
        if self.due(step):
            self.last_line = now
            emit(self.line(extra), self.stream if self.bar else None)
        elif self.bar and now - self.last_bar >= 0.1:
            self.last_bar = now
            _draw_bar(self.stream, self._bar_text())
        if last and self.bar:
            _clear_bar(self.stream)

    def finish(self, extra: str = "") -> None:
        """The closing line of a phase whose length was not known (``total=None``)."""
        emit(self.line(extra), self.stream if self.bar else None)
        if self.bar:
            _clear_bar(self.stream)

    def line(self, extra: str = "") -> str:
        elapsed, parts = self.elapsed, []
        if self.unit is not None:
            parts.append(f"{self.items / max(elapsed, 1e-9):.1f} {self.unit}/s")
        if self.per_phase is not None and self.total:
            n, name = self.per_phase
            parts.append(f"{n * (self.step - self.done) / self.total / max(elapsed, 1e-9):.2f} {name}/s")
        parts.append(f"elapsed {fmt_time(elapsed)}")
        eta = self.eta()
        if eta is not None:
            parts.append(f"ETA {fmt_time(eta)}")
        if self.run_eta is not None:
            run = self.run_eta(eta or 0.0)
            if run is not None:
                parts.append(f"run ETA {fmt_time(run)}")
        count = f"{self.step:>4d}/{self.total}" if self.total is not None else f"{self.step:>4d}"
        return f"{self.what} [{count}]{' ' + extra if extra else ''}: {', '.join(parts)}"

    def _bar_text(self, width: int = 24) -> str:
        eta = self.eta()
        if self.total:
            fill = int(width * min(self.step / self.total, 1.0))
            bar = f"|{'#' * fill}{'-' * (width - fill)}| {self.step}/{self.total}"
        else:
            bar = f"{self.step}"
        return f"{self.what} {bar} {fmt_time(self.elapsed)}" + (f" ETA {fmt_time(eta)}" if eta is not None else "")


def _is_tty(stream: IO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or odd streams: no bar
        return False


def _enabled() -> bool:
    """Whether progress lines are shown here: through logging where it is configured (its level decides: train.py
    raises it to WARNING on ranks > 0), else on rank 0."""
    if _logger.hasHandlers():
        return _logger.isEnabledFor(logging.INFO)
    return world(launched=True)[0] == 0


def emit(message: str, bar_stream: IO | None = None) -> None:
    """One progress line: to the ``snnet`` logger where logging is configured, else to stderr (rank 0). A live bar
    on `bar_stream` is cleared first."""
    if bar_stream is not None:
        _clear_bar(bar_stream)
    if _logger.hasHandlers():
        _logger.info(message)
    elif _enabled():
        print(message, file=sys.stderr, flush=True)


def _draw_bar(stream: IO, text: str) -> None:
    width = shutil.get_terminal_size((100, 20)).columns - 1
    stream.write("\r" + text[:width] + "\x1b[K")
    stream.flush()


def _clear_bar(stream: IO) -> None:
    stream.write("\r\x1b[K")
    stream.flush()


class RunClock:
    """The whole-run ETA of training: the rest of this epoch, the epochs after it at the measured epoch time (the
    mean of the last `recent` epochs, training, validation and checkpoint together, so that a changed pace shows
    within a few epochs; before the first one ends, this epoch's training projected to its end) and the final
    evaluation of all `num_configs` stitches on `eval_images` images per process, `passes` times (2 with an EMA; no
    images: none).

    The final evaluation is estimated from the last validation of the panel (`validated`: its time per stitch), or
    before any from the training pace (`trained`: seconds per image, a forward pass being about a third of a
    training step): an upper bound where stitches share prefixes (computed once per batch).
    """

    def __init__(self, epochs: range, num_configs: int = 1, eval_images: int = 0, passes: int = 1, recent: int = 5):
        self.end, self.epoch, self.recent = epochs.stop, epochs.start, max(1, recent)
        self.num_configs, self.eval_images, self.passes = num_configs, eval_images, passes
        self.times: list[float] = []
        self.final_eval, self.measured = 0.0, False
        self.epoch_start: float | None = None
        self.mark = 0.0

    def start(self, epoch: int) -> None:
        self.epoch, self.epoch_start = epoch, time.perf_counter()
        self.mark = self.epoch_start

    def trained(self, images: int) -> None:
        """This epoch's training loop ended after `images` images (this process)."""
        now = time.perf_counter()
        if not self.measured and images:
            self.final_eval = (now - self.mark) / images / 3 * self.eval_images * self.num_configs * self.passes
        self.mark = now

    def validated(self, panel: int) -> None:
        """The validation of `panel` stitches (all its passes) ended."""
        now = time.perf_counter()
        if panel and self.eval_images:
            self.final_eval, self.measured = (now - self.mark) * self.num_configs / panel, True
        self.mark = now

    def finish(self) -> float:
        """End of the current epoch; returns its duration in seconds."""
        took = time.perf_counter() - (self.epoch_start or time.perf_counter())
        self.times.append(took)
        self.epoch_start = None
        return took

    def remaining(self, epoch_left: float | None = None) -> float:
        """Seconds to the end of the run; `epoch_left` is what the current epoch's training loop still needs."""
        after, last = max(self.end - self.epoch - 1, 0), self.times[-self.recent:]
        if self.epoch_start is None:  # between epochs: the current one is done
            per_epoch = sum(last) / len(last) if last else 0.0
            return after * per_epoch + self.final_eval
        in_epoch, left = time.perf_counter() - self.epoch_start, epoch_left or 0.0
        if last:
            per_epoch = sum(last) / len(last)
            this = max(per_epoch - in_epoch, left)
        else:
            per_epoch, this = in_epoch + left, left
        return this + after * per_epoch + self.final_eval

    def summary(self, took: float) -> str:
        """E.g. 'epoch 4/30 took 0:02; run ETA 1:00 (final evaluation of 12 stitches ~0:05)', after `finish`."""
        what = f"{self.num_configs} stitches" if self.num_configs > 1 else "the network"
        final = f" (final evaluation of {what} ~{fmt_time(self.final_eval)})" if self.eval_images else ""
        return f"epoch {self.epoch + 1}/{self.end} took {fmt_time(took)}; run ETA {fmt_time(self.remaining())}{final}"
