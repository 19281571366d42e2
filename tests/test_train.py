"""train.py / distributed_train.sh end to end: CLI, sampler, a real 2-process gloo run, evaluation resume, bad input."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from snnet.data.loaders import usable_cores
from snnet.stitching.config import ConfigError
from snnet.train.args import UsageError, parse_args
from snnet.train.sampler import StitchSampler

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
from helpers import FAST, run  # noqa: E402


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cnn_seed_command_line_parses():
    line = ("/data/imagenet -b 128 --stitch_config configs/resnet18_resnet50.json --sched cosine --epochs 30 "
            "--lr 0.05 --amp --remode pixel --reprob 0.6 --aa rand-m9-mstd0.5-inc1 --resplit --split-bn -j 10 "
            "--dist-bn reduce")
    args, cfg = parse_args(line.split())
    assert [a.name for a in cfg.anchors] == ["resnet18.tv_in1k", "resnet50.a1_in1k"]
    assert (args.data_dir, args.batch_size, args.sched, args.epochs, args.lr) == ("/data/imagenet", 128, "cosine", 30,
                                                                                  0.05)
    assert args.amp and args.resplit and args.split_bn and args.workers == 10 and args.dist_bn == "reduce"
    assert (args.remode, args.reprob, args.aa) == ("pixel", 0.6, "rand-m9-mstd0.5-inc1")
    assert args.opt == "sgd" and args.weight_decay == 2e-5  # timm's defaults, as SN-Net's CNN runs used


def test_deit_seed_command_line_and_json_precedence():
    args, cfg = parse_args("/data/imagenet --stitch_config configs/deit_ti_s_b.json".split())
    # SN-Net's JSON fields become defaults: lr 5e-5 per 512 images of global batch, 50 epochs, hard distillation
    assert (args.epochs, args.batch_size, args.workers, args.img_size) == (50, 128, 10, 224)
    assert (args.lr, args.lr_base, args.lr_base_size, args.lr_base_scale) == (None, 5e-5, 512, "linear")
    # SN-Net's untagged teacher meant DeiT's RegNetY-16GF (docs/snnet_compat.md, C19)
    assert ((args.teacher, args.distillation_type, args.experiment)
            == ("regnety_160.deit_in1k", "hard", "stitch_deit_ti_s_b"))
    assert args.data_dir == "/data/imagenet"  # the command line wins over the JSON's data_path
    args, _ = parse_args("/d --stitch_config configs/deit_ti_s_b.json --epochs 3 -b 8 --lr 0.1".split())
    assert (args.epochs, args.batch_size, args.lr) == (3, 8, 0.1)  # unlike SN-Net, typed flags win


def test_yaml_defaults_and_cli_precedence(tmp_path):
    y = tmp_path / "a.yaml"
    y.write_text("epochs: 7\nbatch-size: 4\nopt: adamw\n")
    args, _ = parse_args(["/d", "--model", "resnet18", "-c", str(y), "-b", "2"])
    assert (args.epochs, args.batch_size, args.opt) == (7, 2, "adamw")
    y.write_text("epoch: 7\n")
    with pytest.raises(UsageError, match="unknown key 'epoch'"):
        parse_args(["/d", "--model", "resnet18", "-c", str(y)])


def test_precedence_default_yaml_stitch_config_typed(tmp_path):
    """Each layer replaces the one below it, flag by flag: defaults < -c YAML < --stitch_config < typed."""
    y, j = tmp_path / "a.yaml", tmp_path / "s.json"
    y.write_text("epochs: 7\nlr-base: 0.2\nlr_base_size: 128\nworkers: 3\ndataset: torch/cifar10\n")
    j.write_text(json.dumps({"anchors": ["resnet18"], "epochs": 50, "lr": 5e-5, "data_set": "IMNET",
                             "data_path": "/json/data"}))
    lr_of = lambda a: (a.lr, a.lr_base, a.lr_base_size, a.lr_base_scale)

    base = json.dumps({"anchors": ["resnet18"]})
    (tmp_path / "bare.json").write_text(base)
    a, _ = parse_args(["/d", "--stitch_config", str(tmp_path / "bare.json")])  # built-in defaults
    # timm's 4 loader workers, at most the usable cores (snnet.data.loaders.default_workers)
    assert (a.epochs, a.workers, a.dataset, lr_of(a)) == (300, min(4, usable_cores()), "", (None, 0.1, 256, ""))
    a, _ = parse_args(["/d", "--stitch_config", str(tmp_path / "bare.json"), "-c", str(y)])  # YAML over defaults
    assert (a.epochs, a.workers, a.dataset, lr_of(a)) == (7, 3, "torch/cifar10", (None, 0.2, 128, ""))
    a, _ = parse_args(["-c", str(y), "--stitch_config", str(j)])  # stitch config over YAML, key by key
    assert (a.epochs, a.workers, a.dataset, lr_of(a)) == (50, 3, "", (None, 5e-5, 512, "linear"))
    assert a.data_dir == "/json/data"  # data_path is DATA's default
    typed = ["-c", str(y), "--stitch_config", str(j), "/typed", "--epochs", "2", "-j", "1"]
    a, _ = parse_args(typed)
    assert (a.epochs, a.workers, a.data_dir) == (2, 1, "/typed")
    assert parse_args(typed + ["--data-dir", "/dd"])[0].data_dir == "/dd"
    # the lr rule: a typed --lr is absolute and wins; a typed --lr-base keeps the config's 512 base size and linear
    # scaling unless --lr-base-size is typed too
    assert lr_of(parse_args(typed + ["--lr", "0.3"])[0])[0] == 0.3
    assert lr_of(parse_args(typed + ["--lr-base", "0.001"])[0]) == (None, 0.001, 512, "linear")
    assert lr_of(parse_args(typed + ["--lr-base", "0.001", "--lr-base-size", "256"])[0]) == (None, 0.001, 256,
                                                                                            "linear")


def test_yaml_may_name_the_stitch_config(tmp_path):
    y = tmp_path / "a.yaml"
    y.write_text("stitch_config: configs/deit_ti_s_b.json\nepochs: 7\n")
    a, cfg = parse_args(["/d", "-c", str(y)])
    assert [x.name for x in cfg.anchors][0] == "deit_tiny_patch16_224" and a.epochs == 50  # JSON over its YAML
    assert parse_args(["/d", "-c", str(y), "--stitch_config", "configs/resnet18_resnet50.json"])[1].anchors[0].name \
        == "resnet18.tv_in1k"


@pytest.mark.parametrize("text,message", [
    ("batch_size: 0", "-c/--config '{y}': key 'batch_size': 0 is not >= 1 (as for -b/--batch-size); fix the value"),
    ("mean: 0.5", "key 'mean': 0.5 is not a list; write a list, e.g. [0.5] (as for --mean)"),
    ("scale: [0.1, 0.5, 1.0]", "key 'scale': [0.1, 0.5, 1.0] has 3 item(s); give 2"),
    ("lr: .nan", "key 'lr': 'nan' is not a finite number"),
    ("momentum: .inf", "key 'momentum': 'inf' is not a finite number"),
    ("epochs: 2.5", "key 'epochs': '2.5' is not an integer"),
    ("epochs: ten", "key 'epochs': 'ten' is not an integer"),
    ("reprob: 1.5", "key 'reprob': 1.5 is not a probability in [0, 1]"),
    ("remode: noise", "key 'remode': 'noise' is not one of 'const', 'rand', 'pixel'"),
    ("amp: 1", "key 'amp': 1 is not true or false"),
    ("batch_size: null", "key 'batch_size': null is not allowed here"),
    ("aa: [rand]", "key 'aa': ['rand'] is not a single value"),
    ("model_kwargs: depth=6", "key 'model_kwargs': 'depth=6' is not a mapping"),
    ("config: other.yaml", "unknown key 'config'"),
])
def test_yaml_values_are_checked_like_typed_ones(tmp_path, text, message):
    y = tmp_path / "a.yaml"
    y.write_text(text + "\n")
    with pytest.raises(UsageError) as e:
        parse_args(["/d", "--model", "resnet18", "-c", str(y)])
    assert message.format(y=y) in str(e.value) and "\n" not in str(e.value)


def test_yaml_values_that_are_fine(tmp_path):
    y = tmp_path / "a.yaml"
    y.write_text("lr: 1e-4\nmean: [0.5, 0.5, 0.5]\nimg_size: null\nexperiment: 2024\nmodel-kwargs: {depth: 6}\n"
                 "amp: true\nscale: [0.5, 1]\n")
    a, _ = parse_args(["/d", "--model", "resnet18", "-c", str(y)])
    assert (a.lr, a.mean, a.img_size, a.experiment, a.model_kwargs, a.amp, a.scale) == (
        1e-4, [0.5] * 3, None, "2024", {"depth": 6}, True, [0.5, 1.0])


@pytest.mark.parametrize("fields,message", [
    ('"recipe": {"reprob": 2}', "field 'recipe.reprob': 2 is not a probability in [0, 1] (as for --reprob)"),
    ('"lr": NaN', "NaN is not a number here (JSON has no NaN or Infinity); write a finite number"),
    ('"epochs": 3, "epochs": 5', "key(s) 'epochs' given twice in one object (JSON keeps only the last); keep one"),
    ('"lr": -1e-4', "field 'lr': -0.0001 is not >= 0"),
    ('"recipe": {"weight-decay": Infinity}', "Infinity is not a number here (JSON has no NaN or Infinity)"),
    ('"recipe": {"weight-decay": "inf"}', "field 'recipe.weight-decay': 'inf' is not a finite number"),
    ('"recipe": {"clip_mode": "norm2"}', "field 'recipe.clip_mode': 'norm2' is not one of 'norm', 'value', 'agc'"),
    ('"lr": 1e-4, "recipe": {"lr-base": 1e-3}', "recipe entry 'lr-base' sets what field 'lr' already sets"),
    ('"recipe": {"epoch": 3}', "unknown field 'recipe.epoch'; keys are train.py flag names"),
    ('"distillation_type": "medium"', "field 'distillation_type': 'medium' is not one of"),
])
def test_stitch_config_values_are_checked_like_typed_ones(tmp_path, fields, message):
    j = tmp_path / "s.json"
    j.write_text('{"anchors": ["resnet18"], %s}' % fields)
    with pytest.raises((UsageError, ConfigError)) as e:
        parse_args(["/d", "--stitch_config", str(j)])
    assert f"stitch config '{j}': {message}" in str(e.value) and "\n" not in str(e.value)


def test_typed_non_finite_numbers_are_refused():
    with pytest.raises(UsageError, match="argument --crop-pct: 'nan' is not a finite number"):
        parse_args(["/d", "--model", "resnet18", "--crop-pct", "nan"])


def test_every_flag_has_help_showing_its_default():
    from snnet.train.args import build_parser
    parser = build_parser()
    assert [a.dest for a in parser._actions if not (a.help or "").strip()] == []
    text = " ".join(parser.format_help().split())  # formatting also catches a stray % in a help string
    assert "(default: 128)" in text and "(default: 'cosine')" in text and "(default: [90, 180, 270])" in text


def test_stitch_config_fields_map_to_flags():
    """config.FIELDS is the one table; SN-Net's field names keep their flags."""
    from snnet.stitching.config import ARG_DESTS
    from snnet.train.args import build_parser
    assert {k: ARG_DESTS[k] for k in ("lr", "input_size", "data_path", "data_set", "exp_name", "num_workers",
                                      "teacher_model", "batch_size", "warmup_lr", "min_lr", "epochs")} == {
        "lr": "lr_base", "input_size": "img_size", "data_path": "data", "data_set": "dataset",
        "exp_name": "experiment", "num_workers": "workers", "teacher_model": "teacher", "batch_size": "batch_size",
        "warmup_lr": "warmup_lr", "min_lr": "min_lr", "epochs": "epochs"}
    assert set(ARG_DESTS.values()) <= {a.dest for a in build_parser()._actions}


