"""Constants and helpers the test files share (a plain module: `from helpers import FAST, run`); fixtures live in
conftest.py.

TINY: two tiny DeiT anchors (widths 8 and 16) for a stitch config; FAST: train.py flags of a quick CPU run on the
16x16 digits; ROOT: the repository root; run: a command from ROOT; start: one not waited for; run_cli: `snnet ...`
in-process.
"""
import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TINY = [{"name": "deit_tiny_patch16_224", "model_kwargs": {"patch_size": 4, "depth": 4, "embed_dim": w,
                                                             "num_heads": 2}} for w in (8, 16)]
FAST = ["--img-size", "16", "-b", "16", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "-j", "0",
        "--no-pretrained", "--log-interval", "5", "--seed", "1"]

__all__ = ["ROOT", "TINY", "FAST", "IMG", "SMALL_MODES", "run", "start", "run_cli", "shared_cli", "assert_refused",
           "vit", "Tiny", "ForkedCli", "ForkedProcess", "ForkedPopen", "small_mode_builder"]


def run(args, timeout=300, env=None):
    """Run a command from the repository root, one intra-op thread per process. `python train.py ...`,
    `python -m snnet.cli ...`, `python -m torch.distributed.run ...` (torchrun), `python -c CODE ...` and the
    launcher of `./distributed_train.sh N ...` (what the script execs:
    `python -m snnet.train.launch --nproc_per_node=N $TORCHRUN_ARGS train.py ...`, with the script's PYTHONPATH) are
    forked from a server that imported the library once (ForkedCli: a fresh process with its own stdout, stderr,
    environment and exit code, -9 when killed), so each costs its own work and not the ~6 CPU-seconds of importing
    torch, timm and the library (the children share the server's str hash seed). The ranks torchrun starts there
    (`python -u train.py ...`, `python -u -m snnet.cli ...`) are forked too, from a process forked before the
    launcher runs anything (`fork_ranks` in the server; the ranks of one launch share its str hash seed), and
    torchrun waits for and signals them as its own children; SNNET_TEST_FORK_RANKS=0 starts them afresh. Any other
    command (a script's usage error, ./distributed_train.sh started by the test itself) is a fresh process.
    SNNET_TEST_FORK=0 starts every command afresh."""
    args, full_env, entry, server = _forkable(args, env)
    if server:
        try:
            code, out, err = server.call(entry[0], entry[1], cwd=ROOT, env=full_env, timeout=timeout)
        finally:
            server.lock.release()
        return subprocess.CompletedProcess(args, code, out, err)
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def start(args, log, env=None):
    """`run`'s command started, not waited for, its stdout and stderr both into the file `log`: forked as `run`
    forks it (a ForkedProcess; several may run at once, e.g. two torchrun agents as two nodes), else a
    `subprocess.Popen` in a session of its own. Either has `pid`, `poll()`, `wait(timeout)` and `returncode`; the
    caller kills what is left of it (`process_tree`) before it returns."""
    args, full_env, entry, server = _forkable(args, env)
    if server:
        try:
            return server.start(entry[0], entry[1], cwd=ROOT, env=full_env, log=log)
        finally:
            server.lock.release()
    with open(log, "w") as f:
        return subprocess.Popen(args, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                start_new_session=True)


