"""Constants and helpers the test files share (a plain module: `from helpers import FAST, run`); fixtures live in
conftest.py.

TINY: two tiny DeiT anchors (widths 8 and 16) for a stitch config; FAST: train.py flags of a quick CPU run on the
16x16 digits; ROOT: the repository root; run: a command from ROOT; run_cli: `snnet ...` in-process.
"""
import json
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

__all__ = ["ROOT", "TINY", "FAST", "IMG", "run", "run_cli", "assert_refused", "vit", "Tiny", "ForkedCli"]


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


_SERVER = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import snnet.cli, snnet.train.main, snnet.train.preflight  # imports only: nothing computed before a fork
ENTRY = {"train": snnet.train.main.main, "snnet": snnet.cli.main, "preflight": snnet.train.preflight.main}
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: a fresh process as a user's, its stdout and stderr its own files
        code = 1
        try:
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.chdir(req["cwd"])
            sys.argv = [req["entry"], *req["argv"]]
            code = ENTRY[req["entry"]](req["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkedCli:
    """The real entry points as a user runs them: a fresh process per call, with its real stdout and stderr (log
    lines included: under pytest `logging.basicConfig` is a no-op in-process, so an in-process call hides what a user
    sees before a late error). One server process imports the library once and forks a child per call, so a call
    costs its own work, not torch's import. `call(entry, argv)` -> (exit code, stdout, stderr); entry: "train"
    (train.py), "snnet" (the snnet command) or "preflight" (distributed_train.sh's check)."""

    def __init__(self, workdir):
        self.workdir = str(workdir)
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, ROOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        self.calls = 0

    def call(self, entry, argv, cwd=ROOT):
        self.calls += 1
        out, err = (os.path.join(self.workdir, f"call{self.calls}.{s}") for s in ("out", "err"))
        req = {"entry": entry, "argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": out, "stderr": err}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        code = json.loads(self.proc.stdout.readline())["code"]
        with open(out) as f, open(err) as g:
            return code, f.read(), g.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