def test_sampler_is_deterministic_per_seed_rank_step():
    a, b = StitchSampler(71, seed=3, rank=1), StitchSampler(71, seed=3, rank=1)
    draws = [a(s) for s in range(500)]
    assert draws == [b(s) for s in range(500)]
    assert draws[250:260] == [StitchSampler(71, seed=3, rank=1)(s) for s in range(250, 260)]  # resumable mid-run
    assert draws != [StitchSampler(71, seed=3, rank=0)(s) for s in range(500)]  # ranks differ
    assert draws != [StitchSampler(71, seed=4, rank=1)(s) for s in range(500)]
    assert set(draws) == set(range(71))  # uniform over all cfg_ids: every one drawn in 500 steps
    sync = [StitchSampler(71, seed=3, rank=r, sync=True) for r in range(4)]
    assert len({s(17) for s in sync}) == 1
    w = StitchSampler(3, seed=0, weights=[0, 1, 0])
    assert {w(s) for s in range(50)} == {1}


# ---------------------------------------------------------------------------------------------- real 2-process run
@pytest.mark.dist
def test_two_process_train_evaluate_and_resume_evaluation(tmp_path, digits_folder, tiny_config):
    out = tmp_path / "runs"
    r = run(["./distributed_train.sh", "2", str(digits_folder), "--stitch_config", str(tiny_config), "--epochs",
             "1", "--amp", "--output", str(out), "--experiment", "ddp", *FAST])
    assert r.returncode == 0, r.stderr[-3000:]
    run_dir = out / "ddp"
    assert (run_dir / "last.pth.tar").exists() and (run_dir / "summary.csv").exists()
    lines = (run_dir / "stitches_res.txt").read_text().splitlines()
    records = [json.loads(l) for l in lines]
    assert [r["cfg_id"] for r in records] == list(range(12))  # 2 anchors + 10 positions of a depth-4 window
    assert {r["samples"] for r in records} == {60}  # both shards, no padding, no duplicates
    for rec in records:
        assert set(rec) >= {"cfg_id", "flops", "params", "acc1", "acc5", "loss", "route"}
    assert "->" in records[5]["route"] and "->" not in records[0]["route"]
    assert "LS init: 3 stitching layers fitted" in r.stderr + r.stdout

    # the evaluation of a checkpoint resumes where it stopped: drop 4 lines and a torn one, rerun, only those are
    # redone; one process (the file, not the process count, says what is left), the same top-1 as the two processes
    # of the training run gave (the loss is summed in another order: float, 1e-7 apart)
    ckpt = run_dir / "last.pth.tar"
    ev = tmp_path / "eval"
    ev.joinpath("e").mkdir(parents=True)
    shutil.copy(run_dir / "stitches_pred.npz", ev / "e")  # the anchors' per-image predictions, of these records
    with_hashes = [json.loads(l) for l in lines]
    (ev / "e" / "stitches_res.txt").write_text("\n".join(lines[:8]) + "\n" + lines[8][:20])  # + a torn line
    r = run([sys.executable, "train.py", str(digits_folder), "--stitch_config", str(tiny_config), "--eval",
             "--resume", str(ckpt), "--amp", "--output", str(ev), "--experiment", "e", *FAST])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "evaluating 4 stitch(es) (8 already in" in r.stderr + r.stdout
    again = [json.loads(l) for l in (ev / "e" / "stitches_res.txt").read_text().splitlines()]
    loss = lambda recs: [rec["loss"] for rec in recs]
    rest = lambda recs: [{k: v for k, v in rec.items() if k != "loss"} for rec in recs]
    assert rest(again) == rest(with_hashes) and loss(again) == pytest.approx(loss(with_hashes), rel=1e-6)


