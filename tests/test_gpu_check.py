"""benchmarks/gpu_check.py (`make gpu-check`): run here at toy size on the CPU so the script cannot rot before the
next GPU machine is lent; its refusal where no CUDA device is visible; its reading of pytest's report."""
import json
import sys

import pytest
import torch
from helpers import ROOT, run, shared_cli

SCRIPT = f"{ROOT}/benchmarks/gpu_check.py"


def gpu_check(*argv, env=None, timeout=600):
    """`python benchmarks/gpu_check.py ARGV` as `run` would start it, forked from helpers' server (its torch and
    timm imported once) instead of a fresh interpreter: (exit code, stdout, stderr)."""
    import os
    return shared_cli().call("script", [SCRIPT, *argv], env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                             timeout=timeout)


def _plant_an_earlier_run(work):
    """What an earlier `gpu_check.py --smoke --work WORK` leaves: the distributed step's results beside its
    checkpoint (records of that run's checkpoint, which a new evaluation there refuses as another checkpoint's) and
    every step's outcome file (a step that dies before writing its own must not be reported with the old one)."""
    run_dir = work / "distributed" / "train"
    run_dir.mkdir(parents=True)
    record = {"cfg_id": 0, "flops": 1, "params": 1, "acc1": 50.0, "acc5": 90.0, "loss": 1.0, "route": "x",
              "checkpoint_sha256": "0" * 64, "config_sha256": "0" * 64, "samples": 1, "data": "folder:x"}
    (run_dir / "stitches_res.txt").write_text(json.dumps(record) + "\n")
    for step in ("distributed", "train_step", "eval_all", "ls_init", "v2_step"):
        (work / f"{step}.result.json").write_text(json.dumps({"status": "failed", "cause": "the earlier run's"}))


@pytest.mark.slow
@pytest.mark.dist  # starts distributed_train.sh (torchrun) twice
def test_smoke_runs_every_step_and_writes_the_report(tmp_path):
    """Into a --work folder an earlier run left (a rerun must work)."""
    _plant_an_earlier_run(tmp_path / "work")
    code, stdout, stderr = gpu_check("--smoke", "--device", "cpu", "--out", tmp_path / "out", "--work",
                                     tmp_path / "work")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    md = list((tmp_path / "out").glob("*-smoke.md"))
    assert len(md) == 1, list((tmp_path / "out").iterdir())
    report = json.loads(md[0].with_suffix(".json").read_text())
    steps = report["steps"]
    assert list(steps) == ["cuda_tests", "distributed", "train_step", "eval_all", "ls_init", "v2_step"]
    assert steps["cuda_tests"]["status"] == "skipped" and "CUDA" in steps["cuda_tests"]["cause"]
    assert all(steps[s]["status"] == "ok" for s in list(steps)[1:]), {s: steps[s].get("cause") for s in steps}
    dist = steps["distributed"]["data"]
    assert dist["stitches"] == 23 and dist["max_acc1_diff"] == 0.0  # CPU on both sides: the same numbers
    assert steps["eval_all"]["data"]["identical"] is True and 0 < steps["eval_all"]["data"]["floor"] < 1
    assert steps["ls_init"]["data"]["layers"] == 22  # DeiT-Ti/S/B's stitching layers
    text = md[0].read_text()
    for needle in ("## Summary", "| distributed | ok |", "## train_step", "## eval_all", "## v2_step",
                   '"type": "lora"', f"| torch | {torch.__version__} |"):
        assert needle in text, needle
    assert "gpu-check summary" in stdout and not list((tmp_path / "out").glob("*.tmp*"))


@pytest.mark.slow
def test_without_cuda_one_line_and_exit_2(tmp_path):
    """Where no CUDA device is visible (CUDA_VISIBLE_DEVICES empty hides any), `make gpu-check` stops at once."""
    # a fresh interpreter (run): CUDA_VISIBLE_DEVICES is read when CUDA starts, which a forked process may inherit
    r = run([sys.executable, SCRIPT, "--out", tmp_path / "out"], env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "no CUDA device is visible" in lines[0], r.stderr
    assert not (tmp_path / "out").exists() and r.stdout == ""


def test_junit_report_gives_counts_and_one_line_causes(tmp_path):
    sys.path.insert(0, f"{ROOT}/benchmarks")
    import gpu_check
    xml = tmp_path / "r.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_cuda" name="test_a" time="1.5"/>
<testcase classname="tests.test_cuda" name="test_b" time="0.2"><failure message="AssertionError: [2.3, nan]&#10;more">
trace</failure></testcase>
<testcase classname="tests.test_cuda" name="test_c" time="0"><skipped message="needs nccl"/></testcase>
<testcase classname="tests.test_cuda" name="test_d" time="0"><error message="RuntimeError: No backend type | cpu"/>
</testcase></testsuite></testsuites>""")
    res = gpu_check.parse_junit(xml)
    assert res["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    rows = {r[0]: r for r in res["rows"]}
    assert rows["test_b"][1:] == ["failed", "0.2", "AssertionError: [2.3, nan]"]
    assert rows["test_d"][3] == "RuntimeError: No backend type \\| cpu"  # a table cell keeps its pipe


def test_failed_command_cause_is_the_workers_exception(tmp_path):
    """torchrun ends a failed run with its own ChildFailedError summary; the report names the worker's exception
    (or train.py's one-line error) instead."""
    sys.path.insert(0, f"{ROOT}/benchmarks")
    import gpu_check
    log = tmp_path / "train.log"
    log.write_text("12:00:01 data: ...\n[rank1]: Traceback (most recent call last):\n[rank1]:   File \"e.py\", line 3\n"
                   "[rank1]: RuntimeError: No backend type associated with device type cpu\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \ntrain.py FAILED\n")
    assert gpu_check.log_cause(log) == "[rank1]: RuntimeError: No backend type associated with device type cpu"
    log.write_text("note: x\nerror: --device 'cuda:9': CUDA is not available here; use --device cpu\n")
    assert gpu_check.log_cause(log).startswith("error: --device 'cuda:9'")


@pytest.mark.parametrize("argv,message", [
    (["--budget", "-5"], "gpu_check.py: error: --budget -5: must be > 0 seconds"),
    (["--budget", "0"], "gpu_check.py: error: --budget 0: must be > 0 seconds"),
    (["--steps", "nope"], "gpu_check.py: error: argument --steps: invalid choice: 'nope'"),
])
def test_usage_errors_one_line(tmp_path, argv, message):
    r = run([sys.executable, SCRIPT, "--device", "cpu", "--out", tmp_path / "out", *argv], timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(message), r.stderr
    assert not (tmp_path / "out").exists() and r.stdout == ""
