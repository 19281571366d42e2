"""SN-Netv2's run, exactly (docs/snnet_compat.md, C36-C37): the recipe cards' FLOPs buckets are SN-Netv2's grouping
of its released S/L FLOPs table (tests/data/snnetv2_deit3_s_l_results.jsonl, SN-Netv2's
classification/results/stitches_res_s_l.txt), bucket by bucket and route by route; ``train_exclude`` keeps a route
built and evaluated but never drawn; `--dry-run` shows the network (plan, networks, sampler and buckets, stitching
layers, drop-path, LS init) without loading weights."""
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY

from snnet import build_snnet, parse_stitch_config
from snnet.stitching.config import ConfigError
from snnet.train.sampler import create_sampler, flops_groups, train_ids

ORACLE = Path(__file__).parent / "data" / "snnetv2_deit3_s_l_results.jsonl"


def released_flops() -> dict[int, int]:
    return {r["cfg_id"]: r["flops"] for r in map(json.loads, ORACLE.read_text().splitlines())}


def snnetv2_groups(flops: dict[int, int], gap: float = 1.0) -> list[list[int]]:
    """SN-Netv2's grouping, written out from its description (not our `flops_groups`): ids sorted by FLOPs ascending
    (stable), reference 0; an id more than `gap` GFLOPs from the reference closes a non-empty group and starts a new
    one with itself as the reference; each group sorted by id."""
    groups, current, ref = [], [], 0.0
    for cfg_id, f in sorted(flops.items(), key=lambda kv: kv[1]):
        if abs(f / 1e9 - ref) > gap:
            if current:
                groups.append(sorted(current))
            current, ref = [cfg_id], f / 1e9
        else:
            current.append(cfg_id)
    return groups + [sorted(current)] if current else groups


def test_released_table_groups_as_snnetv2_says():
    """SN-Netv2's S/L table at gap 1: 13 groups, {0}, 11 FLOPs levels of 12 routes, {1}; the lowest stitched group is
    [12, 14, 80, 90, 99, 107, 114, 120, 125, 129, 132, 134]; id 13 is in none (SN-Netv2 never trained it)."""
    flops = released_flops()
    theirs = snnetv2_groups(flops)
    assert [len(g) for g in theirs] == [1] + [12] * 11 + [1]
    assert theirs[0] == [0] and theirs[-1] == [1]
    assert theirs[1] == [12, 14, 80, 90, 99, 107, 114, 120, 125, 129, 132, 134]
    assert sorted(c for g in theirs for c in g) == [c for c in range(135) if c != 13]
    assert flops_groups(flops, 1.0) == theirs  # ours, on the same FLOPs


# ------------------------------------------------------------------------------------------- the cards' dry runs
def dry_run(config: str, *extra: str, world_size: int = 8) -> dict:
    """`train.py DATA --stitch_config CONFIG --dry-run` as 8 processes' rank 0 sees it."""
    import os
    from contextlib import redirect_stdout
    from io import StringIO

    from snnet.train.main import main
    out, env = StringIO(), dict(os.environ)
    os.environ.update(WORLD_SIZE=str(world_size))
    os.environ.pop("RANK", None)
    try:
        with redirect_stdout(out):
            assert main(["/data/imagenet", "--stitch_config", config, "--device", "cuda", "--dry-run", *extra]) == 0
    finally:
        os.environ.clear()
        os.environ.update(env)
    return yaml.safe_load(out.getvalue())


@pytest.fixture(scope="module")
def s_l_run():
    return dry_run("configs/deit3_s_l_v2.json")


@pytest.mark.slow
def test_s_l_card_buckets_equal_snnetv2s_bucket_by_bucket(s_l_run):
    """The S/L card's sampler, on our cost model's FLOPs of the built network (no weights), has SN-Netv2's buckets
    of its released table: same count, same routes in each, same order. Without ``train_exclude`` id 13 would join
    the small anchor's bucket and halve its draws."""
    network = s_l_run["resolved"]["network"]
    sampler = network["sampler"]
    assert (sampler["type"], sampler["gap_gflops"], sampler["k"]) == ("ros", 1.0, None)
    ours = [b["cfg_ids"] for b in sampler["buckets"]]
    theirs = snnetv2_groups(released_flops())
    assert len(ours) == len(theirs) == 13
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a == b, f"bucket {i}: ours {a}, SN-Netv2's {b}"
    assert all(b["p"] == pytest.approx(1 / 13, abs=1e-6) for b in sampler["buckets"])
    flops = released_flops()
    for b in sampler["buckets"]:  # each bucket's FLOPs range is the released one
        assert b["gflops"] == [round(min(flops[c] for c in b["cfg_ids"]) / 1e9, 4),
                               round(max(flops[c] for c in b["cfg_ids"]) / 1e9, 4)]


