"""Least-squares init: exact against a direct solve, better than SN-Net's averaging, eval mode, DDP-consistent."""
import copy
import shutil
import statistics
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import FAST, run  # noqa: E402

from snnet import build_snnet, parse_stitch_config
from snnet.stitching.layers import to_rows
from snnet.stitching.ls_init import ls_init, stitch_errors

SMALL = dict(img_size=32, patch_size=8)


def small_deit(names=("deit_tiny_patch16_224", "deit_small_patch16_224"), seed=0, drop_path_rate=None, **extra):
    torch.manual_seed(seed)
    cfg = parse_stitch_config({"anchors": list(names), **extra})
    return build_snnet(cfg, pretrained=False, drop_path_rate=drop_path_rate, **SMALL)


def block_out(anchor, x, upto):
    """Output of block `upto` (-1: the embedding) of a timm ViT, computed by hand."""
    h = anchor.norm_pre(anchor.patch_drop(anchor._pos_embed(anchor.patch_embed(x))))
    for b in range(upto + 1):
        h = anchor.blocks[b](h)
    return h


def direct_solve(X, Y):
    """SN-Net's ps_inv, in float64: A = pinv([X | 1]) Y."""
    Xa = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    return torch.linalg.pinv(Xa) @ Y


@torch.no_grad()
@pytest.mark.slow
def test_joint_and_average_equal_direct_least_squares(digits_images):
    x = digits_images[0][:96]
    model = small_deit()
    model.eval()
    ti, s = model.anchors
    address = (0, 3)  # layer 3 of Ti->S: positions (3,4), (4,3), (4,4)
    positions = [st.position for st in model.plan.positions_of_layer(address)]
    assert positions == [(3, 4), (4, 3), (4, 4)]
    rows = [(to_rows(block_out(ti, x, j), "tokens").double(), to_rows(block_out(s, x, k - 1), "tokens").double())
            for j, k in positions]
    joint = direct_solve(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))
    average = torch.stack([direct_solve(X, Y) for X, Y in rows]).mean(0)
    for mode, A in (("joint", joint), ("average", average)):
        ls_init(model, [x[:50], x[50:]], mode=mode)  # two batches: the normal equations are streamed
        layer = model.stitch_layer(address).transform
        assert torch.allclose(layer.weight.double(), A[:-1].T, atol=2e-4), mode
        assert torch.allclose(layer.bias.double(), A[-1], atol=2e-4), mode


@torch.no_grad()
@pytest.mark.slow
def test_ls_quality_on_held_out_digits(digits_images):
    """Right after init, stitched features are close to the end anchor's own features at the same depth, on images
    the fit never saw; the joint solve is at least as close as SN-Net's per-position averaging. The anchors' features
    of a batch are computed once (`model.capture` memoised by batch): the fits change only the stitching layers, and
    the anchors are checked unchanged at the end; three passes of DeiT-Ti/S/B instead of eight."""
    x = digits_images[0]
    fit, held_out = x[:96], x[1500:1564]
    model = small_deit(("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"))
    anchors = {k: v.clone() for k, v in model.anchors.state_dict().items()}
    capture, captured = model.capture, {}

    def capture_once(images, points):
        key = (id(images), repr(sorted((a, sorted(units)) for a, units in points.items())))
        if key not in captured:
            captured[key] = (images, capture(images, points))  # the batch kept: its id is not reused
        return captured[key][1]
    model.capture = capture_once
    batches = [fit[:48], fit[48:]]
    before = statistics.mean(stitch_errors(model, held_out).values())
    results = {}
    for mode in ("average", "joint"):
        reports = ls_init(model, batches, mode=mode)
        assert len(reports) == 22 and all(r.rows == 96 * 17 * len(r.positions) for r in reports)
        errs = stitch_errors(model, held_out)
        results[mode] = (statistics.mean(errs.values()), max(errs.values()))
    assert len(captured) == 3  # the two fit batches and the held-out images, each once
    assert all(torch.equal(v, anchors[k]) for k, v in model.anchors.state_dict().items())
    print(f"\nheld-out relative feature error (68 positions): default init {before:.4f}; "
          f"average (SN-Net) mean {results['average'][0]:.4f} max {results['average'][1]:.4f}; "
          f"joint mean {results['joint'][0]:.4f} max {results['joint'][1]:.4f}")
    assert results["joint"][0] <= results["average"][0]
    assert results["joint"][0] < 0.5 * before
    assert results["joint"][1] < 1.0


