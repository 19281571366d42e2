"""train.py and stitch-train on a real Slurm cluster on this machine (tests/slurm_cluster.py; `make slurm` installs
slurm-wlm and munge): a 2-task job of slurm/train.sbatch preempted mid-epoch, by `scontrol requeue` (SIGTERM) and by
the job's warning signal (SIGUSR1, the job requeues itself), ends bit-identical to an uninterrupted 2-process run; a
warning during the preflight requeues; of two jobs into one folder one is refused; a 2-run
sweep runs as a job array and its results are merged into one stitches_res.txt. Skipped, saying why, without root or
the packages."""
import shutil
import sys
import tempfile
import time

import pytest
from helpers import FAST, ROOT, run, with_faults
from slurm_cluster import LocalCluster, why_not
from test_resume import assert_identical, final_state

pytestmark = [pytest.mark.slurm, pytest.mark.dist, pytest.mark.slow]

FLAGS = [*FAST, "--epochs", "2", "--reprob", "0.5", "--mixup", "0.3", "--drop-path", "0.1"]
WAIT_STEP = 7  # 2 tasks x 80 images / batch 16: 5 steps per epoch; step 7 is inside the second epoch
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = why_not()
    if reason:
        pytest.skip(reason)
    folder = tempfile.mkdtemp(prefix="snnet-slurm-")  # not under pytest's 0700 folder: munged runs as user munge
    c = LocalCluster(folder)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        shutil.rmtree(folder, ignore_errors=True)


def submit_train(cluster, out, name, digits_folder, tiny_config, env=None):
    log = out / f"{name}.log"
    r = cluster.run("sbatch", "--parsable", "--ntasks=2", "--cpus-per-task=1", f"--output={log}",
                    f"--job-name={name}", "slurm/train.sbatch", digits_folder, "--stitch_config", tiny_config, *FLAGS,
                    "--output", out, "--experiment", name, cwd=ROOT,
                    env=with_faults({"OMP_NUM_THREADS": "1", **(env or {})}))
    return r.stdout.strip().split(";")[0], log


def wait_done(cluster, job, log, timeout=240):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = cluster.job(job)
        if info.get("JobState") in DONE:
            return info
        time.sleep(0.2)
    raise AssertionError(f"job {job} not done in {timeout} s: {cluster.job(job)}\n{log.read_text()[-3000:]}")


def wait_file(path, job, cluster, log, timeout=180):
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end or cluster.job(job).get("JobState") in DONE:
            raise AssertionError(f"{path} never appeared\n{log.read_text()[-3000:] if log.exists() else ''}")
        time.sleep(0.2)


def assert_identical_at_the_end(a, b):
    """Both runs went all the way (2 epochs of 5 steps) and ended bit-identical (test_resume's comparison)."""
    state = final_state(a)
    assert (state["epoch"], state["global_step"]) == (1, 10)
    assert_identical(a, b)


