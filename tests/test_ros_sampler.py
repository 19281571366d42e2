"""SN-Netv2's resource-constrained sampling (ROS): the "ros" sampler bins routes by FLOPs and draws a bin, then a
route in it; draws are a pure function of (seed, rank, step), so a killed and resumed run is bit-identical."""
import json
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import FAST, TINY, run
from test_resume import assert_identical, final_state

from snnet.stitching.build import build_snnet
from snnet.stitching.config import parse_stitch_config
from snnet.stitching.cost import cost_table
from snnet.train.sampler import BucketSampler, create_sampler, flops_groups

GAP = 5e-5  # GFLOPs: the tiny two-ViT SN-Net's 12 routes (0.08 to 0.30 MFLOPs) fall into 4 groups of 2 to 4 routes
DRAWS = 10_000


def chisquare_p(observed, expected):
    scipy_stats = pytest.importorskip("scipy.stats")
    return scipy_stats.chisquare(np.asarray(observed, dtype=float), np.asarray(expected, dtype=float)).pvalue


def gflops(d):
    return {c: g * 1e9 for c, g in d.items()}


def test_flops_groups_follows_the_binning_rule():
    # ascending: 7 (0.2), 1 (0.5) | 2 (1.5), 3 (1.6) | 5 (2.7), 0 (3.0), 4 (3.0) | 6 (7.0); ref 0 for the first group
    flops = gflops({0: 3.0, 1: 0.5, 2: 1.5, 3: 1.6, 4: 3.0, 5: 2.7, 6: 7.0, 7: 0.2})
    assert flops_groups(flops, 1.0) == [[1, 7], [2, 3], [0, 4, 5], [6]]
    assert flops_groups(flops, 10.0) == [list(range(8))]
    assert flops_groups(flops, 0.01) == [[7], [1], [2], [3], [5], [0, 4], [6]]  # equal FLOPs share a group
    # exactly `gap` from the reference stays in the group; the reference is the group's first FLOPs, not the last
    assert flops_groups(gflops({0: 0.0, 1: 1.0, 2: 2.5, 3: 3.5}), 1.0) == [[0, 1], [2, 3]]
    assert flops_groups(gflops({0: 0.0, 1: 0.9, 2: 1.8, 3: 2.7}), 1.0) == [[0, 1], [2, 3]]
    # the first route beyond `gap` from 0 opens the first group (no empty group)
    assert flops_groups(gflops({0: 5.0, 1: 5.5, 2: 9.0}), 1.0) == [[0, 1], [2]]
    assert flops_groups({}, 1.0) == []


@pytest.mark.parametrize("options, needle", [({"gap": 0}, "gap 0"), ({"gap": -1.5}, "gap -1.5"),
                                             ({"gap": 1.0, "k": 0}, "k 0"), ({"k": -2}, "k -2")])
def test_bad_options_refused_naming_the_value(options, needle):
    with pytest.raises(ValueError, match=needle):
        BucketSampler(gflops({0: 1.0, 1: 2.0}), **options)
    if options.get("gap", 1.0) <= 0:
        with pytest.raises(ValueError, match=needle):
            flops_groups(gflops({0: 1.0}), options["gap"])


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_snnet(parse_stitch_config({"anchors": TINY}), pretrained=False, num_classes=10, img_size=16)


@pytest.fixture(scope="module")
def ros(net):
    return create_sampler({"type": "ros", "gap": GAP}, net, seed=0, rank=0)


def test_for_network_uses_the_cost_table_at_the_model_size(net, ros):
    table = cost_table(net, (16, 16), 3)
    assert ros.flops == {c: float(table.route_flops(r)) for c, r in enumerate(net.routes)}
    assert ros.groups == flops_groups(ros.flops, GAP)
    assert len(ros.groups) >= 3 and max(map(len, ros.groups)) >= 2
    assert sorted(c for g in ros.groups for c in g) == list(range(net.num_configs))
    for size in (16, [16, 16]):  # the option names the size explicitly (ViTs take only their own)
        assert create_sampler({"type": "ros", "gap": GAP, "img_size": size}, net, 0, 0).flops == ros.flops


