"""Which stitch to run for a budget: the one ranking rule behind `snnet select` and `stitch_for`.

The best stitch within a budget is the one with the highest top-1; ties go to fewer FLOPs, then fewer params, then
the lower cfg_id (cheaper at equal accuracy, and a deterministic answer). With a minimum top-1 instead, the answer
is the cheapest stitch by FLOPs that reaches it (ties: fewer params, then higher top-1, then lower cfg_id).

`stitch_for(net, ...)` picks a cfg_id for ``net(x, cfg_id)`` at run time. With records (a stitches_res.txt of this
SN-Net) it applies the rule above to the stitches that fit, the budget measured at the given image size; without
them it takes the route with the most FLOPs that fits (then the most params, then the lowest cfg_id): within one
SN-Net cost and accuracy rise together, and nothing better is known before an evaluation.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from snnet.results.pareto import human, latency_keys, require_cost, route_of
from snnet.results.records import check_routes, read_results
from snnet.utils.errors import SNNetError

if TYPE_CHECKING:
    from snnet.stitching.model import SNNet

Record = dict[str, Any]
KWARGS = {"flops": "max_flops", "params": "max_params"}  # how stitch_for names the budgets in its errors


class BudgetError(SNNetError):
    """No stitch meets the request; the message names the closest stitch and the fix."""


def _cost(r: Record, key: str) -> float:
    return r[key] if r.get(key) is not None else math.inf  # an unknown cost ranks as the most expensive


def best_key(r: Record) -> tuple:
    """Sort key of the ranking rule, largest = best: top-1, then fewer FLOPs, fewer params, lower cfg_id."""
    return r["acc1"], -_cost(r, "flops"), -_cost(r, "params"), -r["cfg_id"]


def cheap_key(r: Record) -> tuple:
    """Sort key of the min-accuracy rule, smallest = chosen: FLOPs, then params, higher top-1, lower cfg_id."""
    return _cost(r, "flops"), _cost(r, "params"), -r["acc1"], r["cfg_id"]


def within(records: Sequence[Record], limits: dict[str, float]) -> list[Record]:
    """The records whose every limited cost is known and at most its limit."""
    return [r for r in records if all(r.get(k) is not None and r[k] <= v for k, v in limits.items())]


def describe(r: Record, n_anchors: int | None = None) -> str:
    """'cfg_id 0 (route, 270.6K FLOPs, 14.39K params, top-1 77.22)' for messages."""
    parts = [f"cfg_id {r['cfg_id']} ({route_of(r, n_anchors)}"]
    parts += [f"{human(r[k])} {name}" for k, name in (("flops", "FLOPs"), ("params", "params"))
              if r.get(k) is not None]
    parts += [f"{r[k]:.3f} ms @ b{k[len('latency_ms_b'):]}" for k in latency_keys([r])[:1]]
    return ", ".join(parts) + (f", top-1 {r['acc1']:.2f})" if r.get("acc1") is not None else ")")


def over_budget(records: Sequence[Record], limits: dict[str, float], source: str,
                flags: dict[str, str]) -> BudgetError:
    """The error for a budget no stitch meets: the closest stitch (smallest worst ratio cost / limit)."""
    budget = " and ".join(f"{k} <= {human(v)}" for k, v in limits.items())
    usable = [r for r in records if all(r.get(k) is not None for k in limits)]
    closest = min(usable, key=lambda r: max(r[k] / v if v > 0 else math.inf for k, v in limits.items()))
    need = ", ".join(f"{flags.get(k, k)} to at least {human(closest[k])}" for k, v in limits.items()
                     if closest[k] > v)
    return BudgetError(f"no stitch in {source!r} has {budget}: the closest is {describe(closest)}; raise {need}")


def select(records: Sequence[Record], limits: dict[str, float], min_acc: float | None = None,
           source: str = "the records", flags: dict[str, str] | None = None) -> tuple[Record, int]:
    """The best record within `limits` ({cost key: max}); with `min_acc` the cheapest reaching it.

    Returns (record, how many qualify). `source` (e.g. the file's path) and `flags` (cost key or "acc1" -> the
    option that sets it) word the BudgetError raised when nothing qualifies.
    """
    flags = flags or {}
    if not records:
        raise BudgetError(f"{source!r} holds no stitch to choose from; pass the records of an evaluation")
    # every cost that ranks: the limited ones, and FLOPs for the cheapest reaching min_acc
    for key in [*limits, *(["flops"] if min_acc is not None and "flops" not in limits else [])]:
        require_cost(records, key, source, "--max-flops")
    fit = within(records, limits)
    good = [r for r in fit if min_acc is None or r["acc1"] >= min_acc]
    if good:
        return (max(good, key=best_key) if min_acc is None else min(good, key=cheap_key)), len(good)
    if not fit:
        raise over_budget(records, limits, source, flags)
    # the budget is met, the accuracy is not: the most accurate within it is the closest
    closest = max(fit, key=best_key)
    where = f" within {' and '.join(f'{k} <= {human(v)}' for k, v in limits.items())}" if limits else ""
    lower = flags.get("acc1", "the minimum top-1")
    raise BudgetError(f"no stitch in {source!r}{where} reaches top-1 {min_acc:g}: the closest is "
                      f"{describe(closest)}; lower {lower} to at most {closest['acc1']:.2f}"
                      + (" or raise the budget" if limits else ""))


def model_img_size(net: SNNet) -> tuple[int, int]:
    """The image size the anchors were built for (all anchors of an SN-Net take the same input).

    ViT and Swin anchors say it (``patch_embed.img_size``); timm records the kwargs a model was created with
    (``_model_args``, e.g. LeViT's ``img_size``); CNNs take any size: the size the SN-Net was built for (its
    ``img_size`` or its config's ``input_size``: ``built_img_size``), else their timm default.
    """
    anchor = net.anchors[0]
    size = getattr(getattr(anchor, "patch_embed", None), "img_size", None)
    size = size or (getattr(anchor, "_model_args", None) or {}).get("img_size")
    size = size or getattr(net, "built_img_size", None)
    size = size or (net.pretrained_cfg.get("input_size") or (3, 224, 224))[-2:]
    return (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))


def route_costs(net: SNNet, img_size: int | tuple[int, int] | None = None) -> tuple[tuple[int, int],
                                                                                  dict[int, Record]]:
    """(image size, {cfg_id: {cfg_id, route, flops, params}}): every route's FLOPs at `img_size` (default: the size
    the anchors were built for) and the params it executes; the costs `stitch_for` and `snnet serve` rank by."""
    size = model_img_size(net) if img_size is None else img_size
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    from snnet.stitching.cost import cost_table  # torch: only for a network in hand, not for a results file
    table = cost_table(net, size)
    return size, {c: {"cfg_id": c, "route": net.describe(c), "flops": table.route_flops(steps),
                      "params": net.params(c)} for c, steps in enumerate(net.routes)}


def stitch_for(net: SNNet, records: Sequence[Record] | str | os.PathLike | None = None,
               max_flops: float | None = None, max_params: float | None = None,
               img_size: int | tuple[int, int] | None = None) -> int:
    """The cfg_id to pass to ``net(x, cfg_id)`` for a budget (switching allocates nothing; see the module doc).

    FLOPs are counted at `img_size` (default: the size the anchors were built for) and params are those the route
    executes. `records` (a stitches_res.txt, or its records) must be this SN-Net's (routes are checked); only
    stitches they hold are candidates, the most accurate within the budget is chosen. Without them, the most costly
    stitch within the budget.
    """
    if isinstance(records, (str, os.PathLike)):
        records = read_results(records)
    size, costs = route_costs(net, img_size)
    limits = {k: v for k, v in (("flops", max_flops), ("params", max_params)) if v is not None}
    source = f"this SN-Net at {size[0]}x{size[1]}"
    if records is None:
        fit = within(list(costs.values()), limits)
        if not fit:
            raise over_budget(list(costs.values()), limits, source, KWARGS)
        return max(fit, key=lambda r: (r["flops"], r["params"], -r["cfg_id"]))["cfg_id"]
    check_routes(net, records, "the records")
    # the costs at this image size replace the recorded ones (equal when the evaluation ran at this size)
    ranked = [{**r, **costs[r["cfg_id"]]} for r in records]
    return select(ranked, limits, None, source, KWARGS)[0]["cfg_id"]
