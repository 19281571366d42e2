"""Fixtures only; the shared constants and helpers (ROOT, TINY, FAST, run, run_cli) are in helpers.py.

Test tiers (markers registered in pyproject.toml): `slow` (one test over ~1.5 s on a 2-core machine), `dist` (starts
several processes: torchrun, distributed_train.sh, mp.spawn), `browser` (needs Chromium), `slurm` (a local Slurm
cluster: root, slurm-wlm and munge). `make test-fast` runs
`-m "not slow and not dist and not browser"`.

Order and pytest-xdist scheduling (see `pytest_collection_modifyitems`, `pytest_xdist_make_scheduler`): whole test
files, the costliest first (estimated from the markers), each file on one worker, so that a module fixture is
built once and no long test is left for the end while the other worker idles.
"""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from helpers import TINY, ForkedCli, Tiny
from xdist.scheduler import LoadScopeScheduling

# Intra-op threads for the test process (SNNET_TEST_THREADS, default 1): most test tensors are small, and on a 2-core
# machine a second intra-op thread mostly waits; the multi-process tests use the other core.
torch.set_num_threads(int(os.environ.get("SNNET_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def digits_images():
    """scikit-learn's bundled digits (real data) as 3x32x32 float images in [-1, 1], with labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0 * 2 - 1  # (1797, 8, 8)
    x = torch.nn.functional.interpolate(x[:, None], size=32, mode="nearest").repeat(1, 3, 1, 1)
    return x, torch.tensor(d.target)


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory):
    """A small ImageFolder of real digits: 160 train, 60 val images, 16x16 PNG."""
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for n in range(220):
        split = "val" if n < 60 else "train"
        folder = root / split / str(d.target[n])
        folder.mkdir(parents=True, exist_ok=True)
        img = (d.images[n] / 16 * 255).astype(np.uint8)
        Image.fromarray(img).resize((16, 16), Image.NEAREST).convert("RGB").save(folder / f"{n}.png")
    return root


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps({"anchors": TINY, "skip_final_norm": False, "stitch_init_bs": 32}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A two-anchor ViT SN-Net with its checkpoint, config and a results file (helpers.Tiny)."""
    return Tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """The module's fork server (helpers.ForkedCli): `cli.call(entry, argv)` runs train.py, `snnet`, the preflight
    or the launcher as a fresh process would, forked from one that imported them once."""
    runner = ForkedCli(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk (ENOSPC from the kernel, and each library's own error for it). Mounting
    needs root; where it cannot be mounted, the tests that inject ENOSPC cover the same code."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root (the injected-ENOSPC tests cover the same code)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def pytest_configure(config):
    """Each pytest-xdist worker gives the torchrun it starts a master port of its own (torchrun reads
    `PET_MASTER_PORT` when no --master_port is typed), so the two workers' multi-process tests can run at the same
    time without meeting on torchrun's default 29500. A test that types its own port (test_multinode, the Slurm
    tests' derived ports) keeps it. Grouping by `xdist_group` is not used: pytest 9 keeps node ids in `Node._id`,
    so xdist 3.8's `--dist loadgroup` suffix never reached the scheduler and the groups were never kept together."""
    # set in the worker itself, unconditionally: the controller (no PYTEST_XDIST_WORKER) leaves it alone, and a value
    # the workers inherited must not make both use one port
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker[2:].isdigit():
        os.environ["PET_MASTER_PORT"] = str(29510 + int(worker[2:]))


# Estimated CPU seconds of one test, by marker (the first that matches): only the order of the files depends on it.
# Rough means of this suite's tests on a 2-core machine: `dist` ~10-100, `slow` ~1.5-30, the rest < 1.5.
COST = (("slurm", 60.0), ("dist", 30.0), ("slow", 8.0), ("browser", 3.0))
COST_OTHER = 0.3


def item_cost(item) -> float:
    return next((c for m, c in COST if item.get_closest_marker(m)), COST_OTHER)


def pytest_collection_modifyitems(config, items):
    """The test files in order of their estimated total cost, costliest first; the tests of a file keep their order
    and stay together (a module fixture is set up once). With -n N the scheduler below hands out whole files in this
    order (longest processing time first), so the last files to run are the quickest."""
    files: dict = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    cost = {f: sum(item_cost(i) for i in its) for f, its in files.items()}
    items[:] = [i for f in sorted(files, key=lambda f: (-cost[f], f)) for i in files[f]]


class FileScheduling(LoadScopeScheduling):
    """pytest-xdist's loadscope with one work unit per test file, handed out in collection order (the order above):
    each worker asks for the next file when it has at most 2 tests left. A run of only a few files (fewer than 4 per
    worker: `pytest -n 2 tests/test_x.py`) is spread test by test instead, so both workers share it."""

    by_file = True

    def _split_scope(self, nodeid: str) -> str:
        return nodeid.split("::")[0] if self.by_file else nodeid

    def schedule(self) -> None:
        if self.collection is None and self.collection_is_completed:
            files = {nodeid.split("::")[0] for nodeid in next(iter(self.registered_collections.values()))}
            self.by_file = len(files) >= 4 * len(self.nodes)
        self.config.option.loadscopereorder = False  # keep the collection's order (costliest file first)
        super().schedule()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`-n N` with the default `--dist load`: FileScheduling. Another --dist given on the command line is kept."""
    if config.getoption("dist") == "load":
        return FileScheduling(config, log)
    return None
