"""The digits demo's machinery (snnet/demo.py) without its 3-minute run: anchor labels (w16, w32, w64) in routes,
the results-folder comparison behind `make demo-check`, the anchor reuse rule, and the summary's range metric.
The run itself is checked by `make demo-check` (docs/demo.md), too slow for the test suite."""
import hashlib
import json
from pathlib import Path

import pytest

from snnet import build_snnet, load_stitch_config
from snnet.demo import CONFIG, V2_CONFIGS, compare, train_anchor
from snnet.results.quality import in_anchor_range
from snnet.results.records import RESULTS_FILE, read_results, write_results
from snnet.stitching.config import ConfigError, parse_stitch_config
from snnet.train.options import RunOptions
from snnet.train.trainer import network_identity

ROOT = Path(__file__).resolve().parent.parent


def test_demo_configs_name_their_anchors():
    """Every demo config calls its anchors w16/w32/w64, so v1 and v2 (two anchors) agree that w64 is w64."""
    assert load_stitch_config(CONFIG).labels() == ["w16", "w32", "w64"]
    for config in V2_CONFIGS.values():
        assert load_stitch_config(config).labels() == ["w16", "w64"]


@pytest.mark.parametrize("config", [CONFIG, *V2_CONFIGS.values()], ids=lambda c: c.name)
def test_a_demo_config_alone_trains_with_the_demos_recipe(config):
    """`train.py DATA --stitch_config configs/demo_digits*.json` and nothing else trains as `make demo` does: the
    card's "recipe" holds the demo's SN-Net flags (one LR of 1e-3 for anchors and stitching layers, AdamW, the demo's
    epochs), where timm's defaults (SGD at LR 0.1) wreck the trained anchors within an epoch."""
    from snnet.demo import SNNET_EPOCHS
    from snnet.train.args import parse_args
    args, _ = parse_args(["output/demo/digits", "--stitch_config", str(config)], fit=False)
    got = {k: getattr(args, k) for k in ("opt", "lr", "anchor_lr_scale", "warmup_epochs", "epochs", "batch_size",
                                         "weight_decay", "scale", "hflip", "smoothing", "img_size")}
    assert got == {"opt": "adamw", "lr": 1e-3, "anchor_lr_scale": 1.0, "warmup_epochs": 1, "epochs": SNNET_EPOCHS,
                   "batch_size": 32, "weight_decay": 0.05, "scale": [0.7, 1.0], "hflip": 0.0, "smoothing": 0.1,
                   "img_size": 16}, got


def test_labels_name_the_routes():
    data = json.loads(CONFIG.read_text())
    for a in data["anchors"]:
        del a["checkpoint"]  # the structure only: random weights
    cfg = parse_stitch_config(data, "demo").with_model_kwargs({"depth": 2})  # cheaper: names need no depth
    net = build_snnet(cfg, pretrained=False, img_size=16, num_classes=10)
    assert net.names == ["w16", "w32", "w64"]
    assert [net.describe(i) for i in range(3)] == ["w16", "w32", "w64"]
    assert net.describe(3).startswith("w16[") and "-> w32[" in net.describe(3)


def test_unlabelled_anchors_keep_their_names():
    cfg = parse_stitch_config({"anchors": ["a", "a", {"name": "b"}, {"name": "c", "label": "small"}]}, "x")
    assert cfg.labels() == ["a#0", "a#1", "b", "small"]
    # and the run identity (config_sha256) of an unlabelled config is the one it had before labels existed
    options = RunOptions.from_values({"data_dir": "d", "num_classes": 10, "amp_dtype": "float16"})
    text = network_identity(options, parse_stitch_config({"anchors": ["a", "b"]}, "x"), {"input_size": (3, 8, 8),
                                                                                   "crop_pct": 0.9})
    assert "label" not in text and '"name": "a"' in text