@pytest.mark.slow
def test_eval_without_resume_uses_fresh_ls_init_and_counts(tmp_path, digits_folder, tiny_config):
    r = run([PY, "train.py", str(digits_folder), "--stitch_config", str(tiny_config), "--eval", "--output",
             str(tmp_path), "--experiment", "fresh", *FAST])
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "fresh" / "stitches_res.txt").read_text().splitlines()]
    assert len(records) == 12 and all(r["flops"] > 0 and r["params"] > 0 for r in records)
    assert records[0]["flops"] < records[1]["flops"]


@pytest.mark.slow
@pytest.mark.dist
def test_plain_model_training(tmp_path, digits_folder):
    """One timm model on 2 processes: DDP as timm's train.py makes it, without find_unused_parameters (every
    parameter of one network is used; only an SN-Net's routes leave some out), so torch does not walk the graph
    after each backward nor warn on every rank that it found nothing."""
    r = run(["./distributed_train.sh", "2", str(digits_folder), "--model", "deit_tiny_patch16_224", "--model-kwargs",
             "patch_size=4", "depth=2", "embed_dim=8", "num_heads=2", "--epochs", "1", "--output", str(tmp_path),
             "--experiment", "plain", *FAST])
    assert r.returncode == 0 and "2 process(es)" in r.stderr, r.stderr[-3000:]
    assert "find_unused_parameters" not in r.stderr, r.stderr[-3000:]
    import torch
    state = torch.load(tmp_path / "plain" / "last.pth.tar", weights_only=True)
    assert "pos_embed" in state["state_dict"]  # plain timm keys: usable as an anchor checkpoint
    assert json.loads((tmp_path / "plain" / "stitches_res.txt").read_text())["route"] == "deit_tiny_patch16_224"


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,argv,message", [
    ("missing data", ["{tmp}/nope", "--stitch_config", "{cfg}"], "data folder '{tmp}/nope' does not exist"),
    ("empty data", ["{tmp}/empty", "--stitch_config", "{cfg}"], "data folder '{tmp}/empty' is empty"),
    ("no config", ["{data}", "--stitch_config", "{tmp}/none.json"], "stitch config '{tmp}/none.json' does not exist"),
    ("bad json", ["{data}", "--stitch_config", "{tmp}/bad.json"], "is not valid JSON"),
    ("batch 0", ["{data}", "--stitch_config", "{cfg}", "-b", "0"], "argument -b/--batch-size: 0 is not >= 1"),
    ("reprob", ["{data}", "--stitch_config", "{cfg}", "--reprob", "2"], "--reprob: 2 is not a probability"),
    ("no model", ["{data}"], "give --stitch_config FILE"),
    ("split-bn", ["{data}", "--stitch_config", "{cfg}", "--split-bn"], "--split-bn needs --aug-splits > 1 or "
                                                                       "--resplit"),
    ("split-bn odd batch", ["{data}", "--stitch_config", "{cfg}", "--split-bn", "--resplit", "-b", "5"],
     "-b/--batch-size 5 with --split-bn and no --aug-splits: split-BN halves each batch"),
])
@pytest.mark.slow
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, digits_folder, tiny_config, case, argv,
                                                            message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    fill = lambda s: s.format(tmp=tmp_path, cfg=tiny_config, data=digits_folder)
    out = tmp_path / "out"
    r = run([PY, "train.py", *map(fill, argv), "--output", str(out)])
    assert r.returncode == 2, (case, r.stderr)
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert fill(message) in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.dist
def test_distributed_train_sh_usage():
    r = run(["./distributed_train.sh", "x"])
    assert r.returncode == 2 and "NUM_PROC" in r.stderr