def _forkable(args, env):
    """(args as strings, the command's whole environment, its ForkedCli entry or None, this process's fork server
    with its lock held when the command is to be forked there, else None)."""
    args = [str(a) for a in args]
    full_env = with_faults({**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    entry = _entry_point(args, full_env)
    if entry and entry[0] == "launch":  # as the script sets it
        full_env["PYTHONPATH"] = ROOT + (f":{full_env['PYTHONPATH']}" if full_env.get("PYTHONPATH") else "")
    # one thread at a time talks to the server; another thread's command meanwhile is a process of its own
    if entry and os.environ.get("SNNET_TEST_FORK", "1") != "0" and _FORK_OWNER[0] in (None, os.getpid()):
        server = _fork_server()
        if server.lock.acquire(blocking=False):
            return args, full_env, entry, server
    return args, full_env, entry, None

FAULTS = os.path.join(ROOT, "tests", "faults")


def with_faults(env):
    """`env`, with tests/faults first on PYTHONPATH when it asks for a fault (SNNET_FAULT_*: tests/faults/inject.py),
    so that every Python process of the run (torchrun's ranks, Slurm's tasks) injects it."""
    if not any(k.startswith("SNNET_FAULT_") for k in env):
        return env
    return {**env, "PYTHONPATH": FAULTS + (f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else "")}


_FORK_SERVERS: list = []  # this process's fork server (one per pytest-xdist worker), started on first use
_FORK_OWNER: list = [None]  # the pid that started it (a process forked from a test does not share its pipes)


def _entry_point(args, env):
    """(ForkedCli entry, its argv) for `python train.py ARGV`, `python -m snnet.cli ARGV`,
    `python -m torch.distributed.run ARGV` and `python -c CODE ARGV` of this Python and for
    `./distributed_train.sh N ARGV` under `env` (the launcher it execs, with `env`'s TORCHRUN_ARGS; not where `env`
    names another PYTHON), or None for any other command."""
    if len(args) >= 2 and args[0] in ("./distributed_train.sh", os.path.join(ROOT, "distributed_train.sh")) \
            and args[1].isdigit() and int(args[1]) >= 1 and "PYTHON" not in env:
        return "launch", [f"--nproc_per_node={args[1]}", *env.get("TORCHRUN_ARGS", "").split(),
                          os.path.join(ROOT, "train.py"), *args[2:]]
    if len(args) >= 2 and args[0] == sys.executable:
        if args[1] in ("train.py", os.path.join(ROOT, "train.py")):
            return "train", args[2:]
        if args[1:3] == ["-m", "snnet.cli"]:
            return "snnet", args[3:]
        if args[1:3] == ["-m", "torch.distributed.run"]:
            return "torchrun", args[3:]
        if args[1] == "-c" and len(args) >= 3:
            return "code", args[2:]
    return None


def _fork_server():
    if not _FORK_SERVERS:
        _FORK_OWNER[0] = os.getpid()
        workdir = tempfile.mkdtemp(prefix="snnet-fork-")
        server = ForkedCli(workdir, warnings=True)  # the warnings a fresh process prints, as in one
        _FORK_SERVERS.append(server)
        atexit.register(lambda: (server.close(), shutil.rmtree(workdir, ignore_errors=True)))
    return _FORK_SERVERS[0]


def shared_cli():
    """This worker's fork server, the one `run` uses: `.call(entry, argv, cwd=..., env=...)` for what `run` cannot
    say (another working folder), without a server of its own (each costs ~6 CPU-s of imports). Not to be closed;
    one call at a time."""
    return _fork_server()


class ForkedPopen:
    """`subprocess.Popen(cmd, stdout=PIPE, stderr=STDOUT, text=True, env=...)` as snnet.demo's step runner uses it,
    run to its end by `run` (so train.py and the launcher are forked, not fresh interpreters): `stdout` then yields
    its output lines (stderr after stdout), `wait()` its exit code. For a test that checks what the steps produce,
    not their progress while they run (the relay sees every line only at the end). `cwd` is not read: `run` works
    in the repository root, as snnet.demo asks. Install it with
    `monkeypatch.setattr(snnet.demo, "subprocess", ForkedPopen.module())`."""

    def __init__(self, cmd, cwd=None, env=None, **_):
        done = run(cmd, timeout=600, env=env)
        self.returncode = done.returncode
        self.stdout = iter((done.stdout + done.stderr).splitlines(keepends=True))

    def wait(self, timeout=None):
        return self.returncode

    @classmethod
    def module(cls):
        """A stand-in for the `subprocess` module of one importer: Popen forks, PIPE and STDOUT as subprocess's."""
        import types
        return types.SimpleNamespace(Popen=cls, PIPE=subprocess.PIPE, STDOUT=subprocess.STDOUT)


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


#: arrivals per simulated load of the mode tables the serving tests build (snnet.serve.simulate.MODE_REQUESTS,
#: 1000 in a server): a fifth of the work, and on the tests' menus the same choices at the light and heavy ends
SMALL_MODES = 200


def small_mode_builder(idle, closed):
    """snnet.serve.scheduler's mode-table builder process, started to simulate `SMALL_MODES` arrivals per load: a
    test puts it in place of `scheduler._builder_started` (the pool's initializer, run in the spawned process; this
    module imports nothing heavy there)."""
    from snnet.serve import scheduler, simulate
    simulate.MODE_REQUESTS = SMALL_MODES
    scheduler._builder_started(idle, closed)


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

        from snnet.stitching.build import build_snnet
        from snnet.stitching.config import parse_stitch_config
        from snnet.stitching.cost import cost_table
        from snnet.utils.checkpoint import save_checkpoint
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


def trace_route_flops(model, cfg_id: int, img_size: int = 224, in_chans: int = 3) -> int:
    """FLOPs of one whole route traced in one piece: the slow, obviously-right count the cost table is checked
    against."""
    import torch

    from snnet.stitching.cost import count_flops, eval_mode
    x = torch.zeros(1, in_chans, img_size, img_size, device=next(model.parameters()).device)
    with torch.no_grad(), eval_mode(model):
        return count_flops(lambda t: model(t, cfg_id), model, x)


def open_data(data_dir: str, need_train: bool, num_classes: int | None = None):
    """(options, train, val) of an ImageFolder root as the tools read it, checked."""
    from snnet.data.checks import check_data
    from snnet.data.datasets import create_datasets
    from snnet.explore.similarity import data_options
    data = data_options(data_dir, num_classes)
    check_data(data, need_train=need_train, world_size=1)
    return data, *create_datasets(data, need_train=need_train)


_SERVER = r"""
import json, logging, os, select, sys, threading, traceback
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "tests", "faults"))
import snnet.cli, snnet.train.launch, snnet.train.main, snnet.train.preflight  # imports only: nothing computed
import inject  # the faults a test asks for (tests/faults/inject.py), applied in a forked child
import torch.distributed.run  # before a fork (the launcher's torchrun, imported where it runs)
import gc
gc.freeze()  # the imports' objects out of the collector's reach: a child's full collection neither walks
#              them (~0.35 s) nor copies their pages (~100 MB)


def code(argv):  # `python -c CODE ARGS`: CODE run as __main__ (sys.argv is ["-c", *ARGS], as Python sets it)
    exec(compile(argv[0], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    return 0


def script(argv):  # `python SCRIPT ARGS`: SCRIPT run as __main__, its folder first on sys.path (sys.argv is argv)
    import runpy
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")
    return 0


def exit_code(e):  # a SystemExit's exit code, as the interpreter gives it (sys.exit("message"): printed, exit 1)
    if e.code is not None and not isinstance(e.code, int):
        print(e.code, file=sys.stderr)
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def finish(code):
    # at exit as the interpreter would: join non-daemon threads, close logging's handlers; not the atexit
    # handlers the server registered on import (wandb's, tempfile's finalizers: they would delete the
    # server's wandb-media folder, which the next child needs)
    try:
        threading._shutdown()
        logging.shutdown()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


def exit_after(body):  # a forked child's end: body()'s exit code, a SystemExit's or 1 (printed) for an exception
    code = 1
    try:
        code = body()
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        finish(code)


def rank_main(argv, env, cwd):  # a rank torchrun starts as `python -u SCRIPT ARGS` or `python -u -m MODULE ARGS`
    exit_after(lambda: _rank(argv, env, cwd))


def _rank(argv, env, cwd):
    import io
    import runpy
    os.setsid()  # as torchrun's Popen(start_new_session=True)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    inject.apply_if_asked()
    for fd, name in ((1, "stdout"), (2, "stderr")):  # -u: unbuffered
        setattr(sys, name, io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), write_through=True))
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
    return 0


def fork_ranks():
    # torchrun's ranks (`python -u train.py ...`, `python -u -m snnet.cli ...`) forked from a process forked here,
    # before the launcher runs anything (its state: this server's imports, the call's environment and folder), not
    # fresh interpreters that import torch, timm and snnet again (~6 CPU-s each). Double-forked and handed to the
    # launcher (a child subreaper) by their parent's exit, so torchrun waits for and signals them as its own
    # children. Only ranks whose stdout and stderr are the launcher's (torchrun's default); any other command,
    # and every rank under SNNET_TEST_FORK_RANKS=0, is started by Popen as torchrun does.
    import ctypes
    import subprocess
    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        return
    if os.fork() == 0:  # the ranks' parent: one request line (argv, env, cwd) per rank, its pid back
        try:  # never returns: whatever happens here, this process ends here
            os.close(req_w)
            os.close(rep_r)
            with os.fdopen(req_r) as requests:
                for line in requests:
                    r = json.loads(line)
                    got_r, got_w = os.pipe()
                    middle = os.fork()
                    if middle == 0:
                        try:
                            pid = os.fork()
                            if pid == 0:
                                for fd in (got_r, got_w, rep_w, requests.fileno()):
                                    os.close(fd)
                                rank_main(r["argv"], r["env"], r["cwd"])  # ends the process
                            os.write(got_w, f"{pid}\n".encode())
                        finally:
                            os._exit(0)
                    os.close(got_w)
                    with os.fdopen(got_r) as got:
                        pid = int(got.readline())
                    os.waitpid(middle, 0)  # gone: the rank is the launcher's child now
                    os.write(rep_w, f"{pid}\n".encode())
        finally:
            os._exit(0)
    os.close(req_r)
    os.close(rep_w)
    requests, replies, lock = os.fdopen(req_w, "w"), os.fdopen(rep_r), threading.Lock()

    class ForkedRank(subprocess.Popen):
        def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest):
            with lock:
                requests.write(json.dumps({"argv": list(args[2:]), "env": dict(env), "cwd": cwd or os.getcwd()})
                               + "\n")
                requests.flush()
                self.pid = int(replies.readline())
            self._child_created = True

    popen = subprocess_handler.SubprocessHandler._popen

    def forked_popen(handler, args, env):
        args = [str(a) for a in args]
        if handler._stdout is None and handler._stderr is None and len(args) >= 3 and \
                args[:2] == [sys.executable, "-u"] and (args[2] == "-m" or args[2].endswith(".py")):
            return ForkedRank(args, env=env, start_new_session=True)
        return popen(handler, args, env)
    subprocess_handler.SubprocessHandler._popen = forked_popen


ENTRY = {"train": snnet.train.main.main, "snnet": snnet.cli.main, "preflight": snnet.train.preflight.main,
         "launch": snnet.train.launch.main, "torchrun": lambda argv: torch.distributed.run.main(argv) or 0,
         "code": code, "script": script}
running = {}  # a pidfd (Linux 5.3: readable once its child has exited) -> (the call's id, the child's pid)


def start(req):
    pid = os.fork()
    if pid == 0:  # the child: a fresh process as a user's, its stdin, stdout and stderr its own files
        def child(req=req):
            for fd in running:  # the other calls' children are not this one's
                os.close(fd)
            for fd, path, mode in ((0, os.devnull, os.O_RDONLY),
                                   (1, req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                   (2, req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
                if path is None:  # stderr into stdout's file, as 2>&1
                    os.dup2(1, fd)
                else:
                    os.dup2(os.open(path, mode, 0o644), fd)
            if req.get("env") is not None:  # the whole environment, as subprocess.run(env=...) gives it
                os.environ.clear()
                os.environ.update(req["env"])
                inject.apply_if_asked()  # a fault a test asked for (tests/faults/inject.py)
            os.chdir(req["cwd"])
            sys.argv = {"code": ["-c", *req["argv"][1:]], "script": req["argv"]}.get(req["entry"],
                                                                                    [req["entry"], *req["argv"]])
            if req["entry"] in ("launch", "torchrun") and os.environ.get("SNNET_TEST_FORK_RANKS", "1") != "0":
                fork_ranks()
            return ENTRY[req["entry"]](req["argv"])
        exit_after(child)
    running[os.pidfd_open(pid)] = (req["id"], pid)
    print(json.dumps({"id": req["id"], "pid": pid}), flush=True)


# one request line per call; its child's pid is answered at once and its exit code when it ends, so calls may run
# at the same time (two torchrun agents as two nodes); at the end of stdin, the calls still running are waited for
pending, stdin_open = b"", True
while stdin_open or running:
    for fd in select.select(([0] if stdin_open else []) + list(running), [], [])[0]:
        if fd == 0:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                start(json.loads(line))
        else:
            call_id, pid = running.pop(fd)
            os.close(fd)
            _, status, usage = os.wait4(pid, 0)
            print(json.dumps({"id": call_id, "code": os.waitstatus_to_exitcode(status),
                              "cpu": usage.ru_utime + usage.ru_stime}), flush=True)
"""


class Hung(subprocess.TimeoutExpired):
    """A call past its timeout: subprocess.TimeoutExpired whose message also holds the end of the call's output and
    the Python stacks of its processes at the timeout (a hang that happens once in many suite runs is diagnosed from
    CI's log, or not at all)."""

    def __init__(self, cmd, timeout, report):
        super().__init__(cmd, timeout)
        self.report = report

    def __str__(self):
        return super().__str__() + "\n" + self.report


def process_tree(pid):
    """`pid` and every process descended from it (from /proc: its children, theirs, ...), parents first."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo.extend(sorted(children.get(p, [])))
    return tree


def python_stacks(pids, seconds=20):
    """`py-spy dump` of each process (the Python stack of every thread; installed with ray[serve]): one text per
    process, or one line saying why there is none."""
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        return ["(no py-spy here: no stacks of the hung processes)"]
    out = []
    for p in pids:
        try:
            r = subprocess.run([spy, "dump", "--pid", str(p)], capture_output=True, text=True, timeout=seconds)
            text = r.stdout or r.stderr
            at = text.find("\nPython v")  # after its first line, the command: the fork server's is its whole code
            out.append(f"--- py-spy dump --pid {p}:\n" + (text[at + 1:] if at >= 0 else text)[-4000:])
        except subprocess.TimeoutExpired:
            out.append(f"--- py-spy dump --pid {p}: no answer in {seconds} s")
    return out


class ForkedCli:
    """The real entry points as a user runs them: a fresh process per call, with its real stdout and stderr (log
    lines included: under pytest `logging.basicConfig` is a no-op in-process, so an in-process call hides what a user
    sees before a late error). One server process imports the library once and forks a child per call, so a call
    costs its own work, not torch's import. `call(entry, argv)` -> (exit code, stdout, stderr); entry: "train"
    (train.py), "snnet" (the snnet command), "preflight" (distributed_train.sh's check), "launch" (the launcher
    distributed_train.sh execs: its checks, then torchrun, whose ranks are forked as well: see `run`), "torchrun"
    (`python -m torch.distributed.run`, its ranks forked too), "code" (`python -c CODE ARGS`, argv
    [CODE, *ARGS]) or "script" (`python SCRIPT ARGS`, argv [SCRIPT, *ARGS]; only by `call`: `run` starts other
    scripts afresh). `env`: the child's whole
    environment (None: the server's); `timeout`: seconds, then the child and every process under it are killed and
    `Hung` (a subprocess.TimeoutExpired, as subprocess.run raises, with the end of the output and the stacks) is
    raised. `start(entry, argv, log=...)` does not wait: a ForkedProcess, and the server forks the next call
    meanwhile. Not for several threads at once (`lock`)."""

    def __init__(self, workdir, warnings=False):
        self.workdir = str(workdir)
        env = {**os.environ, "OMP_NUM_THREADS": "1", **({} if warnings else {"PYTHONWARNINGS": "ignore"})}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, ROOT], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT, env=env)
        self.calls, self._buffer, self._ended = 0, b"", {}  # _ended: call id -> its exit, read while waiting
        # the children's CPU time so far (wait4's rusage; the loader workers they waited for too)
        self.cpu_seconds = 0.0
        self.lock = threading.Lock()  # held by the thread talking to the server (`run`, ForkedProcess)

    def _reply(self, deadline=None):
        """The server's next JSON line; None when `deadline` (time.monotonic()) passes first."""
        while b"\n" not in self._buffer:  # read by hand: select() cannot see what a buffered reader holds
            if deadline is not None and not select.select([self.proc.stdout], [], [],
                                                          max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the fork server exited (code {self.proc.poll()})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def start(self, entry, argv, cwd=ROOT, env=None, log=None):
        """`entry ARGV` started, not waited for: a ForkedProcess. `log`: a file that gets its stdout and stderr
        both (`> log 2>&1`); None: files of the work folder that `call` reads."""
        self.calls += 1
        out, err = (os.path.join(self.workdir, f"call{self.calls}.{s}") for s in ("out", "err"))
        if log is not None:
            out, err = str(log), None
        req = {"id": self.calls, "entry": entry, "argv": [str(a) for a in argv], "cwd": str(cwd), "stdout": out,
               "stderr": err, "env": env}
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        while "pid" not in (reply := self._reply()):  # answered at once; another call's end may come first
            self._ended[reply["id"]] = reply
        return ForkedProcess(self, reply["id"], reply["pid"], [entry, *req["argv"]], out, err)

    def _collect(self, proc, deadline=None):
        """Wait for `proc`'s end until `deadline` (time.monotonic(); None: no limit): whether it ended."""
        while proc.id not in self._ended:
            reply = self._reply(deadline)
            if reply is None:
                return False
            self._ended[reply["id"]] = reply
        reply = self._ended.pop(proc.id)
        proc.returncode = reply["code"]
        self.cpu_seconds += reply["cpu"]
        return True

    def call(self, entry, argv, cwd=ROOT, env=None, timeout=None, log=None):
        """`log`: a file that gets the child's stdout and stderr both (`> log 2>&1`) and is kept; stdout and stderr
        are then returned empty."""
        proc = self.start(entry, argv, cwd=cwd, env=env, log=log)
        out, err = proc.out, proc.err
        if not self._collect(proc, None if timeout is None else time.monotonic() + timeout):
            # as subprocess.run: kill the child (and what it started), wait for it, raise
            tree = process_tree(proc.pid)
            stacks = python_stacks(tree)  # where a hang hangs, before the kill: CI's log is all there is of it
            for p in tree:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._collect(proc)
            tails = []
            for path in (out, err):
                if path is not None and os.path.isfile(path):
                    with open(path, errors="replace") as f:
                        tails.append(f"--- the end of its {'stdout' if path == out else 'stderr'}:\n"
                                     + f.read()[-3000:])
            raise Hung(proc.args, timeout, "\n".join(tails + stacks))
        if log is not None:
            return proc.returncode, "", ""
        with open(out) as f, open(err) as g:
            stdout, stderr = f.read(), g.read()
        os.remove(out)
        os.remove(err)
        return proc.returncode, stdout, stderr

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class ForkedProcess:
    """A call `ForkedCli.start` started, as much of a `subprocess.Popen` as the tests use: `pid`, `args`,
    `returncode`, `poll()` and `wait(timeout)` (subprocess.TimeoutExpired past it)."""

    def __init__(self, cli, call_id, pid, args, out, err):
        self.cli, self.id, self.pid, self.args, self.out, self.err = cli, call_id, pid, args, out, err
        self.returncode = None

    def _collect(self, deadline):
        if self.returncode is None and self.cli.lock.acquire(
                timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
            try:
                self.cli._collect(self, deadline)
            finally:
                self.cli.lock.release()
        return self.returncode

    def poll(self):
        return self._collect(time.monotonic())

    def wait(self, timeout=None):
        if self._collect(None if timeout is None else time.monotonic() + timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode
