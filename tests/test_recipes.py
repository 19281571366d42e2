"""Each family's recipe card resolves, with nothing else typed, to SN-Net's (or SN-Netv2's) run.

The tables hold the official values at 8 processes, five SN-Net cards and three SN-Netv2 cards; each row cites where
this repository documents the value (docs/snnet_compat.md C16-C19 and C31-C37, the family READMEs; C37 lists the
official file and line of each value). `train.py --dry-run` resolves a run without loading weights or reading images,
so the whole recipe, the network included, is checked here as a user would see it: on each card's recorded dry run,
which tests/test_dry_run_recorded.py holds the code to, byte for byte.
"""
import csv
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import FAST, run

from snnet.train.losses import DistillationLoss
from snnet.train.main import main

AUG = {  # DeiT's augmentation, shared by SN-Net's DeiT, Swin and LeViT runs (C31-C33)
    "aa": "rand-m9-mstd0.5-inc1", "color_jitter": 0.4, "train_interpolation": "bicubic", "reprob": 0.25,
    "remode": "pixel", "recount": 1, "mixup": 0.8, "cutmix": 1.0, "mixup_prob": 1.0, "mixup_switch_prob": 0.5,
    "mixup_mode": "batch", "smoothing": 0.1,
}
EVAL = {  # every family evaluated at resize 256 / centre crop 224, bicubic (C23)
    "resolved.eval_transform.input_size": [3, 224, 224], "resolved.eval_transform.resize": 256,
    "resolved.eval_transform.crop_pct": 0.875, "resolved.eval_transform.interpolation": "bicubic",
}
TEACHER = {  # hard distillation from DeiT's RegNetY-16GF, alpha 0.5 (C19)
    "resolved.teacher.name": "regnety_160.deit_in1k", "resolved.teacher.type": "hard", "resolved.teacher.alpha": 0.5,
}

