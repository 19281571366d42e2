"""Constants and helpers the test files share (a plain module: `from helpers import FAST, run`); fixtures live in
conftest.py.

TINY: two tiny DeiT anchors (widths 8 and 16) for a stitch config; FAST: train.py flags of a quick CPU run on the
16x16 digits; ROOT: the repository root; run: a command from ROOT; run_cli: `snnet ...` in-process.
"""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY = [{"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": w,
                                                             "num_heads": 2}} for w in (8, 16)]
FAST = ["--img-size", "16", "-b", "16", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "-j", "0",
        "--no-pretrained", "--log-interval", "5", "--seed", "1"]

__all__ = ["ROOT", "TINY", "FAST", "run", "run_cli"]


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
