"""Stitch plans: SN-Net's cfg_id order and counts (docs/snnet_compat.md, C1-C5), pure data."""
import pytest

from snnet.stitching.plan import (
    PlanError,
    anchor_combinations,
    deit_plan,
    paired_positions,
    stagewise_plan,
    unpaired_positions,
)


def test_paired_all_pairs_deit_windows():
    pos, layer, n = paired_positions(12, 2, 1, forward_only=False)
    assert len(pos) == 34 and n == 11
    assert pos[:4] == [(0, 0), (0, 1), (1, 0), (1, 1)] and layer[:4] == [0, 0, 0, 0]
    for t in range(1, 11):  # layer t = {(t,t+1),(t+1,t),(t+1,t+1)} in that order
        i = 4 + 3 * (t - 1)
        assert pos[i:i + 3] == [(t, t + 1), (t + 1, t), (t + 1, t + 1)]
        assert layer[i:i + 3] == [t, t, t]


@pytest.mark.parametrize("depth,expected", [(2, [(0, 1)]), (4, [(0, 1), (1, 2), (2, 3)]),
                                            (18, [(i, i + 1) for i in range(17)])])
def test_paired_forward_only(depth, expected):
    pos, layer, n = paired_positions(depth, forward_only=True)
    assert pos == expected and layer == list(range(len(expected))) and n == len(expected)


def test_unpaired_shifted_layer_ids():
    pos, layer, n = unpaired_positions(6, 18)
    assert pos == [(0, 1), (0, 2), (1, 3), (1, 4), (1, 5), (2, 6), (2, 7), (2, 8), (3, 9), (3, 10), (3, 11),
                   (4, 12), (4, 13), (4, 14), (5, 15), (5, 16), (5, 17)]
    assert layer == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5] and n == 6
    assert unpaired_positions(2, 4) == ([(0, 1), (1, 2), (1, 3)], [0, 0, 1], 2)
    assert unpaired_positions(2, 6) == ([(0, 1), (0, 2), (1, 3), (1, 4), (1, 5)], [0, 0, 0, 1, 1], 2)
    assert unpaired_positions(3, 4)[1] == [0, 0, 1]  # layer 2 allocated but unused (docs/snnet_compat.md, C3)


def test_deit_71_in_snnet_order():
    plan = deit_plan(3, 12)
    assert len(plan) == 71 and len(plan.layers) == 22
    assert [r.anchors for r in plan.routes[:3]] == [(0,), (1,), (2,)]
    pos, _, _ = paired_positions(12, 2, 1)
    for c in range(34):
        ts, sb = plan.routes[3 + c], plan.routes[37 + c]
        assert ts.anchors == (0, 1) and sb.anchors == (1, 2)
        assert ts.stitches[0].position == pos[c] == sb.stitches[0].position
        assert ts.stitches[0].layer[0] == 0 and sb.stitches[0].layer[0] == 1
    assert plan.routes[39].stitches[0].position == (1, 0)  # 14 blocks, SN-Net's best stitch


@pytest.mark.parametrize("kernel,stride,nearest,count", [(2, 1, True, 71), (2, 1, False, 732), (1, 1, True, 27),
                                                        (3, 1, True, 111), (2, 2, True, 51), (3, 2, True, 91),
                                                        (4, 2, True, 131)])
def test_deit_counts_other_windows(kernel, stride, nearest, count):
    assert len(deit_plan(3, 12, kernel, stride, nearest)) == count


def test_deit_three_anchor_chains():
    plan = deit_plan(3, 12, nearest=False)
    chains = [r for r in plan.routes if len(r.anchors) == 3]
    assert len(chains) == 627
    for r in chains:
        a, b = r.stitches
        assert b.j >= a.k and (a.front, a.end, b.front, b.end) == (0, 1, 1, 2)
    assert anchor_combinations(3, False)[3:6] == [(0, 1), (0, 2), (1, 2)]


def test_nearest_generalises_to_any_anchor_count():
    assert anchor_combinations(4, True) == [(0,), (1,), (2,), (3,), (0, 1), (1, 2), (2, 3)]
    assert len(deit_plan(4, 12)) == 4 + 3 * 34
    assert len(deit_plan(2, 12)) == 2 + 34


def test_swin_41_order():
    plan = stagewise_plan([[2, 2, 6, 2], [2, 2, 18, 2], [2, 2, 18, 2]], [0, 1, 2])
    assert len(plan) == 41
    st = [(r.stitches[0].stage, r.anchors, r.stitches[0].position) for r in plan.routes[3:]]
    assert st[:4] == [(0, (0, 1), (0, 1)), (0, (1, 2), (0, 1)), (1, (0, 1), (0, 1)), (1, (1, 2), (0, 1))]
    assert [s[2] for s in st[4:21]] == unpaired_positions(6, 18)[0]
    assert [s[2] for s in st[21:]] == [(i, i + 1) for i in range(17)]
    assert plan.routes[7].stitches[0].layer == (2, 0, 0) and plan.routes[23].stitches[0].layer == (2, 0, 5)
    assert len(plan.layers) == 27


def test_cnn_and_levit_counts():
    r18_r50 = stagewise_plan([[2, 2, 2, 2], [3, 4, 6, 3]], [1, 2])
    assert len(r18_r50) == 10
    assert [(r.stitches[0].stage, r.stitches[0].position, r.stitches[0].layer[2]) for r in r18_r50.routes[2:]] == [
        (1, (0, 1), 0), (1, (1, 2), 0), (1, (1, 3), 1), (2, (0, 1), 0), (2, (0, 2), 0), (2, (1, 3), 0),
        (2, (1, 4), 1), (2, (1, 5), 1)]
    assert len(stagewise_plan([[2, 2, 2, 2], [2, 2, 6, 2]], [1, 2])) == 8
    assert len(stagewise_plan([[4, 4, 4], [4, 4, 4]], [0, 1])) == 8


def test_bad_plans_name_the_value():
    with pytest.raises(PlanError, match="stitch_kernel_size 0 .*between 1 and the anchors' depth 12"):
        deit_plan(3, 12, kernel=0)
    with pytest.raises(PlanError, match="stitch_stride 13"):
        deit_plan(3, 12, stride=13)
    with pytest.raises(PlanError, match="not ordered small to large.*'big'.*'small'"):
        stagewise_plan([[2, 2, 18, 2], [2, 2, 6, 2]], [2], names=["big", "small"])
    with pytest.raises(PlanError, match="stitch stage 5 is out of range"):
        stagewise_plan([[2, 2], [2, 2]], [5])
    with pytest.raises(PlanError, match="cfg_id 71 is out of range.*0..70"):
        deit_plan(3, 12).route(71)
