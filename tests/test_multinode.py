"""Two torchrun agents as two "nodes" on localhost train bit for bit like one node with two processes;
a node whose worker dies is restarted together with the other node.

Every address is 127.0.0.1, every subprocess runs under a deadline, and on failure the agents and their workers
(torchrun starts each worker in a session of its own) are killed by process id.

Rank order: c10d rendezvous sorts the nodes by (address, agent pid), so which agent becomes node 0 is not
deterministic here. It cannot change the result: both agents run the same command on the same host with one
worker each (LOCAL_RANK 0 on both), and everything rank-dependent (data shard, sampler, RNG seeds, who writes the
output) follows the global rank, of which each node gets one. The static rendezvous run (`--node-rank`) fixes the
order explicitly and must give the same bits.
"""
import os
import signal
import socket
import subprocess
import time
import uuid

import pytest
from helpers import FAST, process_tree, run, start
from test_resume import assert_identical

EPOCHS = ["--epochs", "2"]
WAIT_STEP = 7  # 2 processes x 80 images / batch 16: 5 steps per epoch; step 7 is inside the second epoch
DEADLINE = 150  # seconds for a two-node run (a few seconds on 2 CPU cores)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="finds worker processes in /proc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(procs) -> None:
    """Kill the agents we started and their workers, by pid (deepest first)."""
    for p in procs:
        for pid in reversed(process_tree(p.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(timeout=30)


def torchrun_args(backend: str, port: int, node: int) -> list[str]:
    common = ["--nnodes", "2", "--local-addr", "127.0.0.1"]  # local-addr: MASTER_ADDR is 127.0.0.1, not the FQDN
    if backend == "c10d":
        return [*common, "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "--rdzv-id", uuid.uuid4().hex[:12]]
    return [*common, "--rdzv-backend", "static", "--node-rank", str(node), "--master-addr", "127.0.0.1",
            "--master-port", str(port)]


class Nodes:
    """Two `./distributed_train.sh 1 ...` agents started concurrently (helpers.start: forked, as `run` forks them);
    killed on any failure or timeout."""

    def __init__(self, backend, digits_folder, tiny_config, out, experiment, extra_torchrun=(), preflight=False,
                 env=None):
        port = free_port()
        rdzv = torchrun_args(backend, port, 0)
        self.logs = [out / f"{experiment}.node{i}.log" for i in range(2)]
        self.procs = []
        for i in range(2):
            args = rdzv if backend == "c10d" else torchrun_args(backend, port, i)  # c10d: one rdzv-id for both
            node_env = {**(env or {}), "TORCHRUN_ARGS": " ".join([*args, *extra_torchrun]),
                        **({} if preflight else {"SNNET_NO_PREFLIGHT": "1"})}  # the launch's checks: one case runs them
            self.procs.append(start(["./distributed_train.sh", "1", digits_folder, "--stitch_config", tiny_config,
                                     *FAST, *EPOCHS, "--output", out, "--experiment", experiment], self.logs[i],
                                    node_env))
        self.deadline = time.monotonic() + DEADLINE

    def log(self, i: int) -> str:
        return self.logs[i].read_text()

    def check_time(self, what: str) -> None:
        """Fails when the deadline has passed or an agent has ended while the test waits for `what`."""
        ended = [i for i, p in enumerate(self.procs) if p.poll() is not None]
        if time.monotonic() > self.deadline or ended:
            stop(self.procs)
            why = f"node(s) {ended} ended" if ended else "timed out"
            pytest.fail(f"{why} waiting for {what}\n" + "\n".join(self.log(i)[-3000:] for i in range(2)))

    def wait(self) -> None:
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.check_time("the agents to finish")
        finally:
            if any(p.poll() is None for p in self.procs):
                stop(self.procs)
        for i, p in enumerate(self.procs):
            if p.returncode != 0:
                stop(self.procs)
                pytest.fail(f"node {i} exit code {p.returncode}\n" + self.log(i)[-4000:])


@pytest.fixture(scope="module")
def one_node(tmp_path_factory, digits_folder, tiny_config):
    out = tmp_path_factory.mktemp("one_node")
    r = run(["./distributed_train.sh", "2", digits_folder, "--stitch_config", tiny_config, *FAST, *EPOCHS,
             "--output", out, "--experiment", "one"], timeout=DEADLINE)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "one"


@pytest.mark.parametrize("backend", ["c10d", "static"])
@pytest.mark.dist
def test_two_nodes_train_bit_identical_to_one_node(backend, one_node, tmp_path, digits_folder, tiny_config):
    nodes = Nodes(backend, digits_folder, tiny_config, tmp_path, "two", preflight=backend == "c10d")
    nodes.wait()
    assert "2 process(es)" in nodes.log(0) + nodes.log(1)
    assert_identical(one_node, tmp_path / "two")


@pytest.mark.dist
def test_c10d_node_failure_restarts_both_nodes_bit_identical(one_node, tmp_path, digits_folder, tiny_config):
    """Rank 1's worker dies in epoch 1 while rank 0's is stuck (as in a collective on NCCL; SIGSTOP here): the
    agent of the failed node counts a restart (TORCHELASTIC_RESTART_COUNT=1), the other agent restarts its healthy
    worker as a membership change and does not count it (its new worker sees 0). Both new workers must still
    agree that this is a restart: same process-group store, both resume from last.pth.tar. Both workers wait after
    step WAIT_STEP (tests/faults: each writes its pid), so that the faults hit epoch 1 however fast the run is."""
    waiting = tmp_path / "waiting"
    nodes = Nodes("c10d", digits_folder, tiny_config, tmp_path, "restarted", ["--max-restarts", "2"],
                  env={"SNNET_FAULT_WAIT_AT_STEP": str(WAIT_STEP), "SNNET_FAULT_WAIT_FILE": str(waiting)})
    run_dir = tmp_path / "restarted"
    files = [tmp_path / f"waiting.{rank}" for rank in range(2)]
    while not all(f.exists() for f in files):
        nodes.check_time(f"both workers at step {WAIT_STEP}")
        time.sleep(0.02)
    assert (run_dir / "checkpoint-0.pth.tar").exists()
    pid0, pid1 = (int(f.read_text().split()[1]) for f in files)
    os.kill(pid0, signal.SIGSTOP)
    os.kill(pid1, signal.SIGKILL)
    # the healthy node's agent sees the other node waiting in a new rendezvous round and stops its worker
    while f"Sending process {pid0} closing signal" not in nodes.log(0) + nodes.log(1):
        nodes.check_time("the healthy node to restart its worker")
        time.sleep(0.05)
    os.kill(pid0, signal.SIGCONT)
    nodes.wait()
    logs = nodes.log(0) + nodes.log(1)
    assert "auto-resume: continuing from" in logs
    assert_identical(one_node, run_dir)
