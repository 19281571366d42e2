"""timm's training features with stitching: --model-ema, --grad-accum-steps, --grad-checkpointing, --torchcompile,
--layer-decay, --sync-bn. Runs are tiny (two 4-block ViT anchors, 16 px digits, 1-2 epochs)."""
import argparse
import csv
import json
import sys

import pytest
import torch
from helpers import FAST, assert_refused, run

from snnet import build_snnet, parse_stitch_config
from snnet.train.args import UsageError, parse_args
from snnet.train.optim import param_groups

TRAIN_IMAGES = 160  # digits_folder's train split
RNG_HEAVY = ["--reprob", "0.5", "--mixup", "0.3", "--drop-path", "0.1", "-j", "1"]
# 10 batches of 16 per epoch, 3 per step: 3 optimizer steps per epoch, the 10th batch dropped
EMA_ACCUM = ["--epochs", "2", "--model-ema", "--model-ema-warmup", "--grad-accum-steps", "3", *RNG_HEAVY]


def train(data, config, out, name, *extra, env=None):
    return run([sys.executable, "train.py", data, "--stitch_config", config, *FAST, "--output", out, "--experiment",
                name, *extra], env=env)


def summary(run_dir):
    with open(run_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def state(run_dir, name="last.pth.tar"):
    return torch.load(run_dir / name, weights_only=True)


def results(path):
    """The records of a results file without the hashes of the checkpoint and config that produced them."""
    return [{k: v for k, v in json.loads(l).items() if "sha256" not in k} for l in path.read_text().splitlines()]


def tiny_vit_snnet(widths=(8, 16), **kwargs):
    anchors = [{"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": w,
                                                                  "num_heads": 2}} for w in widths]
    cfg = parse_stitch_config({"anchors": anchors, "skip_final_norm": False})
    return build_snnet(cfg, pretrained=False, num_classes=10, img_size=16, **kwargs)


# ------------------------------------------------------------------------------------------------ EMA + accumulation
@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, digits_folder, tiny_config):
    out = tmp_path_factory.mktemp("ema")
    r = train(digits_folder, tiny_config, out, "whole", *EMA_ACCUM)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr + r.stdout


@pytest.mark.slow
def test_model_ema_is_checkpointed_validated_and_evaluated(ema_run):
    out, log = ema_run
    s = state(out / "whole")
    assert s["global_step"] == 2 * 3  # optimizer steps: 10 batches // 3 per epoch
    ema, weights = s["state_dict_ema"], s["state_dict"]
    assert ema.keys() == weights.keys()  # keyed like state_dict: loads into the same network
    assert any(not torch.equal(ema[k], weights[k]) for k in weights if weights[k].is_floating_point())
    # as timm: the EMA's panel metrics are the epoch's metrics (summary.csv, hence model_best)
    rows = summary(out / "whole")
    for epoch, row in enumerate(rows):
        line = next(l for l in log.splitlines() if f"epoch {epoch} (EMA):" in l)
        assert f"mean top-1 {float(row['eval_top1']):.3f} loss {float(row['eval_loss']):.4f}" in line
    assert state(out / "whole", "model_best.pth.tar")["metric"] == max(float(r["eval_top1"]) for r in rows)
    model_lines = (out / "whole" / "stitches_res.txt").read_text().splitlines()
    ema_lines = (out / "whole" / "stitches_res_ema.txt").read_text().splitlines()
    assert len(model_lines) == len(ema_lines) == 12  # every stitch, for both weights
    assert "3 steps/epoch of 3 batches" in log