@torch.no_grad()
@pytest.mark.slow
def test_ls_runs_in_eval_mode_and_is_deterministic(digits_images):
    """Drop-path would make the fit random in train mode (SN-Net); here two fits are identical and the mode is kept."""
    x = digits_images[0][:64]
    model = small_deit(drop_path_rate=0.5)  # real drop-path modules in every block
    model.train()
    ls_init(model, [x])
    first = {k: v.clone() for k, v in model.stitch_layers.state_dict().items()}
    ls_init(model, [x])
    assert model.training
    for k, v in model.stitch_layers.state_dict().items():
        assert torch.equal(v, first[k]), k


def test_bad_ls_mode():
    with pytest.raises(ValueError, match="ls mode 'mean' is not known.*joint"):
        ls_init(small_deit(), [], mode="mean")


def spawn_forked(worker, args):
    """mp.spawn of 2 processes, forked from this one (torch, timm and snnet imported): spawn's fresh interpreters
    each imported them again (~6 CPU-s apiece), which these checks of the gloo collectives do not need."""
    mp.start_processes(worker, args=args, nprocs=2, join=True, start_method="fork")


def _ddp_worker(rank, world, init_file, x, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = small_deit()
    half = x.shape[0] // world
    ls_init(model, [x[rank * half:(rank + 1) * half]])
    torch.save(model.stitch_layers.state_dict(), f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.dist
def test_ddp_sums_statistics_and_broadcasts(tmp_path, digits_images):
    """Two gloo processes, each with half the images: both end with the layers a single process fits on all."""
    x = digits_images[0][:64]
    spawn_forked(_ddp_worker, (2, str(tmp_path / "init"), x, str(tmp_path / "out")))
    r0 = torch.load(tmp_path / "out.0", weights_only=True)
    r1 = torch.load(tmp_path / "out.1", weights_only=True)
    single = small_deit()
    ls_init(single, [x])
    for k, v in single.stitch_layers.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        assert torch.allclose(r0[k], v, atol=1e-4), k


# ------------------------------------------------------------------------------------------ --ls-mode snnet (SN-Net's)
def sn_ps_inv(x1, x2):
    """SN-Net's ps_inv (stitching_resnet_swin/timm/models/snnet.py) on CPU features, with PyTorch 1.10's pinv cutoff."""
    if x1.dim() == 4:  # NCHW -> (b h w, c)
        x1, x2 = x1.permute(0, 2, 3, 1), x2.permute(0, 2, 3, 1)
    x1, x2 = x1.reshape(-1, x1.shape[-1]), x2.reshape(-1, x2.shape[-1])
    x1_ones = torch.ones(x1.shape[0], x1.shape[1] + 1)
    x1_ones[:, :-1] = x1
    A_ones = torch.matmul(torch.linalg.pinv(x1_ones, rtol=1e-15), x2).T
    return A_ones[..., :-1], A_ones[..., -1]


def sn_stitching_dicts(model, key):
    """SN-Net's defaultdict(set): per layer, the first stitch's (j, k) of every stitched config in cfg_id order."""
    dicts = {}
    for route in model.plan.routes:
        if route.stitches:
            dicts.setdefault(key(route.stitches[0].layer), set()).add(route.stitches[0].position)
    return dicts


def sn_average(feats_front, feats_end, positions):
    ws, bs = zip(*[sn_ps_inv(feats_front[j], feats_end[k - 1]) for j, k in positions])
    return torch.stack(ws).mean(dim=0), torch.stack(bs).mean(dim=0)


def resnet_stage_features(r, x):
    """SN-Net's ResNet.extract_stage_features: stem, then every block of every stage, features on CPU."""
    x = r.maxpool(r.act1(r.bn1(r.conv1(x))))
    feats = {}
    for s, layer in enumerate([r.layer1, r.layer2, r.layer3, r.layer4]):
        feats[s] = {-1: x.detach().cpu()}
        for i, blk in enumerate(layer):
            x = blk(x)
            feats[s][i] = x.detach().cpu()
    return feats


def small_resnets(drop_path_rate=0.1):
    torch.manual_seed(0)
    model = build_snnet(parse_stitch_config({"anchors": ["resnet18", "resnet34"]}), pretrained=False, num_classes=10,
                        img_size=32, drop_path_rate=drop_path_rate)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # timm zero-inits each block's last BN: make the blocks differ from identities
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def bn_buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@torch.no_grad()
@pytest.mark.slow
def test_snnet_mode_is_snnet_init_bit_for_bit_with_batchnorm(digits_images):
    """ResNet-18 -> ResNet-34 with BatchNorm and drop-path: `--ls-mode snnet` equals SN-Net's code re-derived with plain
    torch (train mode, every anchor through all blocks, float32 pinv per position, mean) bitwise, stitching weights and
    BN running statistics alike; eval-mode `average` (float64, running statistics kept) gives other numbers."""
    x = digits_images[0][:24]
    model = small_resnets()
    model.eval()  # the caller's mode is restored afterwards
    ref, avg = copy.deepcopy(model), copy.deepcopy(model)
    before = bn_buffers(model)
    torch.manual_seed(7)
    reports = ls_init(model, [x], mode="snnet")
    assert not model.training and not any(m.training for m in model.modules())

    torch.manual_seed(7)  # the re-derivation: same drop-path draws, anchors in order
    ref.train()
    feats = [resnet_stage_features(a, x) for a in ref.anchors]
    dicts = sn_stitching_dicts(ref, tuple)
    for spec in ref.plan.layers:
        s = spec.stage
        w, b = sn_average(feats[spec.front][s], feats[spec.end][s], dicts[spec.address])
        layer = model.stitch_layer(spec.address).transform
        assert torch.equal(layer.weight.view(w.shape), w), spec.address
        assert torch.equal(layer.bias, b), spec.address
    assert len(reports) == 4 and [len(dicts[r.address]) for r in reports] == [2, 1, 3, 2]
    after, derived = bn_buffers(model), bn_buffers(ref)
    assert after.keys() == derived.keys() and len(after) > 100
    for k in after:
        assert torch.equal(after[k], derived[k]), k
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(changed) == len(after)  # every BN, layer4 included (SN-Net ran all stages), saw the batch once
    assert all(int(v) == 1 for k, v in after.items() if k.endswith("num_batches_tracked"))

    ls_init(avg, [x], mode="average")
    assert bn_buffers(avg).keys() == before.keys() and all(torch.equal(bn_buffers(avg)[k], before[k]) for k in before)
    diffs = []
    for spec in model.plan.layers:
        ws, wa = model.stitch_layer(spec.address).transform.weight, avg.stitch_layer(spec.address).transform.weight
        diffs.append(float((ws - wa).norm() / wa.norm()))
    print(f"\nsnnet vs average stitching weights, relative difference per layer: {[f'{d:.3f}' for d in diffs]}")
    assert min(diffs) > 1e-3


def vit_features(anchor, x):
    """SN-Net's ViTAnchor.extract_block_features: embedding, then every block."""
    h = anchor.norm_pre(anchor.patch_drop(anchor._pos_embed(anchor.patch_embed(x))))
    outs = {-1: h.detach()}
    for i, blk in enumerate(anchor.blocks):
        h = blk(h)
        outs[i] = h.detach()
    return outs


@torch.no_grad()
@pytest.mark.slow
def test_snnet_mode_drop_path_is_stochastic_and_reruns_each_pair(digits_images):
    """Three ViTs with drop-path: the snnet init draws drop-path (other seed, other layers; same seed, same layers), and
    it is SN-Net's DeiT loop bitwise: each anchor pair runs both anchors again, the mean over a set of positions."""
    x = digits_images[0][:32]
    # DeiT-Ti/S/B's depth and layout at a sixth of their widths (the loop and the draws do not depend on the width)
    anchors = [{"name": name, "model_kwargs": {"embed_dim": width, "num_heads": 2}} for name, width in
               (("deit_tiny_patch16_224", 32), ("deit_small_patch16_224", 64), ("deit_base_patch16_224", 128))]
    torch.manual_seed(0)
    base = build_snnet(parse_stitch_config({"anchors": anchors}), pretrained=False, drop_path_rate=0.3, **SMALL)
    fits = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)
        ls_init(model, [x], mode="snnet")
        fits[name] = model.stitch_layers.state_dict()
    for k in fits["a"]:
        assert torch.equal(fits["a"][k], fits["b"][k]), k
    assert not any(torch.equal(fits["a"][k], fits["c"][k]) for k in fits["a"])

    ref = copy.deepcopy(base).train()
    torch.manual_seed(1)
    dicts = sn_stitching_dicts(ref, lambda address: address[-1])  # SN-Net keyed plain-ViT sets by layer id alone
    pairs = list(dict.fromkeys((s.front, s.end) for s in ref.plan.layers))
    assert pairs == [(0, 1), (1, 2)]
    for c, (front, end) in enumerate(pairs):
        ff, fe = vit_features(ref.anchors[front], x), vit_features(ref.anchors[end], x)
        for spec in [s for s in ref.plan.layers if s.address[0] == c]:
            w, b = sn_average(ff, fe, dicts[spec.address[-1]])
            key = ".".join(map(str, spec.address)) + ".transform"
            assert torch.equal(fits["a"][key + ".weight"], w) and torch.equal(fits["a"][key + ".bias"], b), key


def _snnet_ddp_worker(rank, world, init_file, x, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = small_resnets(drop_path_rate=0.0)
    ls_init(model, [x[rank]], mode="snnet")  # each rank its own batch, as SN-Net's per-rank loaders
    torch.save({**model.stitch_layers.state_dict(), **bn_buffers(model)}, f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.dist
def test_snnet_mode_ddp_keeps_rank0(tmp_path, digits_images):
    """Two gloo processes on different batches end with rank 0's layers and BN statistics, as SN-Net's DDP did."""
    x = digits_images[0][:32].reshape(2, 16, 3, 32, 32)
    spawn_forked(_snnet_ddp_worker, (2, str(tmp_path / "init"), x, str(tmp_path / "out")))
    r0 = torch.load(tmp_path / "out.0", weights_only=True)
    r1 = torch.load(tmp_path / "out.1", weights_only=True)
    single = small_resnets(drop_path_rate=0.0)
    ls_init(single, [x[0]], mode="snnet")
    own = {**single.stitch_layers.state_dict(), **bn_buffers(single)}
    assert r0.keys() == r1.keys() == own.keys()
    for k in own:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], own[k]), k


@pytest.mark.slow
def test_train_py_ls_mode_snnet_with_mixup(tmp_path, digits_folder, tiny_config):
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", tiny_config, "--ls-mode", "snnet",
             "--mixup", "0.5", "--epochs", "1", "--output", tmp_path, "--experiment", "snnet", *FAST])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "LS init: 3 stitching layers fitted on 32 augmented training images per process (snnet)" in r.stderr
    only_val = tmp_path / "only_val"
    shutil.copytree(digits_folder / "val", only_val / "val")
    r = run([sys.executable, "train.py", only_val, "--stitch_config", tiny_config, "--ls-mode", "snnet", "--eval",
             "--output", tmp_path, *FAST])
    assert r.returncode == 2, r.stderr[-3000:]
    error = r.stderr.strip().splitlines()[-1]  # one line, after timm's data-config log
    assert error.startswith("error: --ls-mode snnet fits on a training batch") and "has no train/ folder" in error
    assert error.endswith("or use --ls-mode joint")


