"""Stitch positions from the stitch config: explicit lists (plan.positions_plan) and data-chosen ones
(snnet/train/positions.py: the best of the compatibility map), written to stitch_plan.json and rebuilt from it."""
import json
import sys

import numpy as np
import pytest
import torch
from helpers import FAST, TINY, run

from snnet.stitching.config import ConfigError, load_stitch_config, parse_stitch_config
from snnet.stitching.plan import Junction, PlanError, positions_plan

THREE = TINY + [{"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": 24,
                                                                     "num_heads": 2}}]


# ------------------------------------------------------------------------------------------------ the plan (pure data)
def test_explicit_positions_build_routes_in_the_documented_cfg_id_order():
    plan = positions_plan([4, 4, 4], [[[2, 3], [0, 1], [3, 4]], [[1, 0]]])
    assert len(plan) == 3 + 4
    assert [r.anchors for r in plan.routes[:3]] == [(0,), (1,), (2,)] and all(r.is_anchor for r in plan.routes[:3])
    # pair (0, 1)'s positions in the order listed, then pair (1, 2)'s; one layer per position at (pair, index)
    assert [r.stitches for r in plan.routes[3:]] == [
        (Junction(0, 1, 0, 2, 3, (0, 0)),), (Junction(0, 1, 0, 0, 1, (0, 1)),), (Junction(0, 1, 0, 3, 4, (0, 2)),),
        (Junction(1, 2, 0, 1, 0, (1, 0)),)]
    assert [r.cfg_id for r in plan.routes] == list(range(7))
    assert [(s.address, s.front, s.end) for s in plan.layers] == [((0, 0), 0, 1), ((0, 1), 0, 1), ((0, 2), 0, 1),
                                                                  ((1, 0), 1, 2)]
    assert [st.position for st in plan.positions_of_layer((0, 2))] == [(3, 4)]


@pytest.mark.parametrize("pairs,needle", [
    ([[[0, 5]]], "end block k of [0, 5] 5 is out of range: use 0..4"),
    ([[[4, 0]]], "front block j of [4, 0] 4 is out of range: use 0..3"),
    ([[[1, 1], [1, 1]]], "[1, 1] is listed twice"),
    ([[[0, 1]], [[0, 1]]], "2 anchors have 1 neighbouring pair(s) but 2 position list(s)"),
    ([[]], "the list is empty"),
])
def test_explicit_positions_refuse_bad_lists(pairs, needle):
    with pytest.raises(PlanError) as e:
        positions_plan([4, 4], pairs)
    assert needle in str(e.value)


@pytest.mark.parametrize("positions,needle", [
    ({"select": "mse", "per_pair": 2}, "'select' must be one of cka, ls, kl, got 'mse'"),
    ({"select": "kl"}, "'per_pair' must be an integer >= 1"),
    ({"select": "kl", "per_pair": 0}, "'per_pair' must be an integer >= 1"),
    ({"select": "kl", "per_pair": 2, "pairs": [[[0, 1]]]}, "exactly one of 'select'"),
    ({}, "exactly one of 'select'"),
    ({"pairs": [[0, 1]]}, "one list per neighbouring anchor pair of [j, k]"),
    ({"pairs": [[[0, -1]]]}, "one list per neighbouring anchor pair of [j, k]"),
    ({"pairs": [[[0, 1]]], "per_pair": 1}, "'per_pair' goes with 'select'"),
    ({"select": "kl", "per_pair": 2, "top": 1}, "unknown key(s) ['top']"),
])
def test_config_refuses_bad_positions(positions, needle):
    with pytest.raises(ConfigError) as e:
        parse_stitch_config({"anchors": TINY, "positions": positions})
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("extra", [{"stitch_kernel_size": 3}, {"stitch_plan": "two_way"},
                                   {"nearest_stitching": False}])
def test_config_refuses_positions_with_sliding_window_fields(extra):
    with pytest.raises(ConfigError, match="replaces the sliding window"):
        parse_stitch_config({"anchors": TINY, "positions": {"select": "kl", "per_pair": 1}, **extra})


def test_a_selecting_config_needs_train_py():
    from snnet import build_snnet
    cfg = parse_stitch_config({"anchors": TINY, "positions": {"select": "kl", "per_pair": 1}})
    with pytest.raises(ConfigError, match="stitch_plan.json"):
        build_snnet(cfg, pretrained=False, img_size=16, num_classes=10)