RECIPES = {
    # C31 / stitching_deit/README.md: config/deit_stitching.json + DeiT's params.py
    "deit_ti_s_b": {
        "batch_size": 128, "epochs": 50, "opt": "adamw", "opt_eps": 1e-8, "opt_betas": None, "weight_decay": 0.05,
        "resolved.global_batch": 1024, "resolved.lr": 1e-4,                      # 5e-5 x 1024 / 512 (C16)
        "resolved.param_groups.anchors.lr": 1e-4, "resolved.param_groups.stitching_layers.lr": 1e-4,  # C17
        "resolved.schedule.warmup_lr": 1e-7, "resolved.schedule.min_lr": 1e-6,  # not scaled (C16)
        "sched": "cosine", "warmup_epochs": 5, "resolved.schedule.total_epochs": 50, "sched_on_updates": False,
        "clip_grad": None, "drop_path": 0.1, "aug_repeats": 3, **AUG, **TEACHER, **EVAL,
        "amp": True, "resolved.amp.covers": "forward and loss (teacher included)", "model_ema": False,
        "seed": 0, "workers": 10, "img_size": 224,
    },
    # C32 / stitching_swin/README.md: configs/snnet/stitch_swin_ti_s_b.yaml + Swin's config.py
    "swin_ti_s_b": {
        "batch_size": 128, "opt": "adamw", "opt_eps": 1e-8, "opt_betas": [0.9, 0.999], "weight_decay": 0.05,
        "resolved.lr": 1e-3, "resolved.param_groups.anchors.lr": 1e-4,           # anchors x 0.1 (C17)
        "resolved.param_groups.stitching_layers.lr": 1e-3,
        "resolved.schedule.warmup_lr": 1e-6, "resolved.schedule.min_lr": 1e-5,  # all three scaled x2 (C16)
        "resolved.schedule.total_epochs": 50, "warmup_epochs": 5, "warmup_prefix": True,  # 5 + 45 cosine
        "sched_on_updates": True, "clip_grad": 5.0, "clip_mode": "norm", "drop_path": 0.2, "aug_repeats": 0,
        **AUG, **TEACHER, **EVAL, "amp": True, "resolved.amp.covers": "forward", "seed": 0, "workers": 10,
    },
    # C33 / stitching_levit/README.md: the README command + LeViT's main.py
    "levit_192_256": {
        "batch_size": 128, "epochs": 100, "opt": "adamw", "opt_eps": 1e-8, "weight_decay": 0.025,
        "resolved.lr": 1e-4, "resolved.param_groups.anchors.lr": 1e-4,
        "resolved.param_groups.stitching_layers.lr": 1e-4,
        "resolved.schedule.warmup_lr": 1e-7, "resolved.schedule.min_lr": 1e-6, "resolved.schedule.total_epochs": 100,
        "sched_on_updates": False, "clip_grad": 0.01, "clip_mode": "agc", "drop_path": 0.0, "aug_repeats": 3,
        **AUG, **TEACHER, **EVAL, "amp": True, "resolved.amp.covers": "forward and loss (teacher included)",
        "model_ema": False, "seed": 0,
    },
    # C34 / stitching_resnet_swin/README.md: the README's command + what SN-Net's modified timm hid
    "resnet18_resnet50": {
        "batch_size": 128, "epochs": 30, "opt": "sgd", "momentum": 0.9, "weight_decay": 2e-5,
        "resolved.lr": 0.05, "resolved.param_groups.anchors.lr": pytest.approx(0.005),  # hidden anchors x 0.1
        "resolved.param_groups.stitching_layers.lr": 0.05, "resolved.schedule.warmup_lr": 1e-5,
        "resolved.schedule.min_lr": 0.0, "resolved.schedule.total_epochs": 30, "sched_on_updates": False,
        "aa": "rand-m9-mstd0.5-inc1", "reprob": 0.6, "remode": "pixel", "resplit": True, "split_bn": True,
        "dist_bn": "reduce", "mixup": 0.0, "cutmix": 0.0, "smoothing": 0.1, "train_interpolation": "random",
        "amp": True, "workers": 10, "seed": 42, **TEACHER, **EVAL,
    },
}
RECIPES["resnet18_swin_ti"] = RECIPES["resnet18_resnet50"]
# the network each SN-Net card builds and samples (C1, C4, C5, C15): every cfg_id drawn uniformly, Linear layers
for card, (networks, layers) in {"deit_ti_s_b": (71, 22), "swin_ti_s_b": (41, 27), "levit_192_256": (8, 6),
                                 "resnet18_resnet50": (10, 4), "resnet18_swin_ti": (8, 3)}.items():
    RECIPES[card] = {**RECIPES[card], "resolved.network.networks": networks, "resolved.network.trained": networks,
                     "resolved.network.sampler.type": "uniform", "resolved.network.stitching_layers.type": "linear",
                     "resolved.network.stitching_layers.count": layers}
