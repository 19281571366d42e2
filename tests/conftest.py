import json
import os
import subprocess
import sys

import numpy as np

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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


TINY = [{"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": w,
                                                             "num_heads": 2}} for w in (8, 16)]
FAST = ["--img-size", "16", "-b", "16", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "-j", "0",
        "--no-pretrained", "--log-interval", "5", "--seed", "1"]


def run(args, timeout=300, env=None):
    """Run a command from the repository root, one intra-op thread per process."""
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def run_cli(capsys, *argv):
    """`snnet ARGV...` in-process: (exit code, stdout, stderr)."""
    from snnet import cli
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


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


