"""A real single-node Slurm cluster for the `slurm` tests (tests/test_slurm.py): munged, slurmctld and slurmd of
Debian's slurm-wlm / munge packages (`make slurm` installs them), started as root with everything (config, state,
spool, logs, munge's socket and key) under one temporary folder, and stopped again.

    cluster = LocalCluster(folder); cluster.start()    # ~15 s; cluster.env: SLURM_CONF for sbatch, scontrol, ...
    cluster.stop()

`why_not()` says why no cluster can be started here (no root, no packages), or None.
"""
from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
TOOLS = ("sbatch", "srun", "scontrol", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin")


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None)


def why_not() -> str | None:
    """Why a local Slurm cluster cannot be started on this machine (one line), or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "the local Slurm cluster's daemons start as root; run the slurm tests as root"
    missing = [n for n in DAEMONS + TOOLS if _which(n) is None]
    if missing:
        return f"{', '.join(missing)} not installed; `make slurm` installs slurm-wlm and munge (needs apt-get)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no user 'munge' (the munge package creates it); `make slurm` installs it"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """One node (this machine, `cpus` CPUs whatever it has: SlurmdParameters=config_overrides) in one partition."""

    def __init__(self, folder: Path, cpus: int = 8):
        self.folder, self.cpus = Path(folder), cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    def _write_config(self) -> None:
        f = self.folder
        for d in ("state", "spool", "munge"):
            (f / d).mkdir(parents=True, exist_ok=True)
        munge = pwd.getpwnam("munge")
        # munged refuses a key, socket folder or seed it does not own, or that others can write
        shutil.copy("/etc/munge/munge.key", f / "munge" / "munge.key") if Path("/etc/munge/munge.key").exists() \
            else (f / "munge" / "munge.key").write_bytes(os.urandom(128))
        os.chmod(f, 0o755)
        for p in (f / "munge", f / "munge" / "munge.key"):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        os.chmod(f / "munge" / "munge.key", 0o600)
        os.chmod(f / "munge", 0o755)
        self.conf.write_text("\n".join([
            "ClusterName=snnettest", f"SlurmctldHost={self.node}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            # cred_expire: also how long a requeued job waits before it may start again (default 120 s)
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={f}/munge/munge.socket,cred_expire=5",
            f"StateSaveLocation={f}/state", f"SlurmdSpoolDir={f}/spool",
            f"SlurmctldPidFile={f}/slurmctld.pid", f"SlurmdPidFile={f}/slurmd.pid",
            f"SlurmctldLogFile={f}/slurmctld.log", f"SlurmdLogFile={f}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU", "SlurmdParameters=config_overrides", "MpiDefault=none",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "ReturnToService=2", "KillWait=30", "MinJobAge=600",
            # job ids (and so train.py's master ports) unlike another cluster's started by a parallel test worker
            f"FirstJobId={random.randrange(1000, 10_000_000)}", "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1", "MessageTimeout=20",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP", ""]))

    def start(self, timeout: float = 60) -> None:
        self._write_config()
        f = self.folder
        self._spawn(["runuser", "-u", "munge", "--", _which("munged"), "-F", "-f", f"--socket={f}/munge/munge.socket",
                     f"--key-file={f}/munge/munge.key", f"--pid-file={f}/munge/munged.pid",
                     f"--seed-file={f}/munge/munged.seed", f"--log-file={f}/munge/munged.log"])
        self._wait(lambda: (f / "munge" / "munge.socket").exists(), timeout, "munged")
        self._spawn([_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn([_which("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self._idle, timeout, "the node to become idle")

    def _spawn(self, cmd: list) -> None:
        log = open(self.folder / f"{Path(cmd[0] if cmd[0] != 'runuser' else 'munged').name}.out", "ab")
        self._procs.append(subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True))

    def _idle(self) -> bool:
        r = subprocess.run([_which("sinfo") or "sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                           env=self.env)
        return r.returncode == 0 and r.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, ready, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not ready():
            dead = [p.args for p in self._procs if p.poll() is not None]
            if dead or time.monotonic() > end:
                logs = "\n".join(p.read_text()[-1500:] for p in self.folder.glob("*.log*") if p.is_file())
                self.stop()
                why = f"exited: {dead}" if dead else "timeout"
                raise RuntimeError(f"local Slurm cluster: {what} not ready ({why})\n{logs}")
            time.sleep(0.1)

    def run(self, *cmd, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A Slurm command (sbatch, scontrol, ...) against this cluster."""
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**self.env, **kw.pop("env", {})},
                           **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a mapping (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        fields = {}
        for item in r.stdout.split():
            key, sep, value = item.partition("=")
            if sep:
                fields.setdefault(key, value)
        return fields

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=self.env)  # our cluster's jobs
        for p in reversed(self._procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self._procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self._procs.clear()