# C36, C37: SN-Netv2's runs (its deit_stitching_snnetv2_{s_l,s_b,b_l}.json + main.py defaults): LAMB, lr 3e-5 absolute,
# wd 0.02, 3-Augment, CutMix 1.0 only, smoothing 0.1, crop 1.0 at eval, no distillation; ROS at gap 1 GFLOPs over
# the 134 routes it trains (id 13 built, evaluated, never drawn); LoRA rank 64, alpha 1; drop-path per anchor, the same
# rate in every block
V2 = {
    "batch_size": 64, "epochs": 50, "opt": "lamb", "opt_eps": 1e-8, "opt_betas": [0.9, 0.999], "weight_decay": 0.02,
    "resolved.global_batch": 512, "resolved.lr": 3e-5, "resolved.param_groups.anchors.lr": 3e-5,
    "resolved.param_groups.stitching_layers.lr": 3e-5, "resolved.schedule.warmup_lr": 1e-7,
    "resolved.schedule.min_lr": 1e-5, "resolved.schedule.total_epochs": 50, "warmup_epochs": 5, "sched": "cosine",
    "sched_on_updates": False, "clip_grad": None, "aa": "3a", "color_jitter": 0.3, "train_crop_mode": "src",
    "reprob": 0.0, "mixup": 0.0, "cutmix": 1.0, "smoothing": 0.1, "aug_repeats": 3, "drop": 0.0,
    "resolved.teacher": None, "model_ema": False, "amp": True, "resolved.amp.dtype": "float16", "seed": 0,
    "resolved.eval_transform.crop_pct": 1.0, "resolved.eval_transform.resize": 224,
    "resolved.eval_transform.interpolation": "bicubic",
    "resolved.network.networks": 135, "resolved.network.trained": 134, "resolved.network.evaluated": 135,
    "resolved.network.train_exclude": [13], "resolved.network.sampler.type": "ros",
    "resolved.network.sampler.gap_gflops": 1.0, "resolved.network.sampler.k": None,
    "resolved.network.sampler.routes": 134, "resolved.network.stitching_layers.type": "lora",
    "resolved.network.stitching_layers.rank": 64, "resolved.network.stitching_layers.alpha": 1.0,
    "resolved.network.stitching_layers.scale": 1 / 64, "resolved.network.stitching_layers.count": 23,
    "resolved.network.stitching_layers.trainable": ["bias", "lora_A", "lora_B"],
    "resolved.network.stitching_layers.frozen": ["weight"], "resolved.network.final_norm_on_stitched_routes": True,
}
DROP_PATH = {"s": (0.05, 12), "b": (0.15, 12), "l": (0.4, 24)}  # SN-Netv2's anchor_drop_path; depths
for front, end in ("sl", "sb", "bl"):
    RECIPES[f"deit3_{front}_{end}_v2"] = {
        **V2, "resolved.network.anchors.0.drop_path.per_block": [DROP_PATH[front][0]] * DROP_PATH[front][1],
        "resolved.network.anchors.1.drop_path.per_block": [DROP_PATH[end][0]] * DROP_PATH[end][1],
        "resolved.network.anchors.0.weights": "timm pretrained, tag fb_in22k_ft_in1k",
        "resolved.network.sampler.buckets.__len__": 13}
CARDS = sorted(RECIPES)
# each card's `--dry-run` at 8 processes as tests/test_dry_run_recorded.py recorded it: that test checks that the code
# prints it byte for byte now (the same command line: the data, the card, --device cuda, WORLD_SIZE 8), this one that
# it is SN-Net's run. Read, not run again: the v2 cards price their 135 routes with the cost model for the ROS
# buckets, 5-20 s each on two cores, and both files ran each of them
RECORDED = Path(__file__).parent / "data" / "dry_run"


