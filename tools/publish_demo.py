"""Copy the last demo runs' results into the committed results/demo and results/demo_v2 (`make demo-results`).

    python tools/publish_demo.py [--work output/demo]

Trains nothing: takes WORK/results/demo and WORK/results/demo_v2 (those present, as `python -m snnet.demo` and
`python -m snnet.demo --v2` leave them), copies each results file with the anchors' predictions beside it and the
demo's trained SN-Net (snnet.pth.tar) into the committed folder, and rebuilds the tables, plots and reports there
from the copies. `python -m snnet.demo --check` (`make demo-check`) compares a fresh run with what this published.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from snnet.demo import PUBLISHED, V2_TITLE, WEIGHTS_FILE, WORK, copy_results, fresh_results, report
from snnet.results.records import RESULTS_FILE
from snnet.utils.fileio import atomic_path


def publish(fresh: Path, committed: Path, v2: bool) -> None:
    """Copy a fresh run's results files (and predictions) to the committed folder and rebuild its report there."""
    sources = [committed / f.relative_to(fresh) for f in sorted(fresh.rglob(RESULTS_FILE))]
    for src, dest in zip(sorted(fresh.rglob(RESULTS_FILE)), sources):
        copy_results(src.parent, dest)
    weights = []
    if (fresh / WEIGHTS_FILE).exists():  # the demo's SN-Net (not the v2 comparison's)
        with atomic_path(committed / WEIGHTS_FILE) as tmp:
            shutil.copyfile(fresh / WEIGHTS_FILE, tmp)
        weights.append(committed / WEIGHTS_FILE)
    files = report(committed, sources, V2_TITLE) if v2 else report(committed)
    print(f"published {fresh} -> {', '.join(str(f) for f in [*sources, *weights, *files])}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(WORK), help="the demo's scratch folder (default output/demo)")
    work = Path(p.parse_args(argv).work)
    for name in fresh_results(work):
        publish(work / "results" / name, PUBLISHED[name], name == "demo_v2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