@pytest.mark.slow
def test_s_l_card_dry_run_shows_snnetv2s_network(s_l_run):
    network = s_l_run["resolved"]["network"]
    assert network["plan"].startswith("two_way")
    assert (network["networks"], network["trained"], network["evaluated"], network["train_exclude"]) == \
        (135, 134, 135, [13])
    assert network["routes_by_stitches"] == {"anchors": 2, "1 stitch(es)": 23, "2 stitch(es)": 110}
    layers = network["stitching_layers"]
    assert (layers["type"], layers["rank"], layers["alpha"], layers["scale"]) == ("lora", 64, 1.0, 1 / 64)
    assert (layers["count"], layers["params"], layers["trainable_params"]) == (23, 11133056, 2089088)
    assert (layers["trainable"], layers["frozen"]) == (["bias", "lora_A", "lora_B"], ["weight"])
    assert network["final_norm_on_stitched_routes"] is True and network["anchor_parameters"] == "trained"
    s, l = network["anchors"]
    assert (s["params"], l["params"]) == (22059496, 304374760)
    assert s["drop_path"]["per_block"] == [0.05] * 12 and l["drop_path"]["per_block"] == [0.4] * 24
    assert s["weights"] == l["weights"] == "timm pretrained, tag fb_in22k_ft_in1k"
    assert s["data_config"]["crop_pct"] == 1.0 and s["data_config"]["interpolation"] == "bicubic"
    assert network["ls_init"]["mode"] == "joint" and network["ls_init"]["images"] == 100


@pytest.mark.slow
def test_snnet_compat_dry_run_names_snnetv2s_fit():
    """--snnet-compat on a v2 card: SN-Netv2's LS fit (eval mode, the AMP dtype's autocast, torch's pinv cut-off)."""
    ls = dry_run("configs/deit3_s_b_v2.json", "--snnet-compat")["resolved"]["network"]["ls_init"]
    assert ls["mode"] == "snnet" and "SN-Netv2's" in ls["fit"] and "eval mode" in ls["fit"]
    assert "autocast float16" in ls["fit"] and "default cut-off" in ls["fit"]


@pytest.mark.slow
def test_v1_dry_run_network_is_fast_and_uniform():
    """A card with SN-Net's uniform sampler needs no FLOPs: its network is described from the meta device."""
    network = dry_run("configs/deit_ti_s_b.json")["resolved"]["network"]
    assert (network["networks"], network["trained"], network["train_exclude"]) == (71, 71, [])
    assert network["sampler"] == {"type": "uniform", "routes": 71}
    assert network["stitching_layers"]["type"] == "linear" and network["stitching_layers"]["count"] == 22
    assert network["anchors"][0]["drop_path"]["per_block"][0] == 0.0  # timm's linear ramp from 0 (drop-path 0.1)
    assert network["anchors"][0]["drop_path"]["max"] == pytest.approx(0.1)
    assert network["final_norm_on_stitched_routes"] is False


# ------------------------------------------------------------------------------------------- train_exclude
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_snnet(parse_stitch_config({"anchors": TINY}), pretrained=False, num_classes=10, img_size=16)


@pytest.mark.parametrize("spec", [None, {"type": "ros", "gap": 5e-5}])
def test_train_exclude_is_never_drawn_and_leaves_the_others(tiny, spec):
    """Routes in train_exclude are never drawn; a bucket sampler bins only the others; every other route is
    drawn. The network (and so its evaluation) keeps every route."""
    excluded = [0, 5]
    sampler = create_sampler(spec, tiny, seed=0, rank=0, train_exclude=excluded)
    draws = Counter(sampler(s) for s in range(3000))
    assert not set(draws) & set(excluded)
    assert set(draws) == set(range(tiny.num_configs)) - set(excluded)
    if spec is not None:
        assert sorted(c for g in sampler.groups for c in g) == [c for c in range(tiny.num_configs) if c not in excluded]
    assert tiny.num_configs == 12


def test_no_train_exclude_draws_as_before(tiny):
    """Without train_exclude the uniform sampler draws exactly SN-Net's uniform cfg_ids (unchanged RNG use)."""
    import numpy as np
    sampler = create_sampler(None, tiny, seed=3, rank=1)
    assert [sampler(s) for s in range(50)] == [int(np.random.default_rng([3, 1, s]).integers(12)) for s in range(50)]


def test_train_exclude_refused_naming_the_value(tiny):
    with pytest.raises(ConfigError, match="train_exclude.*'13'|train_exclude.*cfg_ids >= 0"):
        parse_stitch_config({"anchors": TINY, "train_exclude": ["13"]})
    with pytest.raises(ConfigError, match="train_exclude"):
        parse_stitch_config({"anchors": TINY, "train_exclude": 13})
    with pytest.raises(ValueError, match=r"train_exclude \[12, 40\].*0\.\.11"):
        train_ids(12, [3, 12, 40])
    with pytest.raises(ValueError, match="no route to train"):
        train_ids(2, [0, 1])
    from snnet.train.network import check_train_exclude
    cfg = parse_stitch_config({"anchors": TINY, "train_exclude": [99]})
    with pytest.raises(ConfigError, match=r"train_exclude \[99\].*remove them"):
        check_train_exclude(tiny, cfg)


def test_v2_cards_name_snnetv2s_sampler_layers_and_routes():
    """Without a dry run (fast tier): each v2 card asks for ROS at gap 1, LoRA rank 64 alpha 1 and keeps id 13 out of
    training."""
    from snnet import load_stitch_config
    for name in ("s_l", "s_b", "b_l"):
        cfg = load_stitch_config(f"configs/deit3_{name}_v2.json")
        assert cfg.get("sampler") == {"type": "ros", "gap": 1.0}
        assert cfg.get("stitch_layer") == {"type": "lora", "rank": 64, "alpha": 1.0}
        assert cfg.get("train_exclude") == [13] and cfg.get("stitch_plan") == "two_way"
