"""What a launched rank would refuse is refused once before torchrun starts (`python -m snnet.train.preflight N`,
distributed_train.sh's check): the anchors' own checkpoints (missing, another width, another input size), and what
can still only fail inside a rank ends with its one line and exit 2, not torchrun's ChildFailedError banner. Also
the one rule for a stitch config's relative anchor checkpoints (docs/robustness.md)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FAST, ROOT, TINY, process_tree, run, shared_cli, start

from snnet.stitching.config import ConfigError, load_stitch_config

NO_SIZE = [a for i, a in enumerate(FAST) if a != "--img-size" and FAST[i - 1] != "--img-size"]


@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
    """The two TINY anchors trained (here: built) at image size 16 for 10 classes, saved as local checkpoints, and
    configs naming them."""
    import timm

    from snnet.utils.checkpoint import save_checkpoint
    w = tmp_path_factory.mktemp("anchors")
    specs = []
    for i, spec in enumerate(TINY):
        model = timm.create_model(spec["name"], pretrained=False, num_classes=10, img_size=16, **spec["model_kwargs"])
        save_checkpoint(w / f"a{i}.pth.tar", {"state_dict": model.state_dict(), "epoch": 0})
        specs.append({**spec, "checkpoint": str(w / f"a{i}.pth.tar")})
    write = lambda name, cfg: (w / name).write_text(json.dumps(cfg)) and w / name
    write("good.json", {"anchors": specs, "input_size": 16})
    write("missing.json", {"anchors": [specs[0], {**specs[1], "checkpoint": str(w / "no_such.pth.tar")}],
                           "input_size": 16})
    wide = {**specs[1], "model_kwargs": {**specs[1]["model_kwargs"], "embed_dim": 24}}
    write("embed_dim.json", {"anchors": [specs[0], wide], "input_size": 16})
    write("no_input_size.json", {"anchors": specs})  # built at the timm default, 224: not what they were trained at
    write("rso.json", {"anchors": TINY, "sampler": {"type": "rso"}})
    return w


@pytest.mark.parametrize("config,flags,needles", [
    ("missing.json", FAST, ["no_such.pth.tar"]),
    # the width is the cause, not the image size (the hint said "trained at image size 32 ... use img_size=32")
    ("embed_dim.json", FAST, ["width (embed_dim) is 16, the network's 24", "use embed_dim=16"]),
    ("no_input_size.json", NO_SIZE, ["trained at image size 16, the network built for 224"]),
    ("rso.json", FAST, ["sampler type 'rso' is not known"]),  # the sampler built, as each rank builds it
])
@pytest.mark.slow
def test_the_launch_check_reads_the_anchor_checkpoints(anchors, digits_folder, tmp_path, cli, config, flags, needles):
    """distributed_train.sh's check refuses, in one line and exit 2, what every rank would refuse when it loads its
    anchors (it exited 0, and torchrun's processes then failed one by one)."""
    code, _, err = cli.call("preflight", ["2", digits_folder, "--stitch_config", anchors / config, *flags,
                                          "--output", tmp_path])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_launch_check_passes_fitting_anchors_whatever_the_data_classes(anchors, digits_folder, tmp_path, cli):
    code, _, err = cli.call("preflight", ["2", digits_folder, "--stitch_config", anchors / "good.json", *FAST,
                                          "--output", tmp_path])
    assert code == 0, err


@pytest.mark.dist
def test_a_refusal_inside_the_ranks_is_one_line_not_torchruns_banner(anchors, digits_folder, tmp_path):
    """With the launch check skipped, every rank meets the missing anchor checkpoint itself: the launch ends with
    rank 0's one line and exit 2 (it was ~40 lines of ChildFailedError and exit 1)."""
    r = run(["./distributed_train.sh", "2", digits_folder, "--stitch_config", anchors / "missing.json", *FAST,
             "--output", tmp_path, "--experiment", "x"], env={"SNNET_NO_PREFLIGHT": "1"})
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(errors) == 1 and "no_such.pth.tar" in errors[0], r.stderr[-3000:]
    assert "ChildFailedError" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


RANK_SCRIPT = """import os, sys, time
from snnet.utils.distributed import say_refusal
rank = int(os.environ["RANK"])
time.sleep(30 if rank == 0 else 0)  # rank 1 refuses first; torchrun then stops rank 0 before it can say anything
say_refusal(f"error: refused on rank {rank}")
sys.exit(2)
"""


@pytest.mark.dist
def test_the_refusal_of_whichever_rank_failed_first_is_said(tmp_path):
    """The launch prints the line of the first rank that refused, also when that is not rank 0 (rank 0 printed for
    all ranks, and a launch whose rank 1 failed first ended in exit 2 with no line)."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    r = run([sys.executable, "-c", "import sys; from snnet.train.launch import main; sys.exit(main(sys.argv[1:]))",
             "--nproc_per_node=2", script], env={"SNNET_NO_PREFLIGHT": "1", "PYTHONPATH": ROOT}, timeout=60)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert r.returncode == 2 and errors == ["error: refused on rank 1"], r.stderr[-3000:]
    assert "ChildFailedError" not in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.dist
def test_a_launch_leaves_nothing_in_the_temp_folder(tmp_path):
    """torchrun makes a log folder (torchelastic_*) in the temp folder for every launch and leaves it there; the
    launcher's goes with the launch, as its folder for the ranks' refusals does. A fresh interpreter: the temp
    folder is read from TMPDIR once per process."""
    script, temp = tmp_path / "rank.py", tmp_path / "tmp"
    script.write_text("print('rank ran', flush=True)\n")
    temp.mkdir()
    r = subprocess.run([sys.executable, "-m", "snnet.train.launch", "--nproc_per_node=2", script], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "SNNET_NO_PREFLIGHT": "1", "TMPDIR": str(temp), "PYTHONPATH": ROOT})
    assert r.returncode == 0 and r.stdout.count("rank ran") == 2, r.stderr[-3000:]
    assert list(temp.iterdir()) == [], list(temp.rglob("*"))


HANGING_SCRIPT = """
import time


def waiting_in_the_rank():
    time.sleep(300)


print("rank started", flush=True)
waiting_in_the_rank()
"""


@pytest.mark.dist
def test_a_hung_launch_is_killed_whole_and_reported_with_its_stacks(tmp_path):
    """A call past its timeout (a test's launch that hangs: once in a suite run, test_resume's killed rank, CI gave
    no more than "timed out after 300 seconds") kills the launcher and every process under it, torchrun's ranks
    included, and raises with the end of the output and each process's Python stack at the timeout."""
    import helpers
    script = tmp_path / "hang.py"
    script.write_text(HANGING_SCRIPT)
    cli = shared_cli()  # the worker's fork server: a server of its own would import torch again (~6 CPU-s)
    with pytest.raises(helpers.Hung) as e:  # the ranks print and hang within ~1 s of the call (3 s under load)
        cli.call("torchrun", ["--nproc_per_node=2", str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                 timeout=8)
    report = str(e.value)
    assert "timed out after 8 seconds" in report and "rank started" in report, report[-3000:]
    assert helpers.process_tree(cli.proc.pid)[1:] == []  # the server alone: nothing of the call is under it
    if shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy"):
        assert report.count("waiting_in_the_rank") >= 2, report[-6000:]  # both ranks' stacks
        dumped = [int(p) for p in re.findall(r"py-spy dump --pid (\d+)", report)]
        deadline = time.monotonic() + 10
        while (alive := [p for p in dumped if Path(f"/proc/{p}").exists()
                         and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1][:3]]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(dumped) >= 3 and alive == [], (dumped, alive)  # launcher, ranks: killed, not left to run


@pytest.mark.slow
@pytest.mark.dist  # a 2-rank launch (forked)
def test_ctrl_c_ends_a_launch_in_one_line_with_exit_130(digits_folder, tiny_config, tmp_path):
    """SIGINT to the launcher, as Ctrl-C sends it: torchrun passes it on to the ranks, rank 0 says in one line how
    to continue, and the launch exits 130 without a traceback (it printed torchrun's SignalException and each rank's
    KeyboardInterrupt, and exited 1)."""
    log = tmp_path / "launch.log"
    p = start(["./distributed_train.sh", "2", digits_folder, "--stitch_config", tiny_config, *FAST, "--epochs", "50",
               "--output", tmp_path, "--experiment", "x"], log)
    try:
        end = time.monotonic() + 180
        while "Train:" not in (log.read_text() if log.exists() else ""):
            assert p.poll() is None and time.monotonic() < end, log.read_text()[-3000:] if log.exists() else ""
            time.sleep(0.2)
        os.kill(p.pid, signal.SIGINT)
        assert p.wait(60) == 130, log.read_text()[-3000:]
    finally:
        for pid in reversed(process_tree(p.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert text.count("interrupted; the same command with --auto-resume continues from the last checkpoint") == 1


# ------------------------------------------------------------------------ relative anchor checkpoints in a config
def test_a_relative_anchor_checkpoint_is_the_configs_and_a_second_candidate_is_refused(tmp_path, monkeypatch):
    """Relative to the config file's folder; relative to the working directory only where the config's folder has
    no such file; both existing as different files: refused, naming both (a stray ./out/anchor/last.pth.tar under
    the working directory silently won)."""
    cfg_dir, work = tmp_path / "cfg", tmp_path / "work"
    for d in (cfg_dir / "out", work / "out"):
        d.mkdir(parents=True)
    (cfg_dir / "c.json").write_text(json.dumps({"anchors": [{"name": "deit_tiny_patch16_224",
                                                              "checkpoint": "out/a.pth"}]}))
    monkeypatch.chdir(work)
    (work / "out" / "a.pth").write_bytes(b"stray")
    assert load_stitch_config(cfg_dir / "c.json").anchors[0].checkpoint == "out/a.pth"  # only there: the fallback
    (cfg_dir / "out" / "a.pth").write_bytes(b"meant")
    with pytest.raises(ConfigError) as e:
        load_stitch_config(cfg_dir / "c.json")
    assert str(cfg_dir / "out" / "a.pth") in str(e.value) and str(work / "out" / "a.pth") in str(e.value)
    (work / "out" / "a.pth").unlink()
    assert load_stitch_config(cfg_dir / "c.json").anchors[0].checkpoint == str(cfg_dir / "out" / "a.pth")
    monkeypatch.chdir(cfg_dir)  # one file reached both ways: no question
    assert load_stitch_config("c.json").anchors[0].checkpoint == "out/a.pth"


@pytest.mark.slow
def test_load_weights_names_the_width_not_the_image_size():
    """A ViT checkpoint of another embed_dim: the hint names the width (it named an image size to use)."""
    import timm

    from snnet.utils.checkpoint import image_size_hint
    kw = dict(patch_size=4, depth=1, num_heads=2, img_size=16)
    narrow = timm.create_model("deit_tiny_patch16_224", pretrained=False, embed_dim=16, **kw)
    wide = timm.create_model("deit_tiny_patch16_224", pretrained=False, embed_dim=24, **kw)
    hint = image_size_hint(wide, narrow.state_dict())
    assert "width (embed_dim) is 16" in hint and "image size" not in hint




def test_a_new_run_into_a_finished_runs_folder_is_refused(tmp_path, digits_folder, capsys, monkeypatch):
    """A run that trains from nothing into a folder holding a run's last.pth.tar would replace it at its first
    epoch: the launch's check refuses it, naming --auto-resume; with --auto-resume, or in a requeued Slurm job's
    check (its batch script runs again), it continues that run."""
    import timm

    from snnet.train.preflight import main
    from snnet.utils.checkpoint import save_checkpoint
    folder = tmp_path / "out" / "e"
    folder.mkdir(parents=True)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    save_checkpoint(folder / "last.pth.tar", {"state_dict": model.state_dict(), "epoch": 0,
                                              "args": json.dumps({"num_classes": 10})})
    before = (folder / "last.pth.tar").read_bytes()
    argv = ["1", str(digits_folder), "--model", "resnet18", *FAST, "--epochs", "2", "--output", str(tmp_path / "out"),
            "--experiment", "e"]
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"output folder '{folder}' holds a training run's last.pth.tar" in err and "--auto-resume" in err, err
    assert main([*argv, "--auto-resume"]) == 0, capsys.readouterr().err
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert main(argv) == 0, capsys.readouterr().err
    assert (folder / "last.pth.tar").read_bytes() == before


def test_more_processes_than_cpu_cores_are_warned_with_the_same_global_batch(tmp_path, digits_folder, capsys,
                                                                               monkeypatch):
    """./distributed_train.sh 8 (the README's GPU command) on a 2-core CPU: allowed, with one warning naming the
    process count that fits and the -b that keeps the global batch; within the cores, nothing is said."""
    from snnet.train import preflight
    monkeypatch.setattr(preflight, "usable_cores", lambda: 2)
    argv = [str(digits_folder), "--model", "resnet18", *FAST, "--epochs", "1", "--output", str(tmp_path / "out"),
            "-b", "6", "--device", "cpu"]
    assert preflight.main(["8", *argv]) == 0
    err = capsys.readouterr().err
    assert "warning: 8 training processes on the 2 CPU core(s) this launch may use take turns" in err, err
    assert "./distributed_train.sh 2 with -b 24 trains about the same global batch (48 images)" in err, err
    assert preflight.main(["2", *argv]) == 0
    assert "warning" not in capsys.readouterr().err