def test_preempted_jobs_are_requeued_and_resume_bit_identically(cluster, tmp_path, digits_folder, tiny_config):
    """Two 2-task jobs at once, preempted by `scontrol requeue` (SIGTERM) and by the warning signal (SIGUSR1: the job
    requeues itself), against an uninterrupted run of the same flags on 2 processes: `./distributed_train.sh 2`,
    forked (helpers.run) while the jobs start, the same computation as a 2-task job, whose ranks come from Slurm's
    environment instead of torchrun's. One test, not two: under pytest-xdist each test may land on another worker,
    and the reference run would then run twice."""
    out = tmp_path
    wait = {"SNNET_FAULT_WAIT_AT_STEP": str(WAIT_STEP), "SNNET_NO_PREFLIGHT": "1"}  # the preflight: the next test's
    jobs = {name: submit_train(cluster, out, name, digits_folder, tiny_config,
                               {**wait, "SNNET_FAULT_WAIT_FILE": str(out / f"{name}.waiting")})
            for name in ("requeued", "warned")}
    whole = run(["./distributed_train.sh", "2", digits_folder, "--stitch_config", tiny_config, *FLAGS,
                 "--output", out, "--experiment", "whole"], timeout=240)
    assert whole.returncode == 0 and "2 process(es)" in whole.stderr, whole.stderr[-3000:]
    for name in ("requeued", "warned"):  # both tasks wait after step WAIT_STEP until they get a signal
        job, log = jobs[name]
        for rank in (0, 1):
            wait_file(out / f"{name}.waiting.{rank}", job, cluster, log)
    cluster.run("scontrol", "requeue", jobs["requeued"][0])   # as a preemption: SIGTERM to every process
    cluster.run("scancel", "--batch", "--signal=USR1", jobs["warned"][0])  # as --signal=B:USR1@N before the time limit
    infos = {name: wait_done(cluster, job, log) for name, (job, log) in jobs.items()}
    logs = {name: log.read_text() for name, (_, log) in jobs.items()}

    for name, signal in (("requeued", "SIGTERM"), ("warned", "SIGUSR1")):
        log = logs[name]
        assert infos[name]["JobState"] == "COMPLETED" and infos[name]["Restarts"] == "1", log[-4000:]
        assert "2 task(s)" in log and "2 process(es)" in log, log[-4000:]
        assert f"preempted: {signal} after step {WAIT_STEP} (epoch 1, step 2 of 5)" in log, log[-4000:]
        assert "auto-resume: continuing from" in log and "recovery.pth.tar" in log, log[-4000:]
        if signal == "SIGUSR1":  # the job requeued itself
            assert "requeueing job" in log, log[-4000:]
        assert_identical_at_the_end(out / "whole", out / name)