SEED_CNN = ("-b 128 --stitch_config configs/resnet18_resnet50.json --sched cosine --epochs 30 --lr 0.05 --amp "
            "--remode pixel --reprob 0.6 --aa rand-m9-mstd0.5-inc1 --resplit --split-bn -j 10 --dist-bn reduce")


@pytest.mark.dist
def test_cnn_seed_command_runs_on_two_cpu_processes(tmp_path_factory, tmp_path):
    """DEVELOPERS.md's ResNet command, flags verbatim, on 2 gloo processes. Appended (the command line wins): one
    epoch, 32 px, random anchors and batch 4, since weights cannot be downloaded here and 30 epochs at 224 px of
    ResNet-50 do not fit a CPU test. 10 training images: one 4-image step per process (split-BN halves it); 10
    validation images, one per class. Small
    because --amp is bf16 autocast on CPU, and a CPU without bf16 instructions (this one) runs bf16 convolutions on
    reference kernels: a ResNet-50 step of 48 images took 40 s vs 0.9 s in fp32, which the run now says in one
    warning (rank 0's)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from snnet.train.device import cpu_has_fast_bf16
    d = load_digits()
    root = tmp_path_factory.mktemp("digits_cnn")
    for split, indices in (("val", range(10)), ("train", range(10, 20))):  # each the 10 classes once
        for n in indices:
            folder = root / split / str(d.target[n])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((d.images[n] / 16 * 255).astype(np.uint8)).resize((32, 32)).convert("RGB").save(
                folder / f"{n}.png")
    # the card's teacher (DeiT's RegNetY-16GF) cannot be downloaded here: a local ResNet-18 stands in for it
    teacher = tmp_path / "teacher.pth"
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), teacher)
    extra = ["--epochs", "1", "--img-size", "32", "--no-pretrained", "-b", "4", "--output", str(tmp_path),
             "--experiment", "cnn", "--teacher", "resnet18", "--teacher-checkpoint", str(teacher)]
    r = run(["./distributed_train.sh", "2", str(root), *SEED_CNN.split(), *extra], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 steps/epoch; 2 process(es)" in r.stderr
    warned = r.stderr.count("on this CPU: it has no bf16 instructions")
    assert warned == (0 if cpu_has_fast_bf16() else 1), r.stderr[-3000:]
    records = [json.loads(l) for l in (tmp_path / "cnn" / "stitches_res.txt").read_text().splitlines()]
    assert [rec["cfg_id"] for rec in records] == list(range(10)) and {rec["samples"] for rec in records} == {10}
    state = torch.load(tmp_path / "cnn" / "last.pth.tar", weights_only=True)
    assert "anchors.1.layer3.5.bn2.aux_bn.0.running_mean" in state["state_dict"]  # split-BN, SN-Net's keys
    # evaluation of that checkpoint with the same flags (split-BN keys load strictly), in one process (train.py's
    # entry, no torchrun: seconds less; the two-process evaluation of this file is the run's own, above)
    r = run([sys.executable, "train.py", str(root), *SEED_CNN.split(), *extra[:7], "--eval", "--resume",
             str(tmp_path / "cnn" / "last.pth.tar"), "--output", str(tmp_path), "--experiment", "cnn_eval"],
            timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = [json.loads(l) for l in (tmp_path / "cnn_eval" / "stitches_res.txt").read_text().splitlines()]
    assert [x["acc1"] for x in again] == [x["acc1"] for x in records]


def test_demo_config_follows_the_work_folder(tmp_path):
    """make demo uses configs/demo_digits.json as is; another --work stitches the anchors trained there."""
    from snnet import load_stitch_config
    from snnet.demo import CONFIG, stitch_config_for
    from snnet.demo import ROOT as DEMO_ROOT
    assert stitch_config_for(DEMO_ROOT / "output" / "demo") == CONFIG
    cfg = load_stitch_config(stitch_config_for(tmp_path))
    assert [a.checkpoint for a in cfg.anchors] == [str(tmp_path.resolve() / n / "last.pth.tar")
                                                  for n in ("anchor_w16", "anchor_w32", "anchor_w64")]
    assert [a.model_kwargs["embed_dim"] for a in cfg.anchors] == [16, 32, 64]


def test_typed_model_kwargs_win_over_the_anchors_own(tiny_config):
    """--model-kwargs applies to every anchor and wins over an anchor's model_kwargs (what the user types wins)."""
    from snnet.train.network import build_network
    from snnet.train.options import RunOptions
    args, cfg = parse_args(["/d", "--stitch_config", str(tiny_config), "--img-size", "16", "--no-pretrained",
                            "--model-kwargs", "depth=2", "--num-classes", "10"])
    net, _ = build_network(RunOptions.from_values(vars(args)).network_to_build(), cfg)
    assert [len(a.blocks) for a in net.anchors] == [2, 2] and net.anchors[1].embed_dim == 16


