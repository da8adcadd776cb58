"""A real single-node SLURM cluster for tests (Debian's slurm-wlm: `make test-slurm` installs it).

munged, slurmctld and slurmd run as root with their state, spool, logs and pid files in a temporary
folder; one node (this host, its CPUs) and one default partition. `stop()` ends the daemons by their
pid files. Used by tests/test_slurm.py only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld")


def missing() -> list[str]:
    return [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scancel", "sinfo") if not shutil.which(tool)]


def _conf(root: Path, cpus: int) -> str:
    host = socket.gethostname()
    return f"""ClusterName=test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName={host} CPUs={cpus} RealMemory=20000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start(root: Path) -> dict:
    """Start the cluster; return the environment that points the client tools at it."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, os.cpu_count() or 2))
    env = dict(os.environ, SLURM_CONF=str(conf))
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        subprocess.run(["munged", "--force"], check=True)
    subprocess.run(["slurmctld"], env=env, check=True)
    subprocess.run(["slurmd"], env=env, check=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()
        if state == "idle":
            return env
        time.sleep(0.5)
    stop(root)
    raise RuntimeError(f"the test SLURM node did not become idle (sinfo: {state!r}); see {root}/*.log")


def stop(root: Path) -> None:
    for daemon in DAEMONS:
        pid_file = root / f"{daemon}.pid"
        try:
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