@pytest.mark.slow
def test_grad_accum_and_ema_resume_mid_epoch_bit_identical(ema_run, digits_folder, tiny_config):
    """Killed after optimizer step 5 (epoch 1, 2 steps = 6 batches in) with a recovery checkpoint every step: the
    resumed run skips 6 batches, restores weights, optimizer and EMA, and ends bit-identical to the whole run."""
    out, _ = ema_run
    cmd = [*EMA_ACCUM, "--auto-resume", "--recovery-interval", "1"]
    r = train(digits_folder, tiny_config, out, "killed", *cmd, env={"SNNET_FAULT_KILL_AT_STEP": "5"})
    assert r.returncode == -9, r.stderr[-2000:]
    rec = state(out / "killed", "recovery.pth.tar")
    assert (rec["epoch"], rec["batch_idx"], rec["global_step"]) == (1, 2, 5) and "state_dict_ema" in rec
    r = train(digits_folder, tiny_config, out, "killed", *[a if a != "3" else "2" for a in cmd])
    assert r.returncode == 2 and "--grad-accum-steps 3 cannot continue its epoch with 2" in r.stderr
    r = train(digits_folder, tiny_config, out, "killed", *cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = state(out / "whole"), state(out / "killed")
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    assert (out / "whole" / "summary.csv").read_bytes() == (out / "killed" / "summary.csv").read_bytes()
    for name in ("stitches_res.txt", "stitches_res_ema.txt"):  # the checkpoint hashes differ: other args
        assert results(out / "whole" / name) == results(out / "killed" / name), name


@pytest.mark.slow
def test_grad_accum_two_half_batches_equal_one_full_batch(tmp_path, digits_folder, tiny_config):
    """-b 8 --grad-accum-steps 2 and -b 16 see the same images per step and train the same stitch: the same run up
    to float rounding, with one optimizer step per 2 batches."""
    b = FAST.index("-b")
    common = FAST[:b] + FAST[b + 2:] + ["--epochs", "2"]
    rows, states = [], []
    for name, extra in (("full", ["-b", "16"]), ("accum", ["-b", "8", "--grad-accum-steps", "2"])):
        r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, *common, *extra,
                 "--output", tmp_path, "--experiment", name])
        assert r.returncode == 0, r.stderr[-3000:]
        rows.append(summary(tmp_path / name))
        states.append(state(tmp_path / name))
    assert states[0]["global_step"] == states[1]["global_step"] == 2 * TRAIN_IMAGES // 16
    for full, accum in zip(*rows):
        for col in ("train_loss", "eval_loss"):
            assert float(full[col]) == pytest.approx(float(accum[col]), abs=1e-5), col
    for k, v in states[0]["state_dict"].items():
        assert torch.allclose(v, states[1]["state_dict"][k], atol=1e-5), k


@pytest.mark.slow
def test_grad_accum_larger_than_the_epoch_is_refused(tmp_path, digits_folder, tiny_config):
    r = train(digits_folder, tiny_config, tmp_path, "x", "--epochs", "1", "--grad-accum-steps", "11")
    assert r.returncode == 2 and "--grad-accum-steps 11 exceeds the 10 training batch(es)" in r.stderr


# ------------------------------------------------------------------------------------- gradient checkpointing
def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    import torch.utils.checkpoint as tuc
    net = tiny_vit_snnet(drop_path_rate=0.2)  # drop-path: the recomputation must replay the same masks
    calls = []
    real = tuc.checkpoint
    monkeypatch.setattr(tuc, "checkpoint", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.randn(4, 3, 16, 16)
    net.train()
    for cfg_id in range(net.num_configs):
        grads = []
        for on in (False, True):
            net.set_grad_checkpointing(on)
            net.zero_grad(set_to_none=True)
            calls.clear()
            torch.manual_seed(cfg_id)
            net(x, cfg_id).logsumexp(1).mean().backward()
            blocks = sum(1 for s in net.routes[cfg_id] if s[0] == "unit" and net.units[s[1]][s[2]].kind == "block")
            assert len(calls) == (blocks if on else 0)
            assert all(k == {"use_reentrant": False} for k in calls)
            grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for n, g in grads[0].items():
            assert torch.allclose(g, grads[1][n], rtol=1e-5, atol=1e-7), (cfg_id, n)
    net.eval()  # only while training
    calls.clear()
    with torch.no_grad():
        net(x, 0)
    net.train()
    with torch.no_grad():
        net(x, 0)
    assert not calls


# ------------------------------------------------------------------------------------------------ --torchcompile
def test_each_route_trains_as_one_graph_compiled_once():
    """compile_routes: a route's first training step compiles it into one graph (a backend that counts its graphs
    sees one per route, however the routes alternate), the logits and gradients are eager's, and evaluation runs
    eagerly."""
    torch.manual_seed(0)
    net = tiny_vit_snnet((8, 16, 24)).train()
    x = torch.randn(4, 3, 16, 16)
    routes = [0, net.num_configs - 1, 3]

    def step(c):
        net.zero_grad(set_to_none=True)
        out = net(x, c)
        out.logsumexp(1).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    want = {c: step(c) for c in routes}
    graphs = []
    net.compile_routes(lambda gm, inputs: graphs.append(gm) or gm.forward)
    for c in routes + routes[::-1] + routes:
        out, grads = step(c)
        torch.testing.assert_close(out, want[c][0])
        assert grads.keys() == want[c][1].keys()
        for n, g in grads.items():
            torch.testing.assert_close(g, want[c][1][n], msg=n)
    assert len(graphs) == len(routes)
    assert sorted(net._compiled_routes) == sorted(routes)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, 5), net.run_steps(net.routes[5], x))
    assert len(graphs) == len(routes)


