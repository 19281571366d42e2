"""Short runs that do what they say: a warm-up not shorter than the run is clipped to none with one line
(refused when typed), so a 3-epoch run trains at the LR its log names; the loader's worker default is at most the
usable cores, and says what it chose."""
from __future__ import annotations

import csv
import os
import re
import sys

import pytest
from helpers import run

from snnet.data import loaders
from snnet.train.args import fitted_notes, parse_args
from snnet.train.optim import fit_warmup
from snnet.utils.errors import UsageError

QUICK = ["--img-size", "16", "-b", "16", "--no-pretrained", "--log-interval", "5", "--seed", "1", "-j", "0"]


def test_fit_warmup():
    assert fit_warmup(5, 300, typed=False) == (5, None) and fit_warmup(0, 3, typed=True) == (0, None)
    assert fit_warmup(2, 3, typed=True) == (2, None)
    warmup, note = fit_warmup(5, 3, typed=False)
    assert warmup == 0 and "5 epochs" in note and "3 epochs" in note and "--warmup-epochs N below 3" in note
    assert "(from the stitch config 'c.json')" in fit_warmup(5, 3, typed=False, source="stitch config 'c.json'")[1]
    with pytest.raises(UsageError, match=r"--warmup-epochs 3 is not shorter than --epochs 3.*below 3"):
        fit_warmup(3, 3, typed=True)


def test_parse_args_fits_the_default_and_refuses_the_typed(tiny_config, tmp_path):
    base = [str(tmp_path), "--stitch_config", str(tiny_config)]
    args, _ = parse_args([*base, "--epochs", "3"])  # the line is logged once the run's inputs passed their checks
    assert args.warmup_epochs == 0 and any("not shorter than the run's 3 epochs" in n for n in fitted_notes())
    assert any("warm-up: 5 epochs (timm's default) is" in n for n in fitted_notes())  # the one source, named
    yaml = tmp_path / "recipe.yaml"
    yaml.write_text("warmup-epochs: 4\n")
    assert parse_args([*base, "-c", str(yaml), "--epochs", "3"])[0].warmup_epochs == 0
    assert any(f"warm-up: 4 epochs (from -c/--config {str(yaml)!r}) is" in n for n in fitted_notes())
    assert parse_args([*base, "--epochs", "30"])[0].warmup_epochs == 5  # timm's default where it fits
    with pytest.raises(UsageError, match="--warmup-epochs 5 is not shorter than --epochs 3"):
        parse_args([*base, "--epochs", "3", "--warmup-epochs=5"])


def test_worker_default_fits_the_cores(monkeypatch, tiny_config, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert loaders.default_workers()[0] == 2 and "2 usable core(s)" in loaders.default_workers()[1]
    args, _ = parse_args([str(tmp_path), "--stitch_config", str(tiny_config)])
    assert args.workers == 2 and any("not timm's 4" in n for n in fitted_notes())
    for typed in (["-j", "4"], ["-j4"], ["--workers=4"]):  # typed wins, even timm's number
        assert parse_args([str(tmp_path), "--stitch_config", str(tiny_config), *typed])[0].workers == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert loaders.default_workers() == (4, None)


@pytest.mark.slow  # ~8-12 s: 3 epochs of a tiny SN-Net on 160 digits
def test_a_3_epoch_run_logs_the_lr_it_uses(digits_folder, tiny_config, tmp_path):
    """--epochs 3 --lr 0.05 with timm's default 5-epoch warm-up: the first epoch trains at 0.05, the LR the start
    line names (it trained at 1e-5 before: the whole run was warm-up), and the cosine schedule decays from there."""
    done = run([sys.executable, "train.py", str(digits_folder), "--stitch_config", str(tiny_config), *QUICK,
                "--opt", "sgd", "--lr", "0.05", "--epochs", "3", "--output", str(tmp_path), "--experiment", "short"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warm-up: 5 epochs" in done.stderr and "this run has none" in done.stderr
    logged = float(re.search(r"network\(s\); lr ([\d.e+-]+)", done.stderr)[1])
    with open(tmp_path / "short" / "summary.csv") as f:
        used = [float(row["lr"]) for row in csv.DictReader(f)]
    assert logged == pytest.approx(0.05) and used[0] == pytest.approx(logged)
    assert len(used) == 3 and used[0] > used[1] > used[2] > 0
