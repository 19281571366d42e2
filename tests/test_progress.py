"""Progress lines (utils/progress.py): rate and ETA per interval, the whole-run ETA of training, a live bar only on
a terminal, and a real run's log with an ETA line for LS init, training and evaluation and no carriage return."""
import io
import logging
import os
import re
import types

import pytest
from helpers import FAST, shared_cli

from snnet.utils import progress
from snnet.utils.progress import Progress, RunClock


class Clock:
    """A stand-in for the time module: perf_counter() returns `now`, moved by the test."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def lines_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "snnet"]


def test_line_every_interval_with_rate_eta_and_run_eta(clock, caplog):
    caplog.set_level(logging.INFO, logger="snnet")
    out = io.StringIO()  # not a terminal: no bar
    p = Progress("Work", 4, every=2, per_phase=(4, "stitches"), run_eta=lambda left: left + 60, stream=out)
    for step in range(1, 5):
        clock.now += 10.0  # 10 s per step of 8 images
        p.update(step, 8, "loss 1.0")
    lines = lines_of(caplog)
    assert lines == ["Work [   2/4] loss 1.0: 0.8 img/s, 0.10 stitches/s, elapsed 0:20, ETA 0:20, run ETA 1:20",
                     "Work [   4/4] loss 1.0: 0.8 img/s, 0.10 stitches/s, elapsed 0:40, ETA 0:00, run ETA 1:00"]
    assert out.getvalue() == ""


def test_time_interval_and_resumed_steps(clock, caplog):
    caplog.set_level(logging.INFO, logger="snnet")
    p = Progress("Calls", 10, seconds=25, unit=None, done=4, stream=io.StringIO())  # 4 steps were done before
    for step in range(5, 11):
        clock.now += 10.0
        p.update(step)
    # a line once 25 s have passed (step 7), then the last one; the ETA counts only the steps run here
    assert lines_of(caplog) == ["Calls [   7/10]: elapsed 0:30, ETA 0:30", "Calls [  10/10]: elapsed 1:00, ETA 0:00"]


def test_live_bar_only_on_a_terminal(clock, caplog):
    caplog.set_level(logging.INFO, logger="snnet")
    tty = Terminal()
    p = Progress("Eval", 3, every=3, stream=tty)
    for step in (1, 2):
        clock.now += 1.0
        p.update(step, 4)
    drawn = tty.getvalue()
    assert drawn.startswith("\r") and "Eval |################--------| 2/3" in drawn and "ETA 0:01" in drawn
    clock.now += 1.0
    p.update(3, 4)
    assert tty.getvalue().endswith("\r\x1b[K")  # the bar is cleared at the end
    assert lines_of(caplog) == ["Eval [   3/3]: 4.0 img/s, elapsed 0:03, ETA 0:00"]
    assert not any("\r" in line for line in lines_of(caplog))


def test_run_clock_whole_run_eta(clock):
    c = RunClock(range(0, 3), num_configs=12, eval_images=60)
    c.start(0)
    clock.now += 10
    assert c.remaining(epoch_left=20) == 20 + 2 * 30  # before any epoch ended: this epoch's training projected
    clock.now += 20
    c.trained(100)  # 0.3 s per image: the final evaluation ~ 0.1 s x 60 images x 12 stitches
    assert c.final_eval == pytest.approx(72)
    clock.now += 6
    c.validated(6)  # 6 s for 6 stitches: 12 s for all 12
    assert c.final_eval == pytest.approx(12)
    clock.now += 4
    took = c.finish()
    assert took == 40 and c.remaining() == pytest.approx(2 * 40 + 12)
    assert c.summary(took) == "epoch 1/3 took 0:40; run ETA 1:32 (final evaluation of 12 stitches ~0:12)"
    c.start(1)
    clock.now += 10
    assert c.remaining(epoch_left=15) == pytest.approx(30 + 40 + 12)  # the measured epoch time, 10 s of it spent
    c.trained(100)
    assert c.final_eval == pytest.approx(12)  # a measured validation is not replaced by the training estimate
    c = RunClock(range(0, 10), recent=2)  # a changed pace: the mean of the last `recent` epochs follows it
    for took in (40, 10, 20):
        c.start(c.epoch + 1 if c.times else 0)
        clock.now += took
        c.finish()
    assert c.epoch == 2 and c.remaining() == pytest.approx(7 * 15)
    one = RunClock(range(0, 1), num_configs=1, eval_images=60)  # a plain model: one network, no "stitches"
    one.start(0)
    clock.now += 5
    assert one.summary(one.finish()).endswith("run ETA 0:00 (final evaluation of the network ~0:00)")


def test_lines_go_to_stderr_where_logging_is_not_configured(monkeypatch, capsys):
    monkeypatch.setattr(progress._logger, "hasHandlers", lambda: False)  # as in the snnet command
    monkeypatch.delenv("RANK", raising=False)
    p = Progress("Latency at batch 1: calls", 2, unit="call", stream=io.StringIO())
    p.update(1, 1)
    p.update(2, 1)
    out, err = capsys.readouterr()
    assert out == "" and re.fullmatch(r"Latency at batch 1: calls \[   2/2\]: [\d.]+ call/s, elapsed 0:00, "
                                      r"ETA 0:00\n", err), err
    monkeypatch.setenv("RANK", "1")  # other ranks stay quiet
    Progress("Latency", 1, stream=io.StringIO()).update(1, 1)
    assert capsys.readouterr() == ("", "")


@pytest.mark.slow
def test_training_log_has_eta_lines_and_no_carriage_return(tmp_path, digits_folder, tiny_config):
    """train.py (forked from helpers' server: its imports done once) with stdout and stderr into one file, as the
    demo logs a run."""
    log = tmp_path / "train.log"
    code, _, _ = shared_cli().call("train", [digits_folder, "--stitch_config", tiny_config, "--epochs", "1",
                                             "--output", tmp_path, "--experiment", "p", *FAST],
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, log=log)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert b"\r" not in log.read_bytes()  # read_text() would turn a carriage return into a newline
    lines = text.splitlines()

    def find(pattern):
        found = [ln for ln in lines if re.search(pattern, ln)]
        assert found, (pattern, text[-3000:])
        return found

    find(r"LS init: solve \(layers\) \[\s*3/3\]: elapsed \d+:\d\d, ETA \d+:\d\d")
    train = find(r"Train: 0 \[\s*\d+/10\] loss [\d.]+ .*: [\d.]+ img/s, elapsed \d+:\d\d, ETA \d+:\d\d, "
                 r"run ETA \d+:\d\d$")
    assert len(train) == 2  # --log-interval 5 of 10 steps
    find(r"Eval 6 stitch\(es\) \[\s*4/4\]: [\d.]+ img/s, [\d.]+ stitches/s, elapsed \d+:\d\d, ETA \d+:\d\d")
    find(r"Eval 12 stitch\(es\) \[\s*4/4\]: .* stitches/s, .*ETA")  # the final evaluation of every stitch
    find(r"epoch 1/1 took \d+:\d\d; run ETA \d+:\d\d \(final evaluation of 12 stitches ~\d+:\d\d\)")
