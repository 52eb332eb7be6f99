"""The Slurm launcher of `timelit sweep`: a sweep's unfinished points as array jobs, one per resource shape.

    timelit sweep --grid model_size --concurrency 8 --sbatch '[--partition=gpu, --time=48:00:00]'

`sbatch --array=<unfinished points>%<concurrency> slurm/array.sbatch <manifest>`; array task i runs line i of
`<root>/<sweep>/manifest.jsonl`, logging to `<root>/<sweep>/logs/<i>.log`. Finished points, and points whose array
task `squeue` shows in an active state, are not submitted again, and nothing is submitted when `squeue` fails
(`--ignore_queue true` overrides).
"""

from __future__ import annotations

import getpass
import hashlib
import itertools
import logging
import shlex
import shutil
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

from timelit.study.grid import Grid, merge_sbatch_options
from timelit.study.manifest import MANIFEST_FILE, Point, is_complete, write_sweep_files
from timelit.utilities.resources import PACKAGE_DIR

log = logging.getLogger(__name__)

DEFAULT_SIGNAL_SECONDS = 300

# Job states (squeue's %T) in which an array task may still run its point. The other states are final: COMPLETED,
# FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL, BOOT_FAIL, DEADLINE, PREEMPTED and REVOKED stay visible in
# squeue for MinJobAge (300 s by default) but will not run again. A job requeued after preemption, a node failure or
# `scontrol requeue` shows as REQUEUED, then PENDING; PREEMPTED is what stays of one that was not requeued. Held
# jobs (REQUEUE_HOLD, SPECIAL_EXIT: requeued and held until `scontrol release`) keep their id and may run again, so
# they count as active: release or cancel them. slurm/array.sbatch's run lock uses the same list (a test checks).
ACTIVE_STATES = frozenset(
    {
        "PENDING", "RUNNING", "SUSPENDED", "STOPPED", "CONFIGURING", "COMPLETING", "RESIZING", "SIGNALING",
        "STAGE_OUT", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "RESV_DEL_HOLD",
    }
)  # fmt: skip
FINISHED_STATES = frozenset(
    {
        "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
        "PREEMPTED", "REVOKED",
    }
)  # fmt: skip


class QueueError(RuntimeError):
    """squeue is missing or failed, so nobody knows which points are queued or running."""


def job_name(sweep_dir: Path) -> str:
    """`timelit-<sweep>-<hash of its folder>`: how squeue tells this sweep's array tasks from any other's."""
    digest = hashlib.sha256(str(sweep_dir).encode()).hexdigest()[:6]
    return f"timelit-{sweep_dir.name}-{digest}"


def queued_indices(name: str) -> dict[int, str]:
    """Array task id -> state of this user's tasks named `name` that may still run (ACTIVE_STATES).

    Raises QueueError when squeue is missing or fails: "nothing queued" cannot be told from "squeue did not answer",
    and taking one for the other submits running points a second time. A state this list does not know (a newer
    Slurm's) counts as active, with a warning: a point is never submitted twice on a guess.
    """
    if shutil.which("squeue") is None:
        raise QueueError("squeue is not on PATH")
    command = ["squeue", "--noheader", "--array", f"--name={name}", f"--user={getpass.getuser()}", "--format=%K %T"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise QueueError(f"`{shlex.join(command)}` did not run: {error}") from None
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        raise QueueError(f"`{shlex.join(command)}` failed: {reason[0]}")
    queued: dict[int, str] = {}
    for line in result.stdout.splitlines():
        task, _, state = line.strip().partition(" ")
        state = state.strip().split()[0] if state.strip() else ""
        if not task.isdigit() or state in FINISHED_STATES:
            continue
        if state not in ACTIVE_STATES:
            log.warning("array task %s of %s is in state %r, unknown to timelit: counted as active", task, name, state)
        queued[int(task)] = state
    return queued


def array_spec(indices: list[int], concurrency: int | None) -> str:
    """`0-3,7,9-10%4`: runs of consecutive indices as ranges, then the concurrency limit."""
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(indices)), key=lambda pair: pair[1] - pair[0]):
        values = [value for _, value in run]
        parts.append(str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}")
    return ",".join(parts) + (f"%{concurrency}" if concurrency else "")


def array_script() -> Path:
    """slurm/array.sbatch: in the wheel under timelit/_shipped/slurm, in a checkout at the repository root."""
    for candidate in (PACKAGE_DIR / "_shipped" / "slurm", PACKAGE_DIR.parent / "slurm"):
        if (candidate / "array.sbatch").is_file():
            return candidate / "array.sbatch"
    raise FileNotFoundError(
        f"slurm/array.sbatch not found in {PACKAGE_DIR / '_shipped'} or {PACKAGE_DIR.parent}; pass --script"
    )


