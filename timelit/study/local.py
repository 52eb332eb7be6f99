"""The local launcher of `timelit sweep`: a sweep's points as `timelit fit` subprocesses on this machine, no Slurm.

    timelit sweep --grid quickstart --launcher local --parallel 2      at most 2 fits at once
    timelit sweep --grid quickstart --launcher local --parallel 2      again: finished points are skipped, the
                                                                       stopped or killed ones resume from last.ckpt
    timelit report runs/quickstart_sweep

Point i runs `timelit <argv of manifest line i>`, the command slurm/array.sbatch runs under srun, its output appended
to `<sweep>/logs/<i>.log`, so run folders, manifest and logs are the same whichever launcher ran a point. Rerunning
is the whole resume mechanism (a complete point is skipped, one with a last.ckpt resumes). Ctrl-C or SIGTERM sends
SIGTERM to every fit's process group (each saves and exits 143) and waits; a second one kills them. The fits run in
their own sessions, so a terminal's Ctrl-C reaches the launcher only. Before starting a point the launcher takes
`<run dir>/local-run.lock` (flock, inherited by the fit, so it is held while either lives and dropped by the kernel
when both died); do not run one sweep under both launchers at once, as Slurm's lock is another file. Each fit gets
`OMP_NUM_THREADS = max(1, cores // N)` and `PYTHONUNBUFFERED=1` unless the environment sets them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from timelit.study.grid import Grid
from timelit.study.manifest import MANIFEST_FILE, Point, is_complete, write_sweep_files
from timelit.utilities.folder_lock import FolderLock
from timelit.utilities.folder_lock import lock_holder as folder_lock_holder

LOCK_FILE = "local-run.lock"
_KINDS = ("done", "failed", "stopped", "skipped")
POLL_SECONDS = 0.1


# ---------------------------------------------------------------------------------------------------- run lock


class RunLock(FolderLock):
    """The flock on `<run dir>/local-run.lock`, held by this process (and the fit it starts) until `release`."""

    @classmethod
    def take(cls, run_dir: str | Path) -> RunLock | str:  # type: ignore[override]
        """The lock, or the text of its holder when another live process holds it."""
        path = Path(run_dir) / LOCK_FILE
        lock = super().take(path, _holder())
        if isinstance(lock, RunLock) and lock.previous:
            print(f"  taking over {path}, left by {lock.previous} (no longer running)", flush=True)
        return lock  # type: ignore[return-value]

    def write(self, fit_pid: int | None = None) -> None:
        self.write_text(_holder(fit_pid))


def _holder(fit_pid: int | None = None) -> str:
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    fit = f", fit pid {fit_pid}" if fit_pid else ""
    return f"host {socket.gethostname()}, launcher pid {os.getpid()}{fit}, since {since}"


def lock_holder(run_dir: str | Path) -> str | None:
    """Who holds a run folder's lock now, or None; takes nothing and creates nothing."""
    return folder_lock_holder(Path(run_dir) / LOCK_FILE)


