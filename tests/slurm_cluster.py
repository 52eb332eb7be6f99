"""A throwaway one-node Slurm on loopback for the integration tests, and the tiny timelit runs they start.

    .ci/install_slurm.sh && pytest -m slurm tests/integration/test_slurm.py

`running_slurm()` writes a slurm.conf into a fresh folder under /tmp (node = `hostname -s`, 2 CPUs, memory from
/proc/meminfo, select/cons_tres, proctrack/linuxproc, no cgroups, JobRequeue=1, its own ports and munge socket, so a
system Slurm on the same machine is left alone), starts munged, slurmctld and slurmd as root in the foreground,
waits until `sinfo` shows the node idle, and at the end cancels what is still queued, stops the three daemons it
started and removes the folder. Clients reach it through `SlurmCluster.env` (`SLURM_CONF`).

The helpers at the bottom give the `timelit fit` overrides of the preemption and Slurm tests (micro model, a few
steps per task, on tests/conftest.py's `tiny_benchmark`), and hash the weights a run ends with.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue", "srun")
DAEMON_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
VENV_BIN = Path(sys.executable).parent


def which(binary: str) -> str | None:
    """A Slurm or munge binary on PATH or in an sbin folder (often off a non-root PATH)."""
    found = shutil.which(binary)
    if found:
        return found
    for folder in DAEMON_DIRS:
        if os.access(Path(folder) / binary, os.X_OK):
            return str(Path(folder) / binary)
    return None


def missing_binaries() -> list[str]:
    return [binary for binary in SLURM_BINARIES if which(binary) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


SLURM_CONF = """\
ClusterName=timelittest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays the restart of a requeued job (default 120 s)
AuthInfo=socket={root}/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
MailProg=/bin/true
PropagateResourceLimits=NONE
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=3600
MessageTimeout=30
SlurmdParameters=config_overrides
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class SlurmCluster:
    """A running one-node cluster; every client call goes through `env` (SLURM_CONF points at its config)."""

    root: Path
    node: str
    env: dict[str, str]
    daemons: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None) -> str:
        """A Slurm client command against this cluster (`env` adds to the cluster's environment, e.g. for sbatch)."""
        result = subprocess.run(
            [which(args[0]) or args[0], *args[1:]],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` of one job as a dict (JobState, Restarts, ExitCode, ...)."""
        fields: dict[str, str] = {}
        for token in self.run("scontrol", "show", "job", "--oneliner", job_id).split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def array_jobs(self, array_job_id: str) -> list[dict[str, str]]:
        """Every task of an array job."""
        out = self.run("scontrol", "show", "job", "--oneliner", array_job_id)
        jobs = []
        for line in out.strip().split("\n"):
            fields: dict[str, str] = {}
            for token in line.split():
                key, _, value = token.partition("=")
                fields.setdefault(key, value)
            jobs.append(fields)
        return jobs

    def wait(self, condition: Callable[[], Any], timeout: float, what: str, poll: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{self.diagnostics()}")

    def queue_is_empty(self) -> bool:
        return not self.run("squeue", "--noheader", check=False).strip()

    def diagnostics(self) -> str:
        """squeue and the daemons' log tails, for failure messages."""
        parts = [f"squeue:\n{self.run('squeue', check=False)}"]
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            lines = path.read_text(errors="replace").splitlines()[-15:] if path.exists() else []
            parts.append(f"{name}:\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel this cluster's jobs, let them end, stop the daemons this object started, remove the folder."""
        with contextlib.suppress(Exception):
            self.run("scancel", f"--user={getpass.getuser()}", check=False)
            self.wait(self.queue_is_empty, 60, "cancelled jobs to end", poll=1)
        for process in reversed(self.daemons):  # slurmd, slurmctld, then munged
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
        self.daemons.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _start(cluster: SlurmCluster, log_name: str, *command: str) -> None:
    log = open(cluster.root / log_name, "ab")  # noqa: SIM115 (the daemon writes to it until stop())
    process = subprocess.Popen(
        [which(command[0]) or command[0], *command[1:]],
        env=cluster.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cluster.daemons.append(process)
    time.sleep(0.2)
    if process.poll() is not None:
        raise RuntimeError(
            f"{command[0]} exited at once ({process.returncode}):\n{(cluster.root / log_name).read_text()}"
        )


@contextlib.contextmanager
def running_slurm(start_timeout: float = 90) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd on loopback; stop them and remove their state afterwards."""
    if os.geteuid() != 0:
        raise PermissionError("the test Slurm starts slurmd, which must run as root (run the Slurm tests as root)")
    # munged wants every folder above its socket searchable by all, so not under pytest's 0700 tmp folders.
    root = Path(tempfile.mkdtemp(prefix="tlslurm-", dir="/tmp"))
    root.chmod(0o755)
    (root / "state").mkdir()
    (root / "spool").mkdir()
    node = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(
        SLURM_CONF.format(
            node=node, root=root, ctld_port=_free_port(), slurmd_port=_free_port(), memory=_memory_mb() * 9 // 10
        )
    )
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(root / "slurm.conf")
    cluster = SlurmCluster(root, node, env)
    try:
        _start(
            cluster,
            "munged.out",
            "munged",
            "--foreground",
            f"--socket={root}/munge.socket",
            f"--key-file={key}",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munged.seed",
        )
        cluster.wait(lambda: (root / "munge.socket").exists(), 30, "munged's socket")
        _start(cluster, "slurmctld.out", "slurmctld", "-D", "-c", "-f", str(root / "slurm.conf"))
        _start(cluster, "slurmd.out", "slurmd", "-D", "-N", node, "-f", str(root / "slurm.conf"))
        cluster.wait(
            lambda: cluster.run("sinfo", "--noheader", "--Node", "--format=%t", check=False).strip() == "idle",
            start_timeout,
            "the node to be idle in sinfo",
        )
        yield cluster
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------------------------------- tiny runs


def tiny_overrides(
    data: Path, steps_per_task: int = 8, every_n_train_steps: int = 3, num_workers: int = 1
) -> list[str]:
    """Overrides that shrink quickstart.yaml to 2 tasks of a few steps of timelit-micro-ViT on `data`."""
    return [
        f"--data.init_args.data_root={data}",
        f"--data.init_args.manifests={data}",
        "--data.init_args.synthesize_if_missing=false",
        "--model.init_args.model_name=timelit-micro-ViT",
        f"--model.init_args.pretrained={data / 'base_model.safetensors'}",
        "--data.init_args.num_tasks=2",
        f"--data.init_args.steps_per_task={steps_per_task}",
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=64",
        f"--data.init_args.num_workers={num_workers}",
        f"--checkpoint.every_n_train_steps={every_n_train_steps}",
        "--budget.total_gflops=null",  # steps_per_task sets the task length; quickstart.yaml's budget would too
        "--trainer.enable_progress_bar=false",
    ]


def job_environment() -> dict[str, str]:
    """What a test's job needs on top of the submitting environment: this venv's timelit and python first on PATH,
    unbuffered output and timelit's INFO messages in its log."""
    return {
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "TIMELIT": str(VENV_BIN / "timelit"),
        "PYTHONUNBUFFERED": "1",
        "TIMELIT_LOG_LEVEL": "INFO",
    }


def weights_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """A hash of names, dtypes, shapes and bytes of every tensor: equal iff the weights are bitwise equal."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def final_weights(run_dir: Path) -> dict[str, str]:
    """What a run ends with: the hash of last.ckpt's state_dict, its global step, and the deployed weights' hash
    when TimeMerge wrote final_model.safetensors."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    found = {"state_dict": weights_sha256(checkpoint["state_dict"]), "global_step": str(checkpoint["global_step"])}
    final = run_dir / "final_model.safetensors"
    if final.exists():
        from safetensors.torch import load_file

        found["final_model"] = weights_sha256(load_file(final))
    return found


def checkpoint_step(run_dir: Path) -> int:
    path = run_dir / "checkpoints" / "last.ckpt"
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def evaluations(run_dir: Path) -> list[tuple]:
    """What every evaluation of a run found (results.json points without wall-clock fields such as TimeMerge's
    `boundary_seconds`, which no two runs share)."""
    points = json.loads((run_dir / "results.json").read_text())["points"]
    return [(p["tasks_done"], p["global_step"], p["A_KA"], p["A_ZS"], p["GM"], p["datasets"]) for p in points]