@pytest.mark.slow
def test_eval_with_initial_checkpoint_keeps_its_stitching_layers(digits_folder, tiny_config, tmp_path):
    """--eval --initial-checkpoint CKPT evaluates CKPT's stitching layers; the LS init must not overwrite them."""
    from snnet import build_snnet, load_stitch_config
    torch.manual_seed(3)
    net = build_snnet(load_stitch_config(tiny_config), pretrained=False, img_size=16, num_classes=10)
    for p in net.stitch_layers.parameters():
        torch.nn.init.normal_(p, std=0.5)  # far from any least-squares fit
    torch.save({"state_dict": net.state_dict()}, tmp_path / "ckpt.pth.tar")
    base = [sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, "--eval",
            "--output", tmp_path]
    r = run(base + ["--initial-checkpoint", tmp_path / "ckpt.pth.tar", "--experiment", "init"])
    assert r.returncode == 0, r.stderr[-2000:]
    r2 = run(base + ["--resume", tmp_path / "ckpt.pth.tar", "--experiment", "resume"])
    assert r2.returncode == 0, r2.stderr[-2000:]
    acc = lambda name: [json.loads(l)["acc1"] for l in (tmp_path / name / "stitches_res.txt").read_text().splitlines()]
    assert acc("init") == acc("resume") and "LS init skipped" in r.stderr


@pytest.mark.parametrize("bad", [["-b", "0"], ["--aa", "garbage"], ["--resume", "/nonexistent/ckpt.pth.tar"]])
@pytest.mark.dist
def test_distributed_launch_refuses_bad_input_in_one_line(bad, digits_folder, tiny_config, tmp_path):
    """distributed_train.sh checks every input once before torchrun starts: one line, exit 2, no torchrun traceback,
    nothing written."""
    r = run(["./distributed_train.sh", "2", digits_folder, "--stitch_config", tiny_config, *FAST, *bad,
             "--output", tmp_path], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr and not list(tmp_path.iterdir())
