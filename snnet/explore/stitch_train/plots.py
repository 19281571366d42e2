"""A sweep's pictures, written beside its results file (`snnet report` embeds them; docs/stitch_train.md):

* sweep.png: per anchor pair (front -> end) and layer type, a cut x end-block map of top-1 (each run's cell; blank
  where no run was made), the anchors' own top-1 in the title;
* curves.png: training loss and top-1 against step for every run, from each run's trajectory.jsonl (steps' train
  loss, epochs' validation top-1; the initial evaluation at step 0).

Only finished runs are drawn (their records); a run whose trajectory cannot be read is left out of curves.png.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from snnet.utils.fileio import save_figure

SWEEP_PNG, CURVES_PNG = "sweep.png", "curves.png"


def _read_trajectory(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def sweep_maps(records: Sequence[dict[str, Any]], out_png: str | Path) -> Path | None:
    """sweep.png from the runs' records (those with a cut and an end block); None when there are none."""
    import matplotlib  # heavy (a second of import): only when a picture is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in records if "cut" in r and "end_block" in r]
    if not runs:
        return None
    anchors = {r["route"]: r["acc1"] for r in records if "cut" not in r}
    groups: dict[tuple, list] = {}
    for r in runs:
        groups.setdefault((r["front"], r["end"], r.get("layer", "")), []).append(r)
    n = len(groups)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), dpi=120, squeeze=False)
    lo, hi = min(r["acc1"] for r in runs), max(r["acc1"] for r in runs)  # one colour scale across panels
    for ax, ((front, end, layer), rs) in zip(axes.flat, sorted(groups.items())):
        cuts = sorted({r["cut"] for r in rs})
        ends = sorted({r["end_block"] for r in rs})
        grid = np.full((len(cuts), len(ends)), np.nan)
        for r in rs:  # several runs in one cell (e.g. CE and KD): the best one is shown
            i, j = cuts.index(r["cut"]), ends.index(r["end_block"])
            grid[i, j] = np.nanmax([grid[i, j], r["acc1"]])
        image = ax.imshow(grid, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect="auto",
                          origin="lower")
        for i in range(len(cuts)):
            for j in range(len(ends)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=8,
                            color="w" if grid[i, j] < (lo + hi) / 2 else "k")
        ax.set_xticks(range(len(ends)), [str(e) for e in ends])
        ax.set_yticks(range(len(cuts)), [str(c) for c in cuts])
        ax.set_xlabel(f"end block of {end}")
        ax.set_ylabel(f"cut after block of {front}")
        own = ", ".join(f"{a} {anchors[a]:.1f}" for a in (front, end) if a in anchors)
        ax.set_title(f"{front} -> {end} ({layer})" + (f"\nanchors: {own}" if own else ""), fontsize=9)
        fig.colorbar(image, ax=ax, label="top-1 (%)", shrink=0.9)  # the same vmin/vmax in every panel
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("stitch-train sweep: top-1 per cut and end block", fontsize=10)
    save_figure(fig, out_png)
    return Path(out_png)


def learning_curves(records: Sequence[dict[str, Any]], runs_dir: str | Path, out_png: str | Path,
                    trajectory: str = "trajectory.jsonl") -> Path | None:
    """curves.png: train loss (per step) and validation top-1 (per epoch, step 0 = the initial evaluation) of every
    run with a readable trajectory; None when no run has one."""
    import matplotlib  # heavy (a second of import): only when a picture is drawn
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = []
    for r in records:
        if "run" not in r:
            continue
        lines = _read_trajectory(Path(runs_dir) / r["run"] / trajectory)
        if lines:
            curves.append((r, lines))
    if not curves:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    cmap = plt.get_cmap("tab20" if len(curves) > 10 else "tab10")
    for k, (r, lines) in enumerate(curves):
        colour = cmap(k % cmap.N)
        steps = [x for x in lines if x.get("kind") == "step" and x.get("loss") is not None]
        left.plot([x["step"] for x in steps], [x["loss"] for x in steps], lw=0.9, color=colour,
                  label=f"cfg {r['cfg_id']}")
        evals = [x for x in lines if x.get("kind") in ("init", "epoch") and x.get("val_acc1") is not None]
        right.plot([x["step"] for x in evals], [x["val_acc1"] for x in evals], "o-", ms=3, lw=1, color=colour,
                   label=f"cfg {r['cfg_id']}: {r['route']}")
    left.set(xlabel="step", ylabel="train loss", title="training loss per step")
    right.set(xlabel="step", ylabel="validation top-1 (%)", title="top-1 (step 0: least-squares init)")
    for ax in (left, right):
        ax.grid(True, ls="--", alpha=0.4)
    right.legend(fontsize=6, loc="lower right", ncol=1 if len(curves) <= 12 else 2)
    save_figure(fig, out_png)
    return Path(out_png)


def write_sweep_plots(out: str | Path, records: Sequence[dict[str, Any]]) -> list[Path]:
    """Both pictures into the sweep folder `out` (runs under out/runs/); returns the paths written."""
    out = Path(out)
    written = [sweep_maps(records, out / SWEEP_PNG), learning_curves(records, out / "runs", out / CURVES_PNG)]
    return [p for p in written if p is not None]
