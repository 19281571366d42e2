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

__all__ = ["ROOT", "TINY", "FAST", "IMG", "run", "run_cli", "assert_refused", "vit", "Tiny"]


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


def assert_refused(rc, err, *needles):
    """Exit 2, one line on stderr (notes aside), no traceback, naming what was asked for."""
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("note:")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


IMG = 16  # the image size of `Tiny`


def vit(width):
    """A tiny DeiT anchor (patch 4, depth 4, 2 heads) of the given width."""
    return {"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": width,
                                                              "num_heads": 2}}


class Tiny:
    """A two-anchor ViT SN-Net, its checkpoint, config and a results file with made-up accuracies (the `tiny`
    fixture)."""

    def __init__(self, root):
        import json

        import torch

        from snnet.core.build import build_snnet
        from snnet.core.checkpoint import save_checkpoint
        from snnet.core.config import parse_stitch_config
        from snnet.core.cost import cost_table
        self.root = root
        raw = {"anchors": [vit(8), vit(16)]}
        self.config = root / "tiny.json"
        self.config.write_text(json.dumps(raw))
        torch.manual_seed(0)
        self.net = build_snnet(parse_stitch_config(raw), pretrained=False, num_classes=10, img_size=IMG).eval()
        self.ckpt = root / "last.pth.tar"
        save_checkpoint(self.ckpt, {"state_dict": self.net.state_dict(), "epoch": 0,
                                    "args": json.dumps({"num_classes": 10, "img_size": IMG, "model_kwargs": {}})})
        table = cost_table(self.net, IMG)
        flops = [table.route_flops(r) for r in self.net.routes]
        self.records = [{"cfg_id": c, "flops": f, "params": self.net.params(c),
                         "acc1": 40 + 30 * (f / max(flops)) ** 0.5 + ((c * 37) % 11 - 5) * 0.7,
                         "acc5": 99.0, "route": self.net.describe(c)} for c, f in enumerate(flops)]
        self.results = root / "stitches_res.txt"
        self.results.write_text("".join(json.dumps(r) + "\n" for r in self.records))