def dry_run(capsys, monkeypatch, config, *extra, world_size=8):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.delenv("RANK", raising=False)
    assert main(["/data/imagenet", "--stitch_config", f"configs/{config}.json", "--device", "cuda", "--dry-run",
                 *extra]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def lookup(tree, path):
    for part in path.split("."):
        tree = len(tree) if part == "__len__" else tree[int(part)] if isinstance(tree, list) else tree[part]
    return tree


@pytest.mark.parametrize("config", CARDS)
def test_recipe_card_resolves_to_snnets_run_at_8_processes(config):
    run_ = yaml.safe_load((RECORDED / f"card_{config}.yaml").read_text())
    wrong = {k: (lookup(run_, k), v) for k, v in RECIPES[config].items() if lookup(run_, k) != v}
    assert wrong == {}, f"{config}: (resolved, SN-Net's) {wrong}"


@pytest.mark.slow
def test_typed_flags_still_win_over_the_card(capsys, monkeypatch):
    run_ = dry_run(capsys, monkeypatch, "deit_ti_s_b", "--epochs", "3", "--lr", "0.1", "--no-amp-loss")
    assert (run_["epochs"], run_["resolved"]["lr"], run_["resolved"]["amp"]["covers"]) == (3, 0.1, "forward")
    assert run_["resolved"]["world_size"] == 8 and run_["resolved"]["schedule"]["total_epochs"] == 3


@pytest.mark.slow
def test_lr_scales_with_the_world_size(capsys, monkeypatch):
    """SN-Net's per-512 rule (C16): DeiT at 4 processes halves the LR; Swin scales warm-up and minimum LR too."""
    deit = dry_run(capsys, monkeypatch, "deit_ti_s_b", world_size=4)["resolved"]
    swin = dry_run(capsys, monkeypatch, "swin_ti_s_b", world_size=4)["resolved"]
    assert (deit["lr"], deit["schedule"]["warmup_lr"]) == (5e-5, 1e-7)
    assert (swin["lr"], swin["schedule"]["warmup_lr"], swin["schedule"]["min_lr"]) == (5e-4, 5e-7, 5e-6)


@pytest.mark.slow  # the launcher alone: one process
def test_dry_run_of_a_launch_resolves_its_world_size_without_starting_it(tmp_path):
    """./distributed_train.sh 8 ... --dry-run, as the README's quick tour types it: the launcher prints the run as
    its 8 processes would resolve it (SN-Net's global batch of 1024 as 8 x 128, the LR scaled from it) and starts
    none of them (ranks started afresh, SNNET_TEST_FORK_RANKS=0, would each report their imports); nothing is
    read."""
    r = run(["./distributed_train.sh", "8", tmp_path / "no-such-imagenet", "--stitch_config",
             "configs/deit_ti_s_b.json", "--dry-run"], timeout=300,
            env={"SNNET_TEST_FORK_RANKS": "0", "PYTHONPROFILEIMPORTTIME": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    printed = yaml.safe_load(r.stdout)
    assert printed["resolved"]["world_size"] == 8 and printed["resolved"]["global_batch"] == 1024
    assert printed["resolved"]["lr"] == 1e-4 and r.stdout.count("resolved:") == 1
    assert "import time:" not in r.stderr and not (tmp_path / "no-such-imagenet").exists()


# ------------------------------------------------------------------------------------------- distillation (C19)
@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    return student, teacher, torch.randint(0, 10, (6,), generator=g)


class _Teacher(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


def test_soft_distillation_equals_deits_formula(batch):
    """DeiT: KL(teacher || student) at temperature T, summed over batch and classes, x T^2 / (batch x classes)."""
    student, teacher, y = batch
    alpha, tau = 0.3, 2.0
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), _Teacher(teacher), "soft", alpha, tau)(None, student, y)
    p_t, log_p_s = torch.softmax(teacher / tau, 1), torch.log_softmax(student / tau, 1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum() * tau * tau / student.numel()
    expected = (1 - alpha) * F.cross_entropy(student, y) + alpha * kl
    assert torch.allclose(loss, expected, atol=1e-6)


def test_hard_distillation_equals_deits_formula(batch):
    """DeiT: cross-entropy of the student against the teacher's argmax; LeViT's tuple feeds the second head."""
    student, teacher, y = batch
    hard = teacher.argmax(1)
    expected = 0.5 * F.cross_entropy(student, y) + 0.5 * -torch.log_softmax(student, 1)[range(6), hard].mean()
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), _Teacher(teacher), "hard", 0.5)(None, student, y)
    assert torch.allclose(loss, expected, atol=1e-6)
    second = student.flip(0)
    two_heads = DistillationLoss(torch.nn.CrossEntropyLoss(), _Teacher(teacher), "hard", 0.5)(
        None, (student, second), y)
    expected = 0.5 * F.cross_entropy(student, y) + 0.5 * F.cross_entropy(second, hard)
    assert torch.allclose(two_heads, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------- SN-Net's accidents (C35)
def test_snnet_compat_decays_the_anchors_no_weight_decay_params():
    from helpers import TINY

    from snnet import build_snnet, parse_stitch_config
    from snnet.train.optim import param_groups
    net = build_snnet(parse_stitch_config({"anchors": TINY}), pretrained=False, num_classes=10, img_size=16)
    cls = net.anchors[0].cls_token
    in_group = lambda groups: next(g["weight_decay"] for g in groups if any(p is cls for p in g["params"]))
    assert in_group(param_groups(net, 0.05, 1.0)) == 0.0
    assert in_group(param_groups(net, 0.05, 1.0, decay_all=True)) == 0.05


def official_group(family, name, p, wd, anchor_scale):
    """(weight decay, LR scale) of one parameter in the official optimizer (C17, C18, C37), none of which saw the
    anchors' no_weight_decay names: DeiT, LeViT and SN-Netv2 use timm's 1-D/bias exclusion over the whole network
    and one LR; SN-Net's Swin (optimizer.py set_weight_decay_stitch) puts every parameter whose name holds 'stitch'
    in one group decayed at the optimizer's rate, biases included, at LR scale 1, the anchors at BASE_LR_SCALE 0.1
    with the 1-D/bias exclusion; the CNN family's modified timm (param_groups_weight_decay_stitch) excludes 1-D
    params and biases everywhere, anchors at 0.1."""
    stitch, one_d = "stitch" in name, p.ndim <= 1 or name.endswith(".bias")
    if family == "swin" and stitch:
        return wd, 1.0
    return (0.0 if one_d else wd), (1.0 if stitch else anchor_scale)


@pytest.mark.parametrize("card, family", [("deit_ti_s_b", "deit"), ("swin_ti_s_b", "swin"),
                                          ("levit_192_256", "levit"), ("resnet18_resnet50", "cnn"),
                                          ("resnet18_swin_ti", "cnn"), ("deit3_s_l_v2", "deit")])
@pytest.mark.slow
def test_snnet_compat_param_groups_are_the_familys_own(card, family):
    """--snnet-compat: every trainable parameter of the card's network (built on the meta device) gets the weight
    decay and LR scale the family's official optimizer gave it; Swin's stitching-layer biases are decayed."""
    from snnet.train.args import parse_args
    from snnet.train.network import build_network
    from snnet.train.optim import anchor_lr_scale, decays_stitch_biases, param_groups
    from snnet.train.options import RunOptions
    args, cfg = parse_args(["/data", "--stitch_config", f"configs/{card}.json", "--snnet-compat"])
    net, _ = build_network(RunOptions.from_values(vars(args)).network, cfg, structure_only=True)  # as the preflight
    groups = param_groups(net, args.weight_decay, anchor_lr_scale(args), decay_all=args.snnet_compat,
                          decay_stitch_biases=decays_stitch_biases(args, net.stitch_config))
    ours = {id(p): (g["weight_decay"], g["lr_scale"]) for g in groups for p in g["params"]}
    wrong = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            want = official_group(family, name, p, args.weight_decay, anchor_lr_scale(args))
            if ours[id(p)] != pytest.approx(want):
                wrong[name] = (ours[id(p)], want)
    assert wrong == {}, f"{card}: (ours, official) {dict(list(wrong.items())[:5])}"
    biases = [ours[id(p)][0] for n, p in net.named_parameters()
              if n.startswith("stitch_layers.") and n.endswith("bias")]
    assert biases and set(biases) == {args.weight_decay if family == "swin" else 0.0}
    if family == "swin":  # without --snnet-compat: our groups (no stitching-bias decay, the anchors' names kept)
        plain = param_groups(net, args.weight_decay, anchor_lr_scale(args))
        wd = {id(p): g["weight_decay"] for g in plain for p in g["params"]}
        assert {wd[id(p)] for n, p in net.named_parameters() if n.endswith((".bias", "bias_table"))} == {0.0}


@pytest.mark.slow
def test_swin_dry_run_shows_its_stitching_bias_decay(capsys, monkeypatch):
    groups = dry_run(capsys, monkeypatch, "swin_ti_s_b", "--snnet-compat")["resolved"]["param_groups"]
    assert groups["stitching_layers"]["bias_weight_decay"] == 0.05
    assert dry_run(capsys, monkeypatch, "swin_ti_s_b")["resolved"]["param_groups"]["stitching_layers"][
        "bias_weight_decay"] == 0.0


@pytest.mark.slow
def test_lr_one_epoch_late_reproduces_deits_stepping(digits_folder, tiny_config, tmp_path):
    """DeiT's main.py steps a per-epoch schedule after the epoch with the epoch it finished: epoch e trains at
    lr(e-1). summary.csv records each epoch's own LR."""
    lrs = {}
    for late in (False, True):
        out = tmp_path / str(late)
        r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *FAST, "--epochs", "3",
                 "--warmup-epochs", "0", "--output", out, "--experiment", "x"]
                + (["--lr-one-epoch-late"] if late else []))
        assert r.returncode == 0, r.stderr[-2000:]
        lrs[late] = [float(row["lr"]) for row in csv.DictReader(open(out / "x" / "summary.csv"))]
    assert lrs[True][0] == lrs[True][1] == lrs[False][0] and lrs[True][2] == lrs[False][1]
    assert lrs[False][0] > lrs[False][1] > lrs[False][2]
