"""kill -9 at a random step, resume, and the rest of the run is bit-for-bit the uninterrupted run."""
import json
import random
import sys

import pytest
import torch
from helpers import FAST, run

# everything that draws random numbers: shuffling, loader workers, random erasing, mixup, drop-path, stitch sampling
RNG_HEAVY = ["--epochs", "3", "--reprob", "0.5", "--mixup", "0.3", "--drop-path", "0.1", "-j", "1"]
STEPS_PER_EPOCH = 10  # 160 training images, batch 16


def final_state(run_dir):
    return torch.load(run_dir / "last.pth.tar", weights_only=True)


def assert_identical(a, b):
    sa, sb = final_state(a), final_state(b)
    assert (sa["epoch"], sa["global_step"]) == (sb["epoch"], sb["global_step"])
    assert sa["state_dict"].keys() == sb["state_dict"].keys()
    for k, v in sa["state_dict"].items():
        assert torch.equal(v, sb["state_dict"][k]), k
    ra = [json.loads(l)["acc1"] for l in (a / "stitches_res.txt").read_text().splitlines()]
    rb = [json.loads(l)["acc1"] for l in (b / "stitches_res.txt").read_text().splitlines()]
    assert ra == rb
    assert (a / "summary.csv").read_bytes() == (b / "summary.csv").read_bytes()  # bytes: line endings included


def test_truncate_summary_keeps_the_rows_bytes(tmp_path):
    """timm's csv writer ends rows with \\r\\n: the rows a resume keeps come back byte for byte (a text-mode rewrite
    turned them into \\n, leaving a summary.csv of mixed line endings after every resume past epoch 0)."""
    from snnet.train.resume import truncate_summary
    path = tmp_path / "summary.csv"
    rows = b"epoch,train_loss,lr\r\n0,2.5,0.1\r\n1,2.25,0.1\r\n2,2.0,0.1\r\n"
    path.write_bytes(rows)
    truncate_summary(path, 2)
    assert path.read_bytes() == b"epoch,train_loss,lr\r\n0,2.5,0.1\r\n1,2.25,0.1\r\n"


@pytest.mark.slow
def test_val_interval_validates_every_nth_epoch_and_the_last(single, digits_folder, tiny_config, tmp_path):
    """--val-interval N validates epochs N-1, 2N-1, ... and always the last one (a run's metrics, model_best and
    summary.csv's last row come from it), and skipping validations leaves the trained weights bit-identical (snnet
    quickstart validates every 5th epoch): the `single` run (every epoch validated) again at interval 2."""
    from snnet.train.trainer import validates
    assert [e for e in range(7) if validates(e, 3, range(7))] == [2, 5, 6]
    assert [e for e in range(4, 6) if validates(e, 3, range(4, 6))] == [5]  # resumed at epoch 4
    assert [e for e in range(5) if validates(e, 1, range(5))] == [0, 1, 2, 3, 4]
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, *RNG_HEAVY,
             "--output", tmp_path, "--experiment", "every2", "--val-interval", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = final_state(single / "whole")["state_dict"], final_state(tmp_path / "every2")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (tmp_path / "every2" / "summary.csv").read_bytes().split(b"\r\n")[:-1]  # timm's row ends
    header, cells = rows[0].split(b","), [row.split(b",") for row in rows[1:]]
    assert header == (single / "whole" / "summary.csv").read_bytes().split(b"\r\n")[0].split(b",")  # every column
    assert all(len(c) == len(header) for c in cells), rows  # the header once had epoch 0's 3 columns only
    top1 = header.index(b"eval_top1")
    assert [bool(c[top1]) for c in cells] == [False, True, True]  # epochs 0, 1 (every 2nd) and 2 (the last)


def kill_step(seed, processes=1):
    per_epoch = STEPS_PER_EPOCH // processes
    step = random.Random(seed).randint(per_epoch + 1, 2 * per_epoch - 1)  # inside the 2nd epoch
    print(f"killing at step {step}")
    return step


@pytest.fixture(scope="module")
def single(tmp_path_factory, digits_folder, tiny_config):
    out = tmp_path_factory.mktemp("single")
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, *RNG_HEAVY,
             "--output", out, "--experiment", "whole"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.slow
def test_a_finished_run_trained_on_sets_its_earlier_results_aside(single, digits_folder, tiny_config, tmp_path):
    """--auto-resume with more --epochs continues a finished run (docs/robustness.md): its final evaluation writes
    the new weights' results and keeps the earlier end's results and predictions under their checkpoint's hash,
    where it once refused its own folder's results file after training."""
    import shutil

    from snnet.results.records import file_sha256
    run_dir = tmp_path / "whole"
    shutil.copytree(single / "whole", run_dir)
    before = (run_dir / "stitches_res.txt").read_text()
    old = json.loads(before.splitlines()[0])["checkpoint_sha256"]
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, *RNG_HEAVY, "--epochs",
             "4", "--output", tmp_path, "--experiment", "whole", "--auto-resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert final_state(run_dir)["epoch"] == 3
    now = [json.loads(ln) for ln in (run_dir / "stitches_res.txt").read_text().splitlines()]
    assert {rec["checkpoint_sha256"] for rec in now} == {file_sha256(run_dir / "last.pth.tar")}
    assert (run_dir / f"stitches_res.{old[:12]}.txt").read_text() == before
    assert (run_dir / f"stitches_pred.{old[:12]}.npz").is_file() and (run_dir / "stitches_pred.npz").is_file()