# ------------------------------------------------------------------------------- --ls-mode snnet on SN-Netv2's plan
def small_two_way(drop_path_rate=0.3):
    vit = lambda width, depth: {"name": "deit3_small_patch16_224", "model_kwargs": {
        "patch_size": 8, "depth": depth, "embed_dim": width, "num_heads": 2, "drop_path_rate": drop_path_rate}}
    torch.manual_seed(0)
    cfg = parse_stitch_config({"anchors": [vit(16, 3), vit(32, 6)], "stitch_plan": "two_way",
                               "skip_final_norm": False, "drop_path_schedule": "constant",
                               "stitch_layer": {"type": "lora", "rank": 4}})
    return build_snnet(cfg, pretrained=False, num_classes=10, img_size=32)


def snnetv2_init(model, x, dtype):
    """SN-Netv2's initialize_stitching_weights re-derived with plain torch: each anchor's block features once, in eval
    mode, under CPU autocast in `dtype`; per two-way position (j, k) of layer l: ps_inv(front block j, end block
    k - 1) with torch's default pinv cut-off."""
    model.eval()
    with torch.autocast("cpu", dtype=dtype):
        feats = [vit_features(a, x) for a in model.anchors]
    out = {}
    for spec in model.plan.layers:
        (st,) = model.plan.positions_of_layer(spec.address)
        X = feats[st.front][st.j].float().reshape(-1, feats[st.front][st.j].shape[-1])
        Y = feats[st.end][st.k - 1].float().reshape(-1, feats[st.end][st.k - 1].shape[-1])
        Xa = torch.ones(X.shape[0], X.shape[1] + 1)
        Xa[:, :-1] = X
        A = torch.matmul(torch.linalg.pinv(Xa), Y).T
        out[spec.address] = (A[..., :-1], A[..., -1])
    return out


