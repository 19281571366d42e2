"""Slurm without a cluster: an srun task's variables mapped to torch.distributed's, the batch script and torchrun
left alone, and the stitch-train Slurm flags refused in one line when they cannot be used (the jobs themselves run
on a real cluster in tests/test_slurm.py)."""
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import FAST, ROOT, assert_refused, run_cli

from snnet.utils import slurm

TASK = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]", "MASTER_ADDR": "gpu01"}


def test_an_srun_task_gets_its_rank_world_and_local_rank_from_slurm():
    env = slurm.torch_env(TASK)
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_PORT": str(slurm.master_port(TASK))}
    assert 20000 <= int(env["MASTER_PORT"]) < 29500
    # a requeued job meets on another port; every task of one attempt on the same one
    assert slurm.master_port({**TASK, "SLURM_RESTART_COUNT": "1"}) != slurm.master_port(TASK)
    assert slurm.master_port({**TASK, "SLURM_PROCID": "0"}) == slurm.master_port(TASK)
    assert slurm.torch_env({**TASK, "SLURM_STEP_NUM_TASKS": "2"})["WORLD_SIZE"] == "2"  # the step's own tasks


def test_the_batch_script_and_torchrun_are_not_srun_tasks():
    batch = {k: v for k, v in TASK.items() if k != "SLURM_STEP_ID"}  # SLURM_PROCID 0 and SLURM_NTASKS there too
    assert slurm.torch_env(batch) == {} and not slurm.in_slurm_task(batch)
    assert slurm.torch_env({**TASK, "RANK": "0"}) == {}  # torchrun inside an allocation sets its own ranks
    assert slurm.restart_count({"SLURM_RESTART_COUNT": "2"}) == 2 and slurm.restart_count({}) == 0


def test_master_address_without_scontrol_names_the_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    env = {k: v for k, v in TASK.items() if k != "MASTER_ADDR"}
    with pytest.raises(slurm.SlurmError, match="set MASTER_ADDR"):
        slurm.torch_env(env)


def test_train_sbatch_outside_a_job_is_one_line():
    r = subprocess.run(["bash", "slurm/train.sbatch", "data"], cwd=ROOT, capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": ROOT})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not inside a Slurm job" in r.stderr


@pytest.mark.parametrize("argv, needles", [
    (["--submit", "--merge"], ["--submit and --merge"]),
    (["--sbatch=--time=1:00"], ["add --submit"]),
    (["--submit", "--max-parallel", "0"], ["--max-parallel 0"]),
])
def test_stitch_train_slurm_flags_refused_in_one_line(capsys, tmp_path, argv, needles):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("data: d\nout: o\nanchors: {a: deit_tiny_patch16_224}\nruns: [{pair: [a, a], cut: 0}]\n")
    rc, _, err = run_cli(capsys, "stitch-train", "--sweep", sweep, *argv)
    assert_refused(rc, err, *needles)


def test_submit_needs_a_sweep_file(capsys):
    rc, _, err = run_cli(capsys, "stitch-train", "data", "--front", "deit_tiny_patch16_224", "--end",
                         "deit_tiny_patch16_224", "--cut", "0", "--out", "o", "--submit")
    assert_refused(rc, err, "--submit and --task need --sweep FILE")


def _catches(pid, signum):
    """True once process `pid` has a handler for `signum` (the SigCgt mask of /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (FileNotFoundError, StopIteration):
        return False
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/PID/status")
@pytest.mark.slow
def test_a_warning_signal_during_start_up_is_noted_not_fatal(tmp_path, digits_folder, tiny_config):
    """Under Slurm, train.py catches SIGUSR1 from its first lines, before torch is imported (seconds): a warning
    that arrives while the job is still starting stops the run after its first step with a recovery checkpoint
    (exit 75: the batch script requeues), instead of killing it (exit 138, no requeue) as when the handler was
    installed only once training started. A real process, not a forked one: the start-up is what is tested."""
    cmd = [sys.executable, "train.py", str(digits_folder), "--stitch_config", str(tiny_config), *FAST,
           "--epochs", "1", "--output", str(tmp_path), "--experiment", "early"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "77", "PYTHONPATH": ROOT}
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 5
    while not _catches(p.pid, signal.SIGUSR1) and time.monotonic() < end and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGUSR1)  # at the latest 5 s in: the child is still importing torch and timm
    out, err = p.communicate(timeout=300)
    assert p.returncode == 75, err[-3000:]
    assert "preempted: SIGUSR1 after step 1 (epoch 0, step 1 of" in err, err[-3000:]
    assert (tmp_path / "early" / "recovery.pth.tar").exists()