# ---------------------------------------------------------------- train.py runs: compile (eager) and checkpointing
@pytest.fixture(scope="module")
def baseline(tmp_path_factory, digits_folder, tiny_config):
    out = tmp_path_factory.mktemp("baseline")
    r = train(digits_folder, tiny_config, out, "plain", "--epochs", "1", "--drop-path", "0.1")
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "plain"


@pytest.mark.parametrize("flags,logged", [(["--torchcompile", "eager"], "torch.compile (eager) of each route"),
                                          (["--grad-checkpointing"], "gradient checkpointing")])
@pytest.mark.slow
def test_compile_and_grad_checkpointing_train_like_the_plain_run(baseline, tmp_path, digits_folder, tiny_config,
                                                                 flags, logged):
    r = train(digits_folder, tiny_config, tmp_path, "run", "--epochs", "1", "--drop-path", "0.1", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged in r.stderr
    want, got = summary(baseline)[0], summary(tmp_path / "run")[0]
    assert float(got["train_loss"]) == pytest.approx(float(want["train_loss"]), abs=1e-5)
    assert float(got["eval_loss"]) == pytest.approx(float(want["eval_loss"]), abs=1e-5)
    assert state(tmp_path / "run")["state_dict"].keys() == state(baseline)["state_dict"].keys()  # no _orig_mod.


def test_torchcompile_flag_parses_like_timm():
    base = ["/d", "--model", "resnet18"]
    assert parse_args(base)[0].torchcompile is None
    assert parse_args(base + ["--torchcompile"])[0].torchcompile == "inductor"
    assert parse_args(base + ["--torchcompile", "eager"])[0].torchcompile == "eager"


# -------------------------------------------------------------------------------------------------- layer decay
def test_layer_decay_scales_within_each_anchor():
    net = tiny_vit_snnet((8, 16, 24))
    rate, anchor_scale, depth = 0.7, 0.5, 5  # 4 blocks: stem 0, blocks 1..4, norm/head 5
    groups = param_groups(net, 0.05, anchor_scale, layer_decay=rate)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    seen_stitch = 0
    for name, p in net.named_parameters():
        if name.startswith("stitch_layers."):
            expected, seen_stitch = 1.0, seen_stitch + 1  # new layers between two depths: not decayed
        else:
            local = name.split(".", 2)[2]
            layer = (int(local.split(".")[1]) + 1 if local.startswith("blocks.") else
                     depth if local.startswith(("norm.", "head.", "fc_norm.")) else 0)
            assert layer or local.startswith(("cls_token", "pos_embed", "patch_embed.")), name
            expected = anchor_scale * rate ** (depth - layer)
        assert scale_of[id(p)] == pytest.approx(expected), name
        assert decay_of[id(p)] == (0.0 if p.ndim <= 1 or name in net.no_weight_decay() else 0.05), name
    assert seen_stitch
    # groups are (anchor/stitch, decay/no-decay, scale): 6 anchor scales x 2 + the stitching layers' 2
    assert len(groups) == 6 * 2 + 2
    # without --layer-decay: anchors vs stitching layers only, as before
    assert sorted((g["lr_scale"], g["weight_decay"]) for g in param_groups(net, 0.05, anchor_scale)) == [
        (0.5, 0.0), (0.5, 0.05), (1.0, 0.0), (1.0, 0.05)]


def test_adam_and_adamw_run_fused_on_the_cpu():
    """Adam and AdamW of a CPU network are torch's fused step (its square root the exact instruction, the same bits
    on every CPU); other optimizers are timm's as they are."""
    from snnet.train.optim import create_optimizer
    from snnet.train.options import OptimOptions
    net = tiny_vit_snnet()
    for name, fused in (("adamw", True), ("adam", True), ("sgd", None), ("lookahead_adamw", None)):
        opt = create_optimizer(OptimOptions(opt=name, weight_decay=0.05), net, 1e-3)
        groups = getattr(opt, "base_optimizer", opt).param_groups
        assert {g.get("fused") for g in groups} == {fused}, name


@pytest.mark.slow
def test_layer_decay_reaches_the_optimizer_and_sync_bn_is_a_no_op_on_one_process(tmp_path, digits_folder,
                                                                                 tiny_config):
    r = train(digits_folder, tiny_config, tmp_path, "ld", "--epochs", "1", "--layer-decay", "0.5", "--sync-bn")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--sync-bn: one process, nothing to synchronise" in r.stderr
    scales = {g["lr_scale"] for g in state(tmp_path / "ld")["optimizer"]["param_groups"]}
    assert scales == {0.5 ** k for k in range(6)}  # stitching layers' 1.0 = the anchors' norm/head 0.5 ** 0


# ------------------------------------------------------------------------------------------------------- sync-bn
def _sync_args(**kw):
    return argparse.Namespace(**{"sync_bn": True, "eval": False, "distributed": True, "sample_sync": True,
                                 "dist_bn": "reduce", **kw})


def test_sync_bn_rules_and_in_place_conversion():
    """--sync-bn's rules, checked once before any work (`check_sync_bn`, from the preflight's `check_structure`),
    and the conversion."""
    from snnet.train.options import RunOptions
    from snnet.train.preflight import check_sync_bn
    from snnet.train.trainer import prepare
    net = tiny_vit_snnet()
    with pytest.raises(UsageError, match="--sync-bn needs --sample-sync"):
        check_sync_bn(_sync_args(sample_sync=False), 2, "cpu", net.num_configs)
    with pytest.raises(UsageError, match="--sync-bn needs CUDA devices: .* drop --sync-bn"):
        check_sync_bn(_sync_args(), 2, "cpu", net.num_configs)  # this torch's SyncBatchNorm is CUDA-only
    check_sync_bn(_sync_args(sample_sync=False), 1, "cpu", net.num_configs)  # one process: nothing to check
    with pytest.raises(UsageError, match="--sync-bn needs --sample-sync"):  # what distributed_train.sh's check
        check_sync_bn(_sync_args(sample_sync=False), 2, None, net.num_configs)  # runs on the meta network
    # a network with BatchNorm (ResNet anchors), converted as on CUDA: every BN replaced in place, same parameters
    # and keys, and the units run the replacements (eval mode runs on CPU)
    cfg = parse_stitch_config({"anchors": ["resnet18", "resnet50"], "input_size": 32})
    net = build_snnet(cfg, pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    params, keys, before = [id(p) for p in net.parameters()], list(net.state_dict()), net(x, 3)
    options = RunOptions.from_values({"data_dir": "", "sync_bn": True, "sample_sync": True, "device": "cpu"})
    net = prepare(net, options.replaced(distributed=True))
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules()) == bns > 0
    assert not any(type(m) is torch.nn.BatchNorm2d for m in net.modules())
    assert [id(p) for p in net.parameters()] == params and list(net.state_dict()) == keys
    assert torch.allclose(net(x, 3), before)


@pytest.mark.dist
def test_sync_bn_on_cpu_processes_is_refused_before_they_start(tmp_path, digits_folder, tiny_config):
    """By distributed_train.sh's check (each rank would refuse the same: the test above), one line and exit 2,
    before torchrun starts a process or the run's folder is made."""
    r = run(["./distributed_train.sh", "2", digits_folder, "--stitch_config", tiny_config, *FAST, "--epochs", "1",
             "--sync-bn", "--sample-sync", "--output", tmp_path, "--experiment", "sbn"])
    assert_refused(r.returncode, r.stderr, "--sync-bn needs CUDA devices")
    assert "torch.distributed" not in r.stderr and not (tmp_path / "sbn").exists()


def test_the_preflight_checks_sync_bn_once_with_the_device_and_the_network(tiny_config):
    """One call of `check_sync_bn`, in `check_structure`: the meta network's stitches (--sample-sync) and, where
    the machine is known (not a dry run's), its device."""
    from snnet.train.args import parse_args
    from snnet.train.options import RunOptions
    from snnet.train.preflight import check_structure

    def options(*flags, world_size=2):
        args, cfg = parse_args(["/d", "--stitch_config", str(tiny_config), "--no-pretrained", "--sync-bn", *flags])
        return RunOptions.from_values(vars(args)).replaced(world_size=world_size), cfg
    with pytest.raises(UsageError, match="--sync-bn needs --sample-sync"):
        check_structure(*options())
    check_structure(*options("--sample-sync"))  # a dry run: another machine's device
    check_structure(*options("--sample-sync", world_size=1), device_type="cpu")  # one process: nothing to sync
    with pytest.raises(UsageError, match="--sync-bn needs CUDA devices"):
        check_structure(*options("--sample-sync"), device_type="cpu")
