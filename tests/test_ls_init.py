"""Least-squares init: exact against a direct solve, better than SN-Net's averaging, eval mode, DDP-consistent."""
import os
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from snnet import build_snnet, parse_stitch_config
from snnet.layers import to_rows
from snnet.ls_init import ls_init, stitch_errors

SMALL = dict(img_size=32, patch_size=8)


def small_deit(names=("deit_tiny_patch16_224", "deit_small_patch16_224"), seed=0, **extra):
    torch.manual_seed(seed)
    cfg = parse_stitch_config({"anchors": list(names), **extra})
    return build_snnet(cfg, pretrained=False, **SMALL)


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
def test_ls_quality_on_held_out_digits(digits_images):
    """Right after init, stitched features are close to the end anchor's own features at the same depth, on images
    the fit never saw; the joint solve is at least as close as SN-Net's per-position averaging."""
    x = digits_images[0]
    fit, held_out = x[:96], x[1500:1564]
    model = small_deit(("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"))
    before = statistics.mean(stitch_errors(model, held_out).values())
    results = {}
    for mode in ("average", "joint"):
        reports = ls_init(model, [fit[:48], fit[48:]], mode=mode)
        assert len(reports) == 22 and all(r.rows == 96 * 17 * len(r.positions) for r in reports)
        errs = stitch_errors(model, held_out)
        results[mode] = (statistics.mean(errs.values()), max(errs.values()))
    print(f"\nheld-out relative feature error (68 positions): default init {before:.4f}; "
          f"average (SN-Net) mean {results['average'][0]:.4f} max {results['average'][1]:.4f}; "
          f"joint mean {results['joint'][0]:.4f} max {results['joint'][1]:.4f}")
    assert results["joint"][0] <= results["average"][0]
    assert results["joint"][0] < 0.5 * before
    assert results["joint"][1] < 1.0


@torch.no_grad()
def test_ls_runs_in_eval_mode_and_is_deterministic(digits_images):
    """Drop-path would make the fit random in train mode (SN-Net); here two fits are identical and the mode is kept."""
    x = digits_images[0][:64]
    model = small_deit(drop_path=0.5)
    for m in model.anchors:
        m.drop_path_rate = 0.5
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


def _ddp_worker(rank, world, init_file, x, out_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = small_deit()
    half = x.shape[0] // world
    ls_init(model, [x[rank * half:(rank + 1) * half]])
    torch.save(model.stitch_layers.state_dict(), f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_ddp_sums_statistics_and_broadcasts(tmp_path, digits_images):
    """Two gloo processes, each with half the images: both end with the layers a single process fits on all."""
    x = digits_images[0][:64]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), x, str(tmp_path / "out")), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "out.0", weights_only=True)
    r1 = torch.load(tmp_path / "out.1", weights_only=True)
    single = small_deit()
    ls_init(single, [x])
    for k, v in single.stitch_layers.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k
        assert torch.allclose(r0[k], v, atol=1e-4), k