# ---------------------------------------------------------------------------------------------------- sweep array
VIT = {"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 3, "num_heads": 2}}


def stitch_train(cluster, *argv):
    """`snnet stitch-train ARGV` against the cluster (helpers.run: forked, not a fresh interpreter); exit 0."""
    r = run([sys.executable, "-m", "snnet.cli", "stitch-train", *argv], env={"SLURM_CONF": str(cluster.conf)})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def wait_array(cluster, job, tasks, timeout=300):
    """Every task of array `job` ended; their states."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = cluster.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%i %T", check=False)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        if len(states) == tasks and all(s in DONE for s in states.values()):
            return states
        time.sleep(0.2)
    raise AssertionError(f"array {job} not done in {timeout} s: {states}")


def test_sweep_runs_as_a_job_array_skips_finished_runs_and_merges(cluster, digits_folder, tmp_path):
    """2 runs + 2 anchor evaluations = 4 array tasks; the last one writes stitches_res.txt. Deleting one run's
    result.json and submitting again sends that run alone; --merge rewrites the results from the finished runs."""
    import yaml

    from snnet.results.records import read_results
    out = tmp_path / "sweep"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "data": str(digits_folder), "out": str(out), "pretrained": False, "seed": 3,
        "anchors": {"v8": {**VIT, "model_kwargs": {**VIT["model_kwargs"], "embed_dim": 8}},
                    "v16": {**VIT, "model_kwargs": {**VIT["model_kwargs"], "embed_dim": 16}}},
        "train": {"img_size": 16, "batch_size": 32, "epochs": 1, "workers": 0, "hflip": 0, "log_interval": 1000},
        "run": {"ls_images": 32}, "grid": {"pair": [["v8", "v16"]], "cut": [0], "gap": [0, 1]}}, sort_keys=False))
    r = stitch_train(cluster, "--sweep", sweep, "--submit", "--sbatch=--cpus-per-task=1")
    assert "submitted job array" in r.stdout and "4 task(s), jobs 0,1,2,3" in r.stdout, r.stdout
    job = r.stdout.split("submitted job array ")[1].split(":")[0]
    states = wait_array(cluster, job, 4)
    logs = "".join(p.read_text() for p in sorted((out / "slurm").glob("task-*.out")))
    assert set(states.values()) == {"COMPLETED"}, (states, logs[-4000:])
    recs = {rec["cfg_id"]: rec for rec in read_results(out / "stitches_res.txt")}
    assert sorted(recs) == list(range(4)) and [recs[c]["route"] for c in (2, 3)] == ["v8", "v16"]
    assert "every job finished: results" in logs  # the last task merged
    before = {c: (out / "runs" / recs[c]["run"] / "result.json").read_text() for c in range(2)}

    assert "nothing to submit" in stitch_train(cluster, "--sweep", sweep, "--submit").stdout
    (out / "runs" / recs[1]["run"] / "result.json").unlink()
    (out / "stitches_res.txt").unlink()
    r = stitch_train(cluster, "--sweep", sweep, "--submit", "--sbatch=--cpus-per-task=1")
    assert "1 task(s), jobs 1 of the sweep" in r.stdout, r.stdout
    wait_array(cluster, r.stdout.split("submitted job array ")[1].split(":")[0], 1)
    again = {rec["cfg_id"]: rec for rec in read_results(out / "stitches_res.txt")}  # merged by that one task
    assert sorted(again) == list(range(4))
    after = {c: (out / "runs" / recs[c]["run"] / "result.json").read_text() for c in range(2)}
    assert [c for c in range(2) if after[c] != before[c]] == [1]
    assert again[1]["acc1"] == recs[1]["acc1"]  # the same run again: the same result
    (out / "stitches_res.txt").unlink()
    assert "every job finished" in stitch_train(cluster, "--sweep", sweep, "--merge").stdout
    assert sorted(rec["cfg_id"] for rec in read_results(out / "stitches_res.txt")) == list(range(4))


# ------------------------------------------------------------------------------------------ start-up and one folder
def submit_one(cluster, out, name, experiment, digits_folder, tiny_config):
    """A 1-task, 1-epoch job of slurm/train.sbatch with its preflight (the checks, then the folder's job lock)."""
    log = out / f"{name}.log"
    r = cluster.run("sbatch", "--parsable", "--ntasks=1", "--cpus-per-task=1", f"--output={log}",
                    f"--job-name={name}", "slurm/train.sbatch", digits_folder, "--stitch_config", tiny_config, *FLAGS,
                    "--epochs", "1", "--output", out, "--experiment", experiment, cwd=ROOT,
                    env={"OMP_NUM_THREADS": "1"})
    return r.stdout.strip().split(";")[0], log


def test_a_warning_during_the_preflight_requeues_and_two_jobs_in_one_folder_one_refused(cluster, tmp_path,
                                                                                        digits_folder, tiny_config):
    """The batch script traps SIGUSR1 before its preflight: a warning while the checks run requeues the job without
    starting its tasks (it was FAILED 138, never requeued). Two jobs started at once into one folder both pass the
    checks; the one that does not get the folder's job lock exits 2 with one line and starts nothing, the other
    completes. One test: under pytest-xdist each test may land on another worker (and cluster)."""
    out = tmp_path
    warned = submit_one(cluster, out, "warned", "warned", digits_folder, tiny_config)
    pair = [submit_one(cluster, out, f"twin{i}", "twins", digits_folder, tiny_config) for i in (0, 1)]
    job, log = warned
    end = time.monotonic() + 120
    while not (log.exists() and "(restart 0)" in log.read_text()):  # printed after the trap, before the preflight
        assert time.monotonic() < end and cluster.job(job).get("JobState") not in DONE, cluster.job(job)
        time.sleep(0.1)
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # the preflight imports torch for seconds: still in it
    infos = {name: wait_done(cluster, j, lg) for name, (j, lg) in
             {"warned": warned, "twin0": pair[0], "twin1": pair[1]}.items()}
    text = log.read_text()
    assert infos["warned"]["JobState"] == "COMPLETED" and infos["warned"]["Restarts"] == "1", text[-4000:]
    assert "SIGUSR1 before the tasks started" in text and "requeueing job" in text, text[-4000:]
    assert (out / "warned" / "last.pth.tar").exists()

    states = sorted((infos[f"twin{i}"]["JobState"], infos[f"twin{i}"]["ExitCode"], i) for i in (0, 1))
    assert [s[:2] for s in states] == [("COMPLETED", "0:0"), ("FAILED", "2:0")], states
    loser = pair[states[1][2]][1].read_text()
    errors = [line for line in loser.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by another" in errors[0] and "Traceback" not in loser, loser[-3000:]
    assert final_state(out / "twins")["epoch"] == 0  # the winner's run is whole
