"""Progress lines for long work: one log line per interval with rate and ETA (no carriage returns in log files)."""
from __future__ import annotations

import logging
import time

_logger = logging.getLogger("snnet")


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """``update(step, items)`` after each of `total` steps logs every `every` steps and at the last one."""

    def __init__(self, what: str, total: int, every: int, unit: str = "img"):
        self.what, self.total, self.every, self.unit = what, total, max(1, every), unit
        self.start = time.perf_counter()
        self.items = 0

    def update(self, step: int, items: int, extra: str = "") -> None:
        self.items += items
        if step % self.every and step != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.items / max(elapsed, 1e-9)
        eta = elapsed / max(step, 1) * (self.total - step)
        _logger.info(f"{self.what} [{step:>4d}/{self.total}] {extra} {rate:.1f} {self.unit}/s "
                     f"elapsed {fmt_time(elapsed)} eta {fmt_time(eta)}")