def test_groups_uniform_and_routes_uniform_within_a_group(ros):
    draws = [ros(s) for s in range(DRAWS)]
    group_of = {c: i for i, g in enumerate(ros.groups) for c in g}
    counts = Counter(group_of[c] for c in draws)
    n = len(ros.groups)
    assert set(counts) == set(range(n))
    assert chisquare_p([counts[i] for i in range(n)], [DRAWS / n] * n) > 1e-3
    per_route = Counter(draws)
    for i, g in enumerate(ros.groups):
        if len(g) > 1:
            obs = [per_route[c] for c in g]
            assert chisquare_p(obs, [counts[i] / len(g)] * len(g)) > 1e-3, g


@pytest.mark.parametrize("k", [1, 2.5])
def test_k_weights_groups_towards_larger_flops(net, ros, k):
    sampler = create_sampler({"type": "ros", "gap": GAP, "k": k}, net, seed=0, rank=0)
    n = len(sampler.groups)
    p = np.arange(n) / k + 1 / n
    p /= p.sum()
    np.testing.assert_allclose(sampler.p, p)
    group_of = {c: i for i, g in enumerate(sampler.groups) for c in g}
    counts = Counter(group_of[sampler(s)] for s in range(DRAWS))
    assert chisquare_p([counts[i] for i in range(n)], DRAWS * p) > 1e-3
    assert chisquare_p([counts[i] for i in range(n)], [DRAWS / n] * n) < 1e-3  # and not uniform


def test_draws_are_a_pure_function_of_seed_rank_step(net, ros):
    spec = {"type": "ros", "gap": GAP}
    steps = range(200)
    a = [create_sampler(spec, net, seed=0, rank=0)(s) for s in steps]
    assert a == [ros(s) for s in steps]
    assert [ros(s) for s in reversed(steps)] == a[::-1]  # no state: order of calls does not matter
    r1 = create_sampler(spec, net, seed=0, rank=1)
    assert [r1(s) for s in steps] != a
    assert [create_sampler(spec, net, seed=1, rank=0)(s) for s in steps] != a
    synced = create_sampler(spec, net, seed=0, rank=3, sync=True)
    assert [synced(s) for s in steps] == a


@pytest.mark.slow
def test_bad_gap_is_a_one_line_config_error(tmp_path, digits_folder):
    cfg = tmp_path / "ros_bad.json"
    cfg.write_text(json.dumps({"anchors": TINY, "sampler": {"type": "ros", "gap": 0}}))
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", cfg, *FAST, "--epochs", "1",
             "--output", tmp_path, "--experiment", "bad"])
    assert r.returncode != 0
    assert "gap 0" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_ros_kill_and_resume_is_bit_identical(tmp_path, digits_folder):
    cfg = tmp_path / "ros.json"
    cfg.write_text(json.dumps({"anchors": TINY, "skip_final_norm": False, "stitch_init_bs": 32,
                               "sampler": {"type": "ros", "gap": GAP}}))
    base = [sys.executable, "train.py", digits_folder, "--stitch_config", cfg, *FAST, "--epochs", "2",
            "--output", tmp_path]
    r = run(base + ["--experiment", "whole"])
    assert r.returncode == 0, r.stderr[-3000:]
    killed = base + ["--experiment", "killed"]
    r = run(killed, env={"SNNET_FAULT_KILL_AT_STEP": "14"})  # 10 steps per epoch: inside epoch 2
    assert r.returncode == -9, r.stderr[-2000:]  # SIGKILL
    assert final_state(tmp_path / "killed")["epoch"] == 0
    r = run(killed + ["--resume", tmp_path / "killed" / "last.pth.tar"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_identical(tmp_path / "whole", tmp_path / "killed")