# ------------------------------------------------------------------------------------------------ selection
@pytest.fixture(scope="module")
def three_anchors():
    from snnet import build_snnet
    torch.manual_seed(0)
    cfg = parse_stitch_config({"anchors": THREE, "skip_final_norm": False,
                               "positions": {"pairs": [[[0, 0]], [[0, 0]]]}})
    net = build_snnet(cfg, pretrained=False, img_size=16, num_classes=10).eval()
    from snnet.stitching.maps import anchors_net
    anchors = anchors_net(list(net.anchors), net.adapters, net.names)
    batches = [torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    return net, anchors, batches


def test_position_is_the_map_edge_the_snnet_stitch_maps(three_anchors):
    from snnet.train.positions import edge_units
    net, anchors, _ = three_anchors
    for j in range(4):
        for k in range(5):
            _, where = net.feature_points([Junction(0, 1, 0, j, k, ())])
            (_, ux), (_, uy) = where[(0, 1, 0, j, k)]
            assert edge_units(anchors.units[0], anchors.units[1], j, k) == (ux, uy)


@pytest.mark.parametrize("score,key,best", [("kl", "kl", np.argmin), ("ls", "ls_residual", np.argmin),
                                            ("cka", "cka", np.argmax)])
def test_select_picks_the_best_positions_of_the_map(three_anchors, score, key, best):
    from snnet.stitching.maps import compatibility_maps
    from snnet.train.positions import select_positions
    net, anchors, batches = three_anchors
    maps = compatibility_maps(anchors, batches, pairs=[(0, 1), (1, 2)])
    for per_pair in (1, 3):
        pairs, info = select_positions(anchors, batches, score, per_pair)
        assert info["select"] == score and info["images"] == 32 and len(pairs) == 2
        for c in range(2):
            # the map restricted to the positions, read through the SN-Net's own feature points
            grid = np.full((4, 5), np.nan)
            for j in range(4):
                for k in range(5):
                    _, where = net.feature_points([Junction(c, c + 1, 0, j, k, ())])
                    (_, ux), (_, uy) = where[(c, c + 1, 0, j, k)]
                    grid[j, k] = getattr(maps, key)[(c, c + 1)][ux, uy]
            assert not np.isnan(grid).any()
            order = np.argsort(grid, axis=None, kind="stable")
            if best is np.argmax:
                order = np.argsort(-grid, axis=None, kind="stable")
            expected = sorted([int(i) // 5, int(i) % 5] for i in order[:per_pair])
            assert pairs[c] == expected, (score, c, grid)
            if per_pair == 1:
                assert pairs[c] == [list(np.unravel_index(best(grid), grid.shape))]


def test_select_refuses_more_positions_than_the_pair_has(three_anchors):
    from snnet.train.positions import select_positions
    _, anchors, batches = three_anchors
    with pytest.raises(ConfigError, match="per_pair 21 but .* has 20 stitchable positions; use 'per_pair' <= 20"):
        select_positions(anchors, batches, "cka", 21)


# ------------------------------------------------------------------------------------------------ train.py end to end
@pytest.mark.slow
def test_selected_plan_is_written_and_rebuilds_the_same_network(digits_folder, tmp_path):
    """train.py with "select": kl writes stitch_plan.json (explicit pairs); --eval --resume from that file evaluates
    the same network (same results), and a network built from it has the same state-dict keys and logits as one
    built by selecting again."""
    import timm
    from helpers import open_data

    from snnet import build_snnet
    from snnet.stitching.build import create_anchors, snnet_from_anchors
    from snnet.train.args import parse_args
    from snnet.train.options import RunOptions
    from snnet.train.positions import PLAN_FILE, Selection
    from snnet.utils.checkpoint import load_checkpoint
    anchors = []
    for n, a in enumerate(THREE):  # anchors with weights of their own (as pretrained ones): every build sees them
        torch.manual_seed(10 + n)
        torch.save({"state_dict": timm.create_model(a["name"], num_classes=10, img_size=16,
                                                    **a["model_kwargs"]).state_dict()}, tmp_path / f"a{n}.pth")
        anchors.append({**a, "checkpoint": str(tmp_path / f"a{n}.pth"), "label": f"a{n}"})
    cfg_path = tmp_path / "select.json"
    cfg_path.write_text(json.dumps({"anchors": anchors, "skip_final_norm": False, "stitch_init_bs": 40,
                                    "positions": {"select": "kl", "per_pair": 3}}))
    r = run([sys.executable, "train.py", digits_folder, "--stitch_config", cfg_path, *FAST, "--epochs", "1",
             "--output", tmp_path, "--experiment", "sel"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    plan_path = tmp_path / "sel" / PLAN_FILE
    written = json.loads(plan_path.read_text())
    pairs = written["positions"]["pairs"]
    assert written["positions"]["from"]["select"] == "kl" and written["positions"]["from"]["images"] == 40
    assert len(pairs) == 2 and all(len(p) == 3 for p in pairs) and "positions: 3 per anchor pair by kl" in r.stderr
    records = [json.loads(l) for l in (tmp_path / "sel" / "stitches_res.txt").read_text().splitlines()]
    assert len(records) == 3 + 6 and [r["route"] for r in records[:3]] == ["a0", "a1", "a2"]

    r2 = run([sys.executable, "train.py", digits_folder, "--stitch_config", plan_path, *FAST, "--eval", "--resume",
              tmp_path / "sel" / "last.pth.tar", "--output", tmp_path, "--experiment", "again"], timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "positions:" not in r2.stderr  # explicit: no map computed
    again = [json.loads(l) for l in (tmp_path / "again" / "stitches_res.txt").read_text().splitlines()]
    assert [(x["route"], x["acc1"], x["loss"]) for x in again] == [(x["route"], x["acc1"], x["loss"])
                                                                  for x in records]

    # in process: select again (same images, same anchors) vs. build from the written file
    state = load_checkpoint(tmp_path / "sel" / "last.pth.tar")["state_dict"]
    args, cfg = parse_args([str(digits_folder), "--stitch_config", str(cfg_path), *map(str, FAST)])
    args.device = "cpu"
    train_ds = open_data(str(digits_folder), True)[1]
    models, adapters = create_anchors(cfg, pretrained=False, img_size=16, num_classes=10)
    chosen = Selection(RunOptions.from_values(vars(args)).network_to_build().selection, train_ds)(cfg, models, adapters)
    selected = snnet_from_anchors(chosen, models, adapters, img_size=16)
    assert selected.stitch_config.get("positions")["pairs"] == pairs
    rebuilt = build_snnet(load_stitch_config(plan_path), pretrained=False, img_size=16, num_classes=10)
    for net in (selected, rebuilt):
        net.load_checkpoint_state(state)
        net.eval()
    assert list(selected.state_dict()) == list(rebuilt.state_dict()) == list(state)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for c in range(selected.num_configs):
            assert selected.describe(c) == rebuilt.describe(c)
            torch.testing.assert_close(selected(x, c), rebuilt(x, c), rtol=0, atol=0)


@pytest.mark.parametrize("positions,needle", [
    ({"pairs": [[[0, 9]]]}, "end block k of [0, 9] 9 is out of range: use 0..4"),
    ({"select": "cka", "per_pair": 99}, "per_pair 99 but"),
])
def test_train_py_refuses_positions_the_anchors_do_not_have(digits_folder, tmp_path, capsys, positions, needle):
    from snnet.train.main import main
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"anchors": TINY, "stitch_init_bs": 16, "positions": positions}))
    code = main([str(digits_folder), "--stitch_config", str(cfg), *map(str, FAST), "--epochs", "1", "--output",
                 str(tmp_path / "out"), "--experiment", "bad"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and needle in err[-1] and err[-1].startswith("error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config,needle", [
    ({"anchors": TINY, "positions": {"select": "cka", "per_pair": 99}}, "per_pair 99 but"),
    ({"anchors": [TINY[0], {**TINY[1], "model_kwargs": {**TINY[1]["model_kwargs"], "patch_size": 8}}]},
     "cannot stitch"),
    ({"anchors": [TINY[0], {**TINY[1], "model_kwargs": {**TINY[1]["model_kwargs"], "num_heads": 5}}]},
     "cannot create 'deit_tiny_patch16_224' with arguments"),
])
def test_structure_refused_before_any_weight_or_image(tmp_path, capsys, config, needle):
    """The network's structure is built on the meta device by the preflight: --dry-run, which reads no data folder
    (none exists here) and no weight, already refuses what only the built anchors could tell."""
    from snnet.train.main import main
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({**config, "stitch_init_bs": 16}))
    code = main([str(tmp_path / "no-data"), "--stitch_config", str(cfg), "--img-size", "16", "--no-pretrained",
                 "--dry-run"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and needle in lines[-1] and lines[-1].startswith("error: "), err
    assert out == ""