@torch.no_grad()
def test_snnet_mode_v2_is_snnetv2s_fit(digits_images):
    """SN-Netv2's init (`snnet_version=2`): eval mode (drop-path 0.3 in every block draws nothing: two fits are equal
    whatever the RNG), every anchor once, under autocast in the AMP dtype, torch's default pinv cut-off; equal to the
    re-derivation bitwise, and different without autocast and from SN-Net's v1 init (train mode, 1e-15 cut-off)."""
    x = digits_images[0][:8]
    fits = {}
    for name, seed, dtype in (("a", 1, torch.bfloat16), ("b", 2, torch.bfloat16), ("fp32", 1, None)):
        model = small_two_way()
        model.train()
        torch.manual_seed(seed)
        reports = ls_init(model, [x], mode="snnet", snnet_version=2, amp_dtype=dtype)
        assert model.training and len(reports) == len(model.plan.layers) == 5
        fits[name] = {spec.address: model.stitch_layer(spec.address).affine() for spec in model.plan.layers}
    v1 = small_two_way()
    torch.manual_seed(1)
    ls_init(v1, [x], mode="snnet")
    expected = snnetv2_init(small_two_way(), x, torch.bfloat16)
    for address, (w, b) in expected.items():
        assert torch.equal(fits["a"][address][0], w.double()) and torch.equal(fits["a"][address][1], b.double())
        assert torch.equal(fits["a"][address][0], fits["b"][address][0]), address  # eval mode: no drop-path draw
        assert not torch.equal(fits["fp32"][address][0], fits["a"][address][0]), address  # autocast matters
        assert not torch.equal(v1.stitch_layer(address).affine()[0], fits["a"][address][0]), address