@pytest.mark.parametrize("anchors, message", [
    ([{"name": "a", "label": "w 16"}], "anchor 0 label 'w 16' is not a route name"),
    ([{"name": "a", "label": "a#1"}], "anchor 0 label 'a#1' is not a route name"),
    ([{"name": "a", "label": 16}], "anchor 0 field 'label' must be a str"),
    ([{"name": "a", "label": "w"}, {"name": "b", "label": "w"}], "anchors share the label(s) ['w']"),
    (["a", "a", {"name": "b", "label": "a#0"}], "not a route name"),
])
def test_bad_labels_are_one_line(anchors, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        parse_stitch_config({"anchors": anchors}, "x")


def test_in_anchor_range():
    records = [{"cfg_id": 0, "acc1": 80.0}, {"cfg_id": 1, "acc1": 90.0}, {"cfg_id": 2, "acc1": 77.0},
               {"cfg_id": 3, "acc1": 76.9}, {"cfg_id": 4, "acc1": 93.0}, {"cfg_id": 5, "acc1": 93.5}]
    assert in_anchor_range(records, [0, 1]) == (2, 4)  # 77 and 93 are on the margin's edges, inside
    assert in_anchor_range(records, [0, 1], margin=0.0) == (0, 4)


def test_the_summary_names_results_outside_the_working_folder_absolutely(tmp_path, monkeypatch):
    """`snnet quickstart DATA --out /elsewhere` ends with a line naming its results: `/elsewhere/...`, not
    `../../elsewhere/...`; inside the working folder the name stays relative (the committed demo's)."""
    from snnet.demo import summary
    results = Path(__file__).resolve().parent.parent / "results" / "demo" / RESULTS_FILE
    monkeypatch.chdir(tmp_path)
    assert summary([results])[0].startswith(f"{results}: anchors ")
    monkeypatch.chdir(results.parent.parent.parent)
    assert summary([results])[0].startswith(f"results/demo/{RESULTS_FILE}: anchors ")


def test_compare_finds_every_difference(tmp_path):
    """make demo-check: identical results folders compare clean; a changed top-1 or a missing file is named."""
    committed = ROOT / "results" / "demo"
    fresh = tmp_path / "demo"
    write_results(fresh / RESULTS_FILE, read_results(committed / RESULTS_FILE))
    assert compare(fresh, committed) == []
    records = read_results(committed / RESULTS_FILE)
    records[5]["acc1"] += 0.27
    write_results(fresh / RESULTS_FILE, records)
    bad = compare(fresh, committed)
    assert len(bad) == 1 and "cfg 5:" in bad[0]
    assert compare(tmp_path / "nothing", committed)[0].endswith("missing")


def test_anchors_are_reused_only_when_trained_by_the_same_command(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, log, step, env=None):
        calls.append(cmd)
        (tmp_path / step).mkdir(exist_ok=True)
        (tmp_path / step / "last.pth.tar").write_bytes(b"x")
        return 0.0

    monkeypatch.setattr("snnet.demo.run", fake_run)
    spec = ("anchor_w16", "deit_tiny_patch16_224", {"embed_dim": 16})
    train_anchor(tmp_path, tmp_path / "digits", *spec, 3, fresh=False)
    train_anchor(tmp_path, tmp_path / "digits", *spec, 3, fresh=False)  # same command: reused
    assert len(calls) == 1
    assert json.loads((tmp_path / "anchor_w16" / "demo_command.json").read_text())["command"] == calls[0][1:]
    train_anchor(tmp_path, tmp_path / "digits", *spec, 4, fresh=False)  # other epochs: retrained
    train_anchor(tmp_path, tmp_path / "digits", *spec, 4, fresh=True)  # --fresh: retrained
    assert len(calls) == 3 and "4" in calls[1]
    # the demo tags its anchors with its code: an anchor trained by other code is retrained
    from snnet.demo import code_sha256
    code = [f"code sha256 {code_sha256()}"]
    train_anchor(tmp_path, tmp_path / "digits", *spec, 4, fresh=False, tag=code)
    train_anchor(tmp_path, tmp_path / "digits", *spec, 4, fresh=False, tag=code)  # the same code: reused
    train_anchor(tmp_path, tmp_path / "digits", *spec, 4, fresh=False, tag=["code sha256 0"])
    assert len(calls) == 5 and code_sha256() == code_sha256() != hashlib.sha256().hexdigest()


@pytest.mark.slow
def test_a_step_shows_progress_and_fails_with_its_log(tmp_path, monkeypatch, capsys):
    """The console gets the step's newest ETA line every RELAY_SECONDS, a 'running for' line when it prints none,
    and the last ETA line when the step ends before the heartbeat showed it (CI's fast machine once saw none); the
    whole output goes to the log; a failing step exits naming itself, with the log's tail."""
    import sys

    from snnet import demo
    monkeypatch.setattr(demo, "RELAY_SECONDS", 0.2)
    script = "import time\nfor i in range(6): print(f'Train: {i} ETA 0:0{6 - i}', flush=True); time.sleep(0.15)\n" \
             "time.sleep(1.0)\nprint('done')"
    demo.run([sys.executable, "-c", script], tmp_path / "ok.log", "step1")
    out = capsys.readouterr().out
    assert "[step1] Train: " in out and "[step1] running for " in out and "[step1] done in" in out
    assert (tmp_path / "ok.log").read_text().splitlines()[-1] == "done"
    monkeypatch.setattr(demo, "RELAY_SECONDS", 60.0)  # a step that ends before the first heartbeat (a fast machine)
    demo.run([sys.executable, "-c", "print('Train: 0 ETA 0:00'); print('Train: 1 ETA 0:00, last')"],
             tmp_path / "fast.log", "fast")
    assert "[fast] Train: 1 ETA 0:00, last\n[fast] done in" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"step step2 failed \(exit 3; full log: .*bad\.log\):\nboom"):
        demo.run([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "bad.log", "step2")


def test_saved_weights_are_the_committed_sn_net_and_publish_copies_them(tmp_path, monkeypatch):
    """save_weights keeps what rebuilding and evaluating the SN-Net and naming its answers read (weights, identity,
    classes and their names, image size) and drops the optimizer and this machine's paths; the same checkpoint
    gives the same bytes (no git noise from `make demo-results`); tools/publish_demo.py copies the file. The
    committed one loads as the demo's SN-Net and its records name its sha256 (what `snnet latency --results` and
    `snnet serve --results` check)."""
    import hashlib

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # tools/ is not a package
    from publish_demo import publish

    from snnet.demo import WEIGHTS_FILE, save_weights
    from snnet.utils.checkpoint import load_checkpoint, save_checkpoint
    weights = {"a.weight": torch.arange(6.0).reshape(2, 3)}
    names = [f"class {i}" for i in range(10)]  # what `snnet serve` and an export answer with
    args = {"num_classes": 10, "class_names": names, "img_size": 16, "model_kwargs": {}, "data_dir": "/some/path",
            "lr": 1e-3}
    save_checkpoint(tmp_path / "last.pth.tar", {"epoch": 3, "state_dict": weights, "optimizer": {"state": {}},
                                                "args": json.dumps(args), "config": "{}"})
    for name in ("one", "two"):
        save_weights(tmp_path / "last.pth.tar", tmp_path / name / WEIGHTS_FILE)
    assert (tmp_path / "one" / WEIGHTS_FILE).read_bytes() == (tmp_path / "two" / WEIGHTS_FILE).read_bytes()
    slim = load_checkpoint(tmp_path / "one" / WEIGHTS_FILE)
    assert "optimizer" not in slim and torch.equal(slim["state_dict"]["a.weight"], weights["a.weight"])
    assert json.loads(slim["args"]) == {"num_classes": 10, "class_names": names, "img_size": 16, "model_kwargs": {}}
    committed = ROOT / "results" / "demo"
    monkeypatch.setattr("publish_demo.report", lambda *a, **k: [])  # the plots and report: not what is tested here
    publish(committed, tmp_path / "published", v2=False)  # the committed folder as a "fresh" run: a copy of itself
    assert (tmp_path / "published" / WEIGHTS_FILE).read_bytes() == (committed / WEIGHTS_FILE).read_bytes()
    sha = hashlib.sha256((committed / WEIGHTS_FILE).read_bytes()).hexdigest()
    records = [json.loads(ln) for ln in (committed / "stitches_res.txt").read_text().splitlines()]
    assert {r["checkpoint_sha256"] for r in records} == {sha}


def test_only_an_interrupted_run_of_the_same_command_is_continued(tmp_path, monkeypatch, capsys):
    """run_step continues (--auto-resume) a run only when its command started it; a run of another command (here
    16 epochs, now 32: a resumed cosine schedule is not a 32-epoch run, and its final evaluation refused the older
    results file) or of unknown origin is cleared and trained afresh."""
    import torch

    from snnet import demo
    from snnet.utils.checkpoint import save_checkpoint
    calls = []

    def fake_run(cmd, log, step, env=None):
        calls.append(cmd)
        save_checkpoint(run_dir / "last.pth.tar", {"state_dict": {"w": torch.zeros(2)}, "epoch": 0})

    monkeypatch.setattr(demo, "run", fake_run)
    run_dir = tmp_path / "snnet"
    a, b = ["train.py", "--epochs", "16"], ["train.py", "--epochs", "32"]
    demo.run_step(a, run_dir, tmp_path / "a.log", "snnet", True, a)  # nothing there: afresh
    (run_dir / demo.STAMP).unlink()  # interrupted before it finished
    demo.run_step(a, run_dir, tmp_path / "a.log", "snnet", True, a)
    assert calls == [a, [*a, "--auto-resume"]]
    (run_dir / "other.txt").write_text("from the 16-epoch run")
    demo.run_step(b, run_dir, tmp_path / "b.log", "snnet", True, b)
    assert calls[-1] == b and not (run_dir / "other.txt").exists()
    assert json.loads((run_dir / demo.STARTED).read_text()) == b
    assert "holds a run of another command: training afresh" in capsys.readouterr().out
    (run_dir / demo.STARTED).unlink()  # a run from before the started stamp: its command is unknown
    demo.run_step(b, run_dir, tmp_path / "b.log", "snnet", True, b)
    assert calls[-1] == b
    (run_dir / demo.STAMP).unlink()  # interrupted again, and then its checkpoint truncated: not continued
    (run_dir / "last.pth.tar").write_bytes((run_dir / "last.pth.tar").read_bytes()[:100])
    demo.run_step(b, run_dir, tmp_path / "b.log", "snnet", True, b)
    assert calls[-1] == b and "cannot be read as a checkpoint: training afresh" in capsys.readouterr().out


def test_a_step_stopped_by_ctrl_c_is_an_interruption_not_a_failure(tmp_path):
    """A step that exits 130 (train.py after Ctrl-C, which reached it too) ends the run as interrupted: `snnet`
    then says so in one line, not "step failed" with the log's tail and "no other step starts"."""
    import sys

    from snnet import demo
    with pytest.raises(KeyboardInterrupt):
        demo.run([sys.executable, "-c", "raise SystemExit(130)"], tmp_path / "step.log", "anchor_c4")


def test_a_finished_step_is_reused_only_with_the_outputs_it_left(tmp_path, monkeypatch):
    """A step is reused when the same command finished it and its checkpoint and results are the bytes it wrote; a
    checkpoint truncated since (a partial copy of the folder) or another command makes it run again."""
    from snnet import demo
    run_dir = tmp_path / "anchor"
    monkeypatch.setattr(demo, "run", lambda cmd, log, step, env=None: [
        (run_dir / name).write_text(f"{name} of {cmd}") for name in ("last.pth.tar", "stitches_res.txt")])
    cmd = ["train.py", "--epochs", "3"]
    demo.run_step(cmd, run_dir, tmp_path / "a.log", "anchor", False, cmd)
    assert demo.finished(run_dir, cmd) and not demo.finished(run_dir, [*cmd, "--seed", "1"])
    checkpoint = run_dir / "last.pth.tar"
    checkpoint.write_bytes(checkpoint.read_bytes()[:5])
    assert not demo.finished(run_dir, cmd)
    demo.run_step(cmd, run_dir, tmp_path / "a.log", "anchor", False, cmd)
    assert demo.finished(run_dir, cmd)
    (run_dir / "stitches_res.txt").write_text("")
    assert not demo.finished(run_dir, cmd, "stitches_res.txt")


def test_every_step_of_the_demo_runs_pinned(tmp_path, monkeypatch):
    """`python -m snnet.demo` starts every step with PINNED_ENV (one thread, ATen's AVX2 kernels, MKL's
    vendor-independent code branch, oneDNN off), whatever the caller's environment says; snnet quickstart, which runs
    its steps through the same functions, pins the threads only."""
    from snnet import demo
    for key in demo.PINNED_ENV:  # absent here, and absent again after the test (main sets them in os.environ)
        monkeypatch.setenv(key, "512")
        monkeypatch.delenv(key)
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # a caller's own choice does not survive
    seen = []

    def fake_run(cmd, log, step, env=None):
        seen.append({**demo._child_env(), **(env or {})})
        raise SystemExit("stop after the first step")

    monkeypatch.setattr(demo, "run", fake_run)
    assert demo._child_env()["MKL_CBWR"] == "AUTO" and "ATEN_CPU_CAPABILITY" not in demo._child_env()
    monkeypatch.setattr(demo, "write_digits", lambda work: tmp_path / "digits")
    with pytest.raises(SystemExit, match="stop after the first step"):
        demo.main(["--work", str(tmp_path)])
    assert seen and all(env[key] == value for env in seen for key, value in demo.PINNED_ENV.items())


_CONV_SUMS = """
import hashlib, torch
from snnet.train.device import apply_onednn_switch
apply_onednn_switch()
torch.manual_seed(0)
x = torch.randn(8, 16, 12, 12)
conv = torch.nn.Conv2d(16, 32, 3, padding=1)
conv(x).square().sum().backward()
print(hashlib.sha256(conv.weight.grad.numpy().tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_the_pin_takes_onednn_out_of_the_sums():
    """With the demo's PINNED_ENV a convolution's weight gradient has the same bits whatever oneDNN's instruction set
    (oneDNN is off: nothing it chooses by the CPU can move the sums); with oneDNN on, the instruction set moves them,
    as another CPU's cache sizes move its blocking."""
    import os
    import subprocess
    import sys

    from snnet.demo import PINNED_ENV
    from snnet.train.device import ONEDNN_ENV

    def start(isa: str, onednn: bool) -> subprocess.Popen:
        env = {**os.environ, **PINNED_ENV, "ONEDNN_MAX_CPU_ISA": isa}
        if onednn:
            env.pop(ONEDNN_ENV)
        return subprocess.Popen([sys.executable, "-c", _CONV_SUMS], env=env, stdout=subprocess.PIPE, text=True,
                                cwd=ROOT)

    runs = [start(isa, onednn) for onednn in (False, True) for isa in ("AVX2", "SSE41")]  # all four at once
    bits = [p.communicate(timeout=300)[0].strip() for p in runs]
    assert all(p.returncode == 0 for p in runs) and all(bits), bits
    assert bits[0] == bits[1]  # pinned: the same sums whatever oneDNN's instruction set
    assert bits[2] != bits[3]  # oneDNN on: the instruction set moves them


_PINNED_STEPS = """
import hashlib, torch, timm
from snnet.train.device import apply_onednn_switch
apply_onednn_switch()
torch.manual_seed(0)
net = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                        depth=2, embed_dim=32, num_heads=2)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
x, y = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(net(x), y, label_smoothing=0.1)
    opt.zero_grad()
    loss.backward()
    opt.step()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in net.parameters())).hexdigest()
print(digest, torch.backends.cpu.get_cpu_capability())
"""
#: what _PINNED_STEPS prints under the demo's PINNED_ENV (the kernels results/demo was trained with), and the
#: versions it was computed with: the same digest on every x86-64 CPU with AVX2 is the demo's claim of reproducing
PINNED_DIGEST = ("cdcf2b272870ba1c", "2.14.1", "1.0.31")


@pytest.mark.slow
def test_the_pinned_kernels_give_the_committed_bits_on_this_cpu():
    """Three training steps of a small ViT (the demo's operations: patch convolution, matrix products, LayerNorm,
    attention, GELU, label-smoothed cross-entropy, fused AdamW) under PINNED_ENV give the bits recorded with the
    committed demo, on whatever CPU runs the suite, so a CPU on which `make demo` cannot reproduce results/demo
    fails here in seconds. ATen's plain kernels give other bits: the digest tells kernels apart."""
    import os
    import platform
    import subprocess
    import sys

    import timm
    import torch

    from snnet.demo import PINNED_ENV
    if platform.machine() != "x86_64":
        pytest.skip(f"the demo's pinned kernels are x86-64's (AVX2); this CPU is {platform.machine()}")
    if (torch.__version__.split("+")[0], timm.__version__) != PINNED_DIGEST[1:]:
        pytest.skip(f"the recorded digest is of torch {PINNED_DIGEST[1]} and timm {PINNED_DIGEST[2]}; "
                    f"another build moves the demo's numbers too (docs/demo.md)")
    runs = [subprocess.Popen([sys.executable, "-c", _PINNED_STEPS], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **PINNED_ENV, **extra})
            for extra in ({}, {"ATEN_CPU_CAPABILITY": "default"})]
    (pinned, capability), (plain, _) = [p.communicate(timeout=300)[0].split() for p in runs]
    assert all(p.returncode == 0 for p in runs)
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.processor())
    assert pinned[:16] == PINNED_DIGEST[0], (f"the demo's pinned kernels ({capability}) sum otherwise on this CPU "
                                             f"({model}): a fresh `make demo` here will not give results/demo")
    assert plain[:16] != pinned[:16]