# ---------------------------------------------------------------------------------------------------- one point


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `timelit fit` resumes from (StreamCheckpoint's `<run dir>/checkpoints/last.ckpt`)."""
    path = Path(run_dir) / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


def timelit_executable() -> list[str]:
    """`$TIMELIT` (as slurm/array.sbatch reads it), else the `timelit` installed beside this Python, else PATH's."""
    if os.environ.get("TIMELIT"):
        return shlex.split(os.environ["TIMELIT"])
    beside = Path(sys.executable).parent / "timelit"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("timelit")
    if found is None:
        raise FileNotFoundError("no `timelit` executable beside Python nor on PATH; set TIMELIT to its path")
    return [found]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def fit_environment(parallel: int) -> tuple[dict[str, str], dict[str, str]]:
    """The fits' environment, and the variables the launcher set in it (shown in each log)."""
    env = dict(os.environ)
    added = {}
    if "OMP_NUM_THREADS" not in env:
        added["OMP_NUM_THREADS"] = str(max(1, cores() // parallel))
    if "PYTHONUNBUFFERED" not in env:
        added["PYTHONUNBUFFERED"] = "1"
    env.update(added)
    return env, added


def _now() -> str:
    return datetime.datetime.now().strftime("%H:%M:%S")


def _say(word: str, point: Point, text: str) -> None:
    """One line per event of a point, aligned with the status table above it."""
    print(f"[{_now()}] {word:<7} {point.index:>4}  {point.name}{text}", flush=True)


@dataclass
class Running:
    point: Point
    process: subprocess.Popen
    lock: RunLock
    log: Path
    started: float = field(default_factory=time.monotonic)


@dataclass
class Outcome:
    point: Point
    kind: str  # done, failed, stopped, or skipped (held elsewhere, or found complete when its turn came)
    code: int | None = None
    note: str = ""


def start(point: Point, command: list[str], env: dict[str, str], added: dict[str, str], logs: Path) -> Running | str:
    """Start one point's fit, or say why not (finished meanwhile, or held by another launcher)."""
    if is_complete(point.run_dir):
        return "complete (finished meanwhile)"
    lock = RunLock.take(point.run_dir)
    if isinstance(lock, str):
        return f"running elsewhere ({lock})"
    if is_complete(point.run_dir):  # finished between the check and the lock: its holder released it at the end
        lock.release()
        return "complete (finished meanwhile)"
    resume = last_checkpoint(point.run_dir)
    log = logs / f"{point.index}.log"
    argv = [*command, *point.argv]
    with open(log, "a") as out:
        stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        out.write(
            f"=== {stamp} local launcher on {socket.gethostname()} (pid {os.getpid()}), "
            f"{'resuming from ' + str(resume) if resume else 'starting'}\n"
            f"=== point {point.index}: {point.name} -> {point.run_dir}\n"
            f"=== {shlex.join([*(f'{k}={v}' for k, v in added.items()), *argv])}\n"
        )
        out.flush()
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal reaches the launcher, which sends SIGTERM
                pass_fds=(lock.fd,),  # the fit holds the run lock too, should the launcher die before it
            )
        except OSError:
            lock.release()
            raise
    lock.write(process.pid)
    how = f"resume from {resume.name}" if resume else "start"
    _say("start", point, f" ({how}; log {log})")
    return Running(point, process, lock, log)


def finish(run: Running, code: int) -> Outcome:
    seconds = time.monotonic() - run.started
    run.lock.release()
    with open(run.log, "a") as out:
        out.write(f"=== exit {code} after {seconds:.1f} s\n")
    if is_complete(run.point.run_dir):  # finished; a non-zero code came after results.json (a late signal)
        word, note = "done", ""
    elif code == 0:
        word, note = "failed", "exit 0, but results.json is not complete"
    elif code in (128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGKILL):
        word, note = "stopped", "resumes when the sweep runs again"
    else:
        word, note = "failed", ""
    _say(word, run.point, f": exit {code} after {seconds:.1f} s" + (f" ({note})" if note else ""))
    return Outcome(run.point, word, code, note)


# ---------------------------------------------------------------------------------------------------- the sweep


def status(point: Point) -> str:
    """What the launcher will do with a point: complete, run, resume, or leave it to whoever runs it already."""
    if is_complete(point.run_dir):
        return "complete"
    holder = lock_holder(point.run_dir)
    if holder:
        return f"running elsewhere ({holder})"
    return "resume" if last_checkpoint(point.run_dir) else "run"


def launch(todo: list[Point], sweep_dir: Path, parallel: int, prepare: Callable[[], None] = lambda: None) -> int:
    """Run `todo`'s fits, at most `parallel` at once; the exit status of the sweep (0 when every one finished).

    `prepare` runs once before the first fit starts (it writes the manifest and grid.yaml, as the Slurm launcher
    does before it submits).
    """
    if parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {parallel}")
    command = timelit_executable()
    env, added = fit_environment(parallel)
    logs = sweep_dir / "logs"
    prepare()
    logs.mkdir(parents=True, exist_ok=True)
    if added:
        settings = " ".join(f"{k}={v}" for k, v in added.items())
        print(f"each fit gets {settings} ({cores()} cores, --parallel {parallel})")

    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    pending, running, outcomes = list(todo), [], []
    forwarded = 0
    try:
        while pending or running:
            while pending and len(running) < parallel and not received:
                point = pending.pop(0)
                started = start(point, command, env, added, logs)
                if isinstance(started, str):
                    _say("skip", point, f": {started}")
                    outcomes.append(Outcome(point, "skipped", note=started))
                else:
                    running.append(started)
            if len(received) > forwarded:
                forwarded = _forward(received, forwarded, running)
            for run in list(running):
                code = run.process.poll()
                if code is not None:
                    running.remove(run)
                    outcomes.append(finish(run, code))
            if received and not running:
                break
            time.sleep(POLL_SECONDS)
    except BaseException:  # the launcher itself failed: stop its fits as a signal would, never leave them behind
        for run in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.process.pid, signal.SIGTERM)
        for run in running:
            run.process.wait()
            run.lock.release()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return summary(outcomes, pending, received, logs)


def _forward(received: list[int], forwarded: int, running: list[Running]) -> int:
    """SIGTERM to every running fit at the first signal, SIGKILL at the next; returns the signals handled."""
    kill = forwarded > 0 or len(received) > 1
    name = signal.Signals(received[-1]).name
    if kill:
        print(f"[{_now()}] {name} again: killing {len(running)} fit(s) (SIGKILL)", flush=True)
    else:
        print(
            f"[{_now()}] {name}: SIGTERM to {len(running)} running fit(s); they save last.ckpt and stop "
            "(again to kill them at once)",
            flush=True,
        )
    for run in running:
        with contextlib.suppress(ProcessLookupError):  # ended meanwhile: reaped at the next poll
            os.killpg(run.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
    return len(received)


def summary(outcomes: list[Outcome], pending: list[Point], received: list[int], logs: Path) -> int:
    finished, failed, stopped, skipped = ([o for o in outcomes if o.kind == kind] for kind in _KINDS)
    parts = [f"{len(finished)} finished", f"{len(failed)} failed", f"{len(stopped)} stopped"]
    parts += [f"{len(skipped)} skipped"] if skipped else []
    parts += [f"{len(pending)} not started"] if pending else []
    print(f"\nlocal sweep: {', '.join(parts)}")
    for outcome in failed:
        reason = outcome.note or f"exit {outcome.code}"
        log = logs / f"{outcome.point.index}.log"
        print(f"  failed  {outcome.point.index:>4}  {outcome.point.name}: {reason}; log {log}")
    for outcome in skipped:
        print(f"  skipped {outcome.point.index:>4}  {outcome.point.name}: {outcome.note}")
    if stopped or pending:
        print("run the same command again to resume the stopped points and start the others")
    if received:
        return 128 + received[0]
    return 1 if failed else 0


def run(spec: Grid, sweep_dir: Path, total: int, chosen: list[Point], text: str, parallel: int, dry_run: bool) -> None:
    """Print the status of the `chosen` points (of `total`), then run the unfinished ones here, `parallel` at once
    (`timelit sweep --launcher local`). `text` is the manifest written before the first fit starts."""
    rows = [(point, status(point)) for point in chosen]
    todo = [point for point, state in rows if state in ("run", "resume")]
    width = max((len(point.name) for point, _ in rows), default=4)
    print(f"sweep {spec.name}: {total} points in {sweep_dir}, local launcher, --parallel {parallel}")
    for point, state in rows:
        print(f"  {point.index:>4}  {point.name:<{width}}  {state}")
    if not todo:
        print("nothing to run")
        return
    if dry_run:
        print(f"\nwould write {sweep_dir / MANIFEST_FILE} and run, {parallel} at a time:")
        command = shlex.join(timelit_executable())
        for point in todo:
            print(f"  [{point.index}] {command} {shlex.join(point.argv)}")
        return
    code = launch(todo, sweep_dir, parallel, prepare=lambda: write_sweep_files(sweep_dir, text, spec.path))
    if code:
        raise SystemExit(code)