def test_train_py_picks_snnetv2s_fit_for_the_two_way_plan():
    from snnet.train.ls_data import snnet_version
    assert snnet_version(parse_stitch_config({"anchors": ["a", "b"], "stitch_plan": "two_way"})) == 2
    assert snnet_version(parse_stitch_config({"anchors": ["a", "b"]})) == 1 and snnet_version(None) == 1
    with pytest.raises(ValueError, match="snnet_version 3"):
        ls_init(small_two_way(), [torch.zeros(2, 3, 32, 32)], mode="snnet", snnet_version=3)


def test_ps_inv_cut_offs_of_snnet_and_snnetv2():
    """SN-Net's torch 1.10 cut-off (1e-15 relative) keeps a near-dependent column that torch 2.x's default
    (eps x max(rows, cols)), SN-Netv2's, cuts: the two solves differ on such features and agree on well-posed ones."""
    from snnet.stitching.ls_init import SNNET_PINV_RTOL, ps_inv
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(50, 4, generator=g), torch.randn(50, 3, generator=g)
    w1, _ = ps_inv(X, Y)
    w2, _ = ps_inv(X, Y, None)
    assert torch.allclose(w1, w2, atol=1e-5) and SNNET_PINV_RTOL == 1e-15
    X[:, 3] = X[:, 2] + 1e-6 * torch.randn(50, generator=g)
    w1, _ = ps_inv(X, Y)
    w2, _ = ps_inv(X, Y, None)
    assert (w1 - w2).abs().max() > 1.0