@dataclass(frozen=True)
class SlurmOptions:
    """The options of `timelit sweep` that only the Slurm launcher reads (its --help says what each does)."""

    concurrency: int | None = None
    sbatch: tuple[str, ...] = ()
    signal_seconds: int | None = None
    script: str | None = None
    ignore_queue: bool = False

    def given(self) -> list[str]:
        """The names of the options set to something other than their default."""
        return [field.name for field in fields(self) if getattr(self, field.name) != field.default]


def submit(
    spec: Grid, sweep_dir: Path, total: int, chosen: list[Point], text: str, options: SlurmOptions, dry_run: bool
) -> None:
    """Print the status of the `chosen` points (of `total`), then submit the unfinished ones that are not queued
    (`timelit sweep --launcher slurm`). `text` is the manifest they read; `options.sbatch` was checked by the
    command before the grid was expanded."""
    manifest = sweep_dir / MANIFEST_FILE
    name = job_name(sweep_dir)
    try:
        queued: dict[int, str] | None = queued_indices(name)
    except QueueError as error:
        if not (dry_run or options.ignore_queue):
            raise QueueError(
                f"{error}. Without squeue, timelit cannot tell which points of {spec.name} are queued or running, "
                "and would submit those again: nothing submitted. Run it where squeue works, or pass "
                "--ignore_queue true to submit every unfinished point anyway."
            ) from None
        log.warning("%s: points queued or running are not recognised%s", error, "" if dry_run else " (--ignore_queue)")
        queued = None
    rows, todo = [], []
    for point in chosen:
        if is_complete(point.run_dir):
            status = "complete"
        elif queued is not None and point.index in queued:
            status = f"queued or running ({queued[point.index]})"
        else:
            status = "submit" if queued is not None else "submit (queue unknown)"
            todo.append(point)
        rows.append((point.index, point.name, status))

    width = max((len(n) for _, n, _ in rows), default=4)
    print(f"sweep {spec.name}: {total} points in {sweep_dir}")
    for index, point_name, status in rows:
        print(f"  {index:>4}  {point_name:<{width}}  {status}")
    if not todo:
        print("nothing to submit")
        return

    lead = options.signal_seconds
    if lead is None:
        lead = spec.signal_seconds or DEFAULT_SIGNAL_SECONDS
    script = str(Path(options.script).expanduser().resolve() if options.script else array_script())
    commands = sbatch_commands(spec, todo, sweep_dir, name, options.concurrency, lead, list(options.sbatch), script)
    if dry_run:
        print(f"\nwould write {manifest} and run:")
        for command, _ in commands:
            print("  " + shlex.join(command))
        print("\neach array task runs:")
        for point in todo:
            print(f"  [{point.index}] timelit " + shlex.join(point.argv))
        return

    if shutil.which("sbatch") is None:
        raise FileNotFoundError("sbatch not found: run `timelit sweep` where Slurm's client is installed, or --dry_run")
    write_sweep_files(sweep_dir, text, spec.path)
    for command, group in commands:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}\n  {shlex.join(command)}")
        job = result.stdout.strip().split(";")[0]
        shape = f" ({' '.join(spec.sbatch_for(group[0].name))})" if len(commands) > 1 else ""
        print(f"submitted array job {job}: {len(group)} point(s){shape}, logs in {sweep_dir / 'logs'}")


def sbatch_commands(
    spec: Grid,
    todo: list[Point],
    sweep_dir: Path,
    job: str,
    concurrency: int | None,
    signal_seconds: int,
    options: list[str],
    script: str,
) -> list[tuple[list[str], list[Point]]]:
    """The sbatch command lines that submit `todo`, each with its points: one array job per resource shape (the
    grid's `sbatch:` and `resources:` for the point, then `options`), in order of first appearance."""
    groups: dict[tuple[str, ...], list[Point]] = {}
    for point in todo:
        groups.setdefault(tuple(spec.sbatch_for(point.name)), []).append(point)
    return [
        (
            [
                "sbatch",
                *merge_sbatch_options(
                    [
                        "--parsable",
                        f"--array={array_spec([p.index for p in group], concurrency)}",
                        f"--job-name={job}",
                        f"--output={sweep_dir / 'logs' / '%a.log'}",
                        "--open-mode=append",
                        "--requeue",
                        f"--signal=USR1@{signal_seconds}",
                        *shape,
                        *options,
                    ]
                ),
                script,
                str(sweep_dir / MANIFEST_FILE),
            ],
            group,
        )
        for shape, group in groups.items()
    ]