@pytest.mark.slow
def test_one_process_kill_and_resume_is_bit_identical(single, digits_folder, tiny_config):
    step = kill_step(1)
    cmd = [sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, *RNG_HEAVY, "--output",
           single, "--experiment", "killed"]
    r = run(cmd, env={"SNNET_FAULT_KILL_AT_STEP": str(step)})
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL
    assert final_state(single / "killed")["epoch"] == 0  # the epoch-0 checkpoint survived the kill
    r = run(cmd + ["--resume", single / "killed" / "last.pth.tar"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical(single / "whole", single / "killed")


# the launch's preflight checks (snnet.train.launch) run in the `double` fixture's launch; the launches that only
# kill and resume skip them (tests/test_launch_checks.py tests the checks themselves)
NO_PREFLIGHT = {"SNNET_NO_PREFLIGHT": "1"}


@pytest.fixture(scope="module")
def double(tmp_path_factory, digits_folder, tiny_config):
    out = tmp_path_factory.mktemp("double")
    r = run(["./distributed_train.sh", "2", digits_folder, "--stitch_config", tiny_config, *FAST, *RNG_HEAVY,
             "--output", out, "--experiment", "whole"])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.mark.dist
def test_two_processes_kill_one_rank_and_auto_resume_is_bit_identical(double, digits_folder, tiny_config):
    step = kill_step(2, processes=2)  # 5 steps per epoch each
    cmd = ["./distributed_train.sh", "2", digits_folder, "--stitch_config", tiny_config, *FAST, *RNG_HEAVY,
           "--output", double, "--experiment", "killed", "--auto-resume"]
    r = run(cmd, env={**NO_PREFLIGHT, "SNNET_FAULT_KILL_AT_STEP": str(step), "SNNET_FAULT_RANK": "1"})
    assert r.returncode != 0
    assert (double / "killed" / "last.pth.tar").is_file(), r.stderr[-3000:]  # killed in epoch 2, not before
    assert final_state(double / "killed")["epoch"] == 0
    r = run(cmd, env=NO_PREFLIGHT)  # --auto-resume finds killed/last.pth.tar
    assert r.returncode == 0, r.stderr[-3000:]
    assert "auto-resume: continuing from" in r.stderr + r.stdout
    assert_identical(double / "whole", double / "killed")


@pytest.mark.dist
def test_torchrun_max_restarts_restarts_from_the_last_checkpoint(double, digits_folder, tiny_config):
    """One command: rank 0 is killed in epoch 2, torchrun restarts both workers, they resume automatically."""
    step = kill_step(3, processes=2)
    r = run(["./distributed_train.sh", "2", digits_folder, "--stitch_config", tiny_config, *FAST, *RNG_HEAVY,
             "--output", double, "--experiment", "restarted"],
            env={**NO_PREFLIGHT, "SNNET_FAULT_KILL_AT_STEP": str(step), "SNNET_FAULT_RANK": "0",
                 "TORCHRUN_ARGS": "--max-restarts=3"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "auto-resume: continuing from" in r.stderr + r.stdout
    assert_identical(double / "whole", double / "restarted")


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.dist
def test_recovery_checkpoint_resumes_inside_the_epoch_bit_identical(processes, single, double, digits_folder,
                                                                   tiny_config):
    """--recovery-interval writes recovery.pth.tar mid-epoch (RNG of every rank, the epoch's partial loss); a run
    killed after it continues from that step, not from the epoch start, and ends bit-identical."""
    base = single if processes == 1 else double
    per_epoch = STEPS_PER_EPOCH // processes
    interval, step = 2, per_epoch + 3  # killed in epoch 1, after a recovery save at the same or the previous step
    saved = step - step % interval
    launch = [sys.executable, "train.py"] if processes == 1 else ["./distributed_train.sh", "2"]
    cmd = [*launch, digits_folder, "--stitch_config", tiny_config, *FAST, *RNG_HEAVY, "--output", base,
           "--experiment", "recovered", "--auto-resume", "--recovery-interval", str(interval)]
    r = run(cmd, env={**NO_PREFLIGHT, "SNNET_FAULT_KILL_AT_STEP": str(step), "SNNET_FAULT_RANK": "0"})
    assert r.returncode != 0
    rec = torch.load(base / "recovered" / "recovery.pth.tar", weights_only=True)
    assert (rec["epoch"], rec["batch_idx"], rec["global_step"]) == (1, saved - per_epoch, saved)
    assert len(rec["ranks"]) == processes
    r = run(cmd, env=NO_PREFLIGHT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "auto-resume: continuing from" in r.stderr + r.stdout and "recovery.pth.tar" in r.stderr + r.stdout
    assert not (base / "recovered" / "recovery.pth.tar").exists()  # superseded by the epoch checkpoints
    assert_identical(base / "whole", base / "recovered")
