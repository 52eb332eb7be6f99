"""`timelit sweep`: expand a grid of configs into runs and submit them as Slurm array jobs (one per resource shape),
or run them on this machine.

    timelit sweep --grid model_size --dry_run true                       what would be submitted, nothing written
    timelit sweep --grid model_size --concurrency 8 --sbatch '[--partition=gpu, --time=48:00:00]'
    timelit sweep --grid model_size ...                             again: finished points are skipped
    timelit sweep --grid quickstart --launcher local --parallel 2   no Slurm: fits as subprocesses, 2 at once
    timelit report runs/model_size

A grid (YAML; the shipped ones are in `configs/sweeps/`, the format in docs/ARCHITECTURE.md, "A sweep grid") names
base configs and axes; every combination of one value per axis is a point, a `timelit fit` run in
`<root>/<sweep>/<point>` with the base configs, then each axis value's fragments and overrides in axis order.
`<root>/<sweep>/manifest.jsonl` holds one line per point; array task i runs line i (`slurm/array.sbatch`), logging to
`<root>/<sweep>/logs/<i>.log`. A point is finished when its results.json says `"complete": true`; finished points, and
points whose array task `squeue` shows in an active state, are not submitted again, and nothing is submitted when
`squeue` fails (`--ignore_queue true` overrides). A manifest that differs from the grid's expansion is never
overwritten silently, since requeued tasks read it again. `--launcher local` (timelit/launch_local.py) runs the same
points here and refuses the sbatch-only options.
"""

from __future__ import annotations

import getpass
import hashlib
import itertools
import json
import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from timelit.atomic import write_text
from timelit.errors import UserError, did_you_mean
from timelit.resources import PACKAGE_DIR, configs_dir, resolve_config
from timelit.sweep_points import Point, is_complete

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.jsonl"
GRID_KEYS = ("name", "description", "configs", "overrides", "axes", "exclude", "sbatch", "resources", "signal_seconds")
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
# sbatch options timelit sets itself, with their short forms and why a user's would break the sweep.
_RESERVED_SBATCH = {
    "--job-name": ("-J", "timelit names the job timelit-<sweep>-<hash>: squeue finds the sweep's queued tasks by it"),
    "--array": ("-a", "timelit sets it to the unfinished points; choose points with --only"),
}
_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


class GridError(UserError, ValueError):
    """A sweep grid that cannot be expanded; the message names the file and the key."""


class QueueError(RuntimeError):
    """squeue is missing or failed, so nobody knows which points are queued or running."""


class LauncherOptionError(UserError, ValueError):
    """An option of one launcher given to the other (`--concurrency` to the local one, `--parallel` to Slurm)."""


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: its name in point names, and what it adds to the command line."""

    name: str
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    items: tuple[tuple[str, str], ...] = ()  # ("config" | "override", text) in the grid's order


@dataclass
class Grid:
    name: str
    path: Path
    configs: list[str]
    overrides: list[str]
    axes: dict[str, list[AxisValue]]
    exclude: list[dict[str, str]] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)
    resources: dict[str, list[str]] = field(default_factory=dict)
    signal_seconds: int | None = None

    def sbatch_for(self, point: str) -> list[str]:
        """The grid's sbatch options for one point: `sbatch:`, then the first `resources:` entry matching its name."""
        import fnmatch

        extra = next((opts for pattern, opts in self.resources.items() if fnmatch.fnmatchcase(point, pattern)), [])
        return merge_sbatch_options([*self.sbatch, *extra])


def merge_sbatch_options(options: list[str]) -> list[str]:
    """One `--name=value` per name, the last value winning (as sbatch itself would take it), in first-seen order,
    so that `sbatch:`, `resources:` and `--sbatch` compose into a command a reader can check."""
    merged: dict[str, str] = {}
    for option in options:
        key = option.split("=", 1)[0] if option.startswith("--") and "=" in option else option
        merged[key] = option
    return list(merged.values())


# ---------------------------------------------------------------------------------------------------- reading grids


def find_grid(grid: str) -> Path:
    """A grid given as a path, or as the name of a shipped one (`model_size` -> configs/sweeps/model_size.yaml)."""
    path = Path(grid).expanduser()
    if path.is_file():
        return path
    sweeps = configs_dir() / "sweeps"
    for candidate in (sweeps / grid, sweeps / f"{grid}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.stem for p in sweeps.glob("*.yaml")) if sweeps.is_dir() else []
    raise FileNotFoundError(
        f"sweep grid '{grid}' is neither a file nor a shipped grid{did_you_mean(grid, available, n=1)}; shipped: "
        f"{', '.join(available)}"
    )


def _override(text: str, where: str) -> str:
    """`--a.b=c` as is; `--a.b c` (one YAML string) -> `--a.b=c`."""
    if not text.startswith("--") or len(text) < 3:
        raise GridError(f"{where}: '{text}' is not an override (`--key=value`)")
    if "=" not in text.split(" ", 1)[0] and " " in text:
        key, value = text.split(" ", 1)
        return f"{key}={value.strip()}"
    return text


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _items(raw: Any, where: str) -> list[tuple[str, str]]:
    """A value's contents: config files (strings), overrides (`--...` strings) or `{dotted.key: value}` maps."""
    raw = raw if isinstance(raw, list) else [raw]
    items: list[tuple[str, str]] = []
    for entry in raw:
        if isinstance(entry, str) and entry.startswith("--"):
            items.append(("override", _override(entry, where)))
        elif isinstance(entry, str):
            items.append(("config", entry))
        elif isinstance(entry, dict):
            items += [("override", f"--{key}={_scalar(value)}") for key, value in entry.items()]
        else:
            raise GridError(f"{where}: {entry!r} is neither a config file, an override nor a {{key: value}} map")
    return items


def _value_name(name: Any, where: str) -> str:
    text = _scalar(name)
    if not _NAME.match(text):
        raise GridError(f"{where}: value name '{text}' must use only letters, digits and . _ + - (it names folders)")
    return text


def _axis(axis: str, raw: Any, where: str) -> list[AxisValue]:
    where = f"{where}: axes.{axis}"
    if isinstance(raw, dict) and set(raw) == {"key", "values"}:
        values = raw["values"] if isinstance(raw["values"], list) else [raw["values"]]
        return [AxisValue(_value_name(v, where), items=(("override", f"--{raw['key']}={_scalar(v)}"),)) for v in values]
    if isinstance(raw, list):
        if not all(isinstance(entry, str) and not entry.startswith("--") for entry in raw):
            raise GridError(f"{where}: a list axis holds config files only; use `name: [items]` for overrides")
        return [AxisValue(_value_name(Path(entry).stem, where), items=(("config", entry),)) for entry in raw]
    if isinstance(raw, dict) and raw:
        return [AxisValue(_value_name(name, where), items=tuple(_items(v, where))) for name, v in raw.items()]
    raise GridError(
        f"{where} must be a map of value name -> configs/overrides, a list of config files, or {{key, values}}"
    )


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (see the module docstring for the format)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a sweep grid is a YAML map with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise GridError(f"{path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(GRID_KEYS)}")
    name = _value_name(raw.get("name") or path.stem, f"{path}: name")
    axes_raw = raw.get("axes") or {}
    if not isinstance(axes_raw, dict) or not axes_raw:
        raise GridError(f"{path}: `axes` must map at least one axis name to its values")
    axes = {_value_name(axis, f"{path}: axes"): _axis(axis, values, str(path)) for axis, values in axes_raw.items()}
    for axis, values in axes.items():
        names = [v.name for v in values]
        if len(set(names)) != len(names):
            raise GridError(f"{path}: axes.{axis} has repeated value names: {names}")
    exclude = []
    for rule in raw.get("exclude") or []:
        if not isinstance(rule, dict) or not set(rule) <= set(axes):
            raise GridError(f"{path}: exclude rule {rule!r} must map axis names ({', '.join(axes)}) to value names")
        exclude.append({axis: _scalar(value) for axis, value in rule.items()})
    configs = raw.get("configs") or []
    overrides = [_override(o, f"{path}: overrides") for o in raw.get("overrides") or []]
    sbatch = check_sbatch_options([str(option) for option in raw.get("sbatch") or []], f"{path}: sbatch")
    resources_raw = raw.get("resources") or {}
    if not isinstance(resources_raw, dict) or not all(isinstance(v, list) for v in resources_raw.values()):
        raise GridError(f"{path}: `resources` must map point-name patterns (`model=ViT-H-14,*`) to sbatch option lists")
    resources = {
        str(pattern): check_sbatch_options([str(o) for o in options], f"{path}: resources.{pattern}")
        for pattern, options in resources_raw.items()
    }
    signal_seconds = raw.get("signal_seconds")
    if signal_seconds is not None and (isinstance(signal_seconds, bool) or not isinstance(signal_seconds, int)):
        raise GridError(f"{path}: signal_seconds must be a whole number of seconds, got {signal_seconds!r}")
    return Grid(name, path, list(configs), overrides, axes, exclude, sbatch, resources, signal_seconds)


def check_sbatch_options(options: list[str], where: str) -> list[str]:
    """Refuse `--job-name`/`-J` and `--array`/`-a`: timelit sets both, and its queue check relies on them (with a job
    name of the user's, the sweep's running tasks would be invisible to it and submitted a second time)."""
    for option in options:
        name = option.split("=", 1)[0].split(" ", 1)[0]
        for long, (short, why) in _RESERVED_SBATCH.items():
            # sbatch takes unambiguous abbreviations of long options (`--job-na=x`) and `-Jx` for `-J x`.
            if (len(name) > len("--jo") and long.startswith(name)) or name.startswith(short):
                raise GridError(f"{where}: '{option}' sets {long}, which timelit sweep sets itself ({why})")
    return options


# ---------------------------------------------------------------------------------------------------- expanding


def _is_grid(path: Path) -> bool:
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(content, dict) and "axes" in content


def _resolve_config(name: str, grid: Path) -> str:
    """A config item as an absolute path: a file (as given, or beside the grid, never a grid itself), else a
    shipped config, so the shipped grids' `quickstart.yaml` and `budget/tasks_20.yaml` are configs/'s (configs/sweeps/
    holds a grid named quickstart.yaml too, which a fit cannot read)."""
    for candidate in (Path(name).expanduser(), grid.parent / name):
        if candidate.is_file() and candidate.resolve() != grid.resolve() and not _is_grid(candidate):
            return str(candidate.resolve())
    try:
        return str(resolve_config(name).resolve())
    except FileNotFoundError as error:
        raise GridError(f"{grid}: {error}") from None


def run_dir_overrides(sweep_dir: Path, point: str) -> list[str]:
    """Where a point's run lives: <sweep dir>/<point>, the same directory at every (re)start."""
    return [
        f"--trainer.logger.init_args.save_dir={sweep_dir}",
        f"--trainer.logger.init_args.name={point}",
        "--trainer.logger.init_args.version=",
        f"--trainer.default_root_dir={sweep_dir / point}",
    ]


def expand(grid: Grid, root: str | Path = "runs", overrides: list[str] | None = None) -> list[Point]:
    """Every point of the grid, in axis order (the last axis varies fastest), minus the excluded combinations.

    `overrides` come after everything the grid says, so a user's command line wins; the run directory comes last.
    """
    sweep_dir = Path(root).expanduser().resolve() / grid.name
    extra = [_override(o, "--overrides") for o in overrides or []]
    base_configs = [_resolve_config(c, grid.path) for c in grid.configs]
    points: list[Point] = []
    for combination in itertools.product(*grid.axes.values()):
        chosen = dict(zip(grid.axes, (value.name for value in combination)))
        if any(all(chosen.get(axis) == value for axis, value in rule.items()) for rule in grid.exclude):
            continue
        name = ",".join(f"{axis}={value}" for axis, value in chosen.items())
        argv = ["fit"] + [arg for c in base_configs for arg in ("--config", c)] + grid.overrides
        configs, point_overrides = list(base_configs), list(grid.overrides)
        for value in combination:
            for kind, text in value.items:
                if kind == "config":
                    resolved = _resolve_config(text, grid.path)
                    configs.append(resolved)
                    argv += ["--config", resolved]
                else:
                    point_overrides.append(text)
                    argv.append(text)
        point_overrides += extra
        argv += extra + run_dir_overrides(sweep_dir, name)
        points.append(Point(len(points), name, chosen, configs, point_overrides, str(sweep_dir / name), argv))
    if not points:
        raise GridError(f"{grid.path}: every combination is excluded; nothing to run")
    return points


def manifest_text(points: list[Point]) -> str:
    return "".join(json.dumps(point.record(), sort_keys=True) + "\n" for point in points)


# ---------------------------------------------------------------------------------------------------- state


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


# ---------------------------------------------------------------------------------------------------- the command


def sweep_command(
    grid: str,
    root: str = "runs",
    overrides: list[str] | None = None,
    only: list[str] | None = None,
    concurrency: int | None = None,
    sbatch: list[str] | None = None,
    signal_seconds: int | None = None,
    script: str | None = None,
    dry_run: bool = False,
    rewrite_manifest: bool = False,
    ignore_queue: bool = False,
    launcher: Literal["slurm", "local"] = "slurm",
    parallel: int | None = None,
) -> None:
    """Expand a sweep grid into runs and submit the unfinished ones as Slurm array jobs, or run them here.

    Writes <root>/<sweep>/manifest.jsonl (one point per line) and submits
    `sbatch --array=<unfinished points>%<concurrency> slurm/array.sbatch <manifest>`. Running it again submits only
    the points without a complete results.json that are not queued or running already. With `--launcher local`
    the same points run on this machine as `timelit fit` subprocesses (timelit/launch_local.py).

    Args:
        grid: a grid file, or the name of a shipped one (configs/sweeps/): model_size, compute, horizon (the
            paper's studies, Slurm), quickstart, science, scaling (docs/science.md, local launcher).
        root: folder of sweeps; point runs go to <root>/<sweep name>/<point name>.
        overrides: extra `--key=value` overrides for every point (after the grid's own), e.g. a data root.
        only: submit only the points whose name matches one of these shell patterns (`model=ViT-L-14,*`); several
            as a quoted list: `--only '["variant=a,*", "variant=b,*"]'`.
        concurrency: at most this many array tasks of each array job run at once (`--array=...%N`); default no limit.
        sbatch: extra sbatch options, e.g. `[--partition=gpu, --account=abc, --time=24:00:00]`; after the grid's
            `sbatch:` and `resources:`, so they win. Not `--job-name`/`-J` nor `--array`: timelit sets those.
        signal_seconds: Slurm sends SIGUSR1 this long before the time limit (`--signal=USR1@N`); the run saves and
            requeues itself. Longer than one evaluation plus one checkpoint save. Default: the grid's
            `signal_seconds`, else 300.
        script: the sbatch script run by each array task; default timelit's slurm/array.sbatch.
        dry_run: print the points and the sbatch commands; write and submit nothing.
        rewrite_manifest: replace a manifest.jsonl that differs from the grid's expansion (only when no task of the
            old one can still start: requeued tasks read it again).
        ignore_queue: submit even when squeue fails, as if nothing of this sweep were queued; points that are in
            fact running are submitted again, and their second job exits at once (array.sbatch's run lock).
        launcher: `slurm` submits array jobs; `local` runs the points here without Slurm, at most `parallel` at
            once, each logging to <root>/<sweep>/logs/<index>.log. Again later: finished points are skipped and
            stopped or killed ones resume from their last.ckpt. Ctrl-C/SIGTERM stops the running fits (they save
            last.ckpt first); a second one kills them. The options above that only sbatch reads (concurrency,
            sbatch, signal_seconds, script, ignore_queue) are refused with it.
        parallel: the local launcher's number of fits at once (default 1). Each fit gets
            OMP_NUM_THREADS=max(1, cores // parallel), so torch's threads share the cores, unless it is set already.
    """
    import fnmatch

    check_launcher_options(
        launcher,
        parallel=parallel,
        concurrency=concurrency,
        sbatch=sbatch,
        signal_seconds=signal_seconds,
        script=script,
        ignore_queue=ignore_queue,
    )
    grid_path = find_grid(grid)
    spec = load_grid(grid_path)
    user_sbatch = check_sbatch_options(list(sbatch or []), "--sbatch")
    points = expand(spec, root, overrides)
    sweep_dir = Path(root).expanduser().resolve() / spec.name
    manifest = sweep_dir / MANIFEST_FILE
    text = manifest_text(points)
    if manifest.is_file() and manifest.read_text() != text and not rewrite_manifest:
        raise GridError(
            f"{manifest} differs from what {grid_path} expands to now (grid, root or overrides changed). Array tasks "
            "read it again whenever they are requeued, so it is not replaced: use another sweep name or root, or "
            "--rewrite_manifest true once none of its tasks is queued or running."
        )
    if launcher == "local":
        chosen = [p for p in points if not only or any(fnmatch.fnmatchcase(p.name, pattern) for pattern in only)]
        run_locally(spec.name, sweep_dir, len(points), chosen, parallel or 1, dry_run, grid_path, text)
        return
    name = job_name(sweep_dir)
    try:
        queued: dict[int, str] | None = queued_indices(name)
    except QueueError as error:
        if not (dry_run or ignore_queue):
            raise QueueError(
                f"{error}. Without squeue, timelit cannot tell which points of {spec.name} are queued or running, "
                "and would submit those again: nothing submitted. Run it where squeue works, or pass "
                "--ignore_queue true to submit every unfinished point anyway."
            ) from None
        log.warning("%s: points queued or running are not recognised%s", error, "" if dry_run else " (--ignore_queue)")
        queued = None
    rows, todo = [], []
    for point in points:
        if only and not any(fnmatch.fnmatchcase(point.name, pattern) for pattern in only):
            continue
        if is_complete(point.run_dir):
            status = "complete"
        elif queued is not None and point.index in queued:
            status = f"queued or running ({queued[point.index]})"
        else:
            status = "submit" if queued is not None else "submit (queue unknown)"
            todo.append(point)
        rows.append((point.index, point.name, status))

    width = max((len(n) for _, n, _ in rows), default=4)
    print(f"sweep {spec.name}: {len(points)} points in {sweep_dir}")
    for index, point_name, status in rows:
        print(f"  {index:>4}  {point_name:<{width}}  {status}")
    if not todo:
        print("nothing to submit")
        return

    lead = signal_seconds if signal_seconds is not None else spec.signal_seconds or DEFAULT_SIGNAL_SECONDS
    script_path = str(Path(script).expanduser().resolve() if script else array_script())
    groups: dict[tuple[str, ...], list[Point]] = {}
    for point in todo:  # one array job per resource shape, in order of first appearance
        groups.setdefault(tuple(spec.sbatch_for(point.name)), []).append(point)
    commands = [
        (
            [
                "sbatch",
                *merge_sbatch_options(
                    [
                        "--parsable",
                        f"--array={array_spec([p.index for p in group], concurrency)}",
                        f"--job-name={name}",
                        f"--output={sweep_dir / 'logs' / '%a.log'}",
                        "--open-mode=append",
                        "--requeue",
                        f"--signal=USR1@{lead}",
                        *options,
                        *user_sbatch,
                    ]
                ),
                script_path,
                str(manifest),
            ],
            group,
        )
        for options, group in groups.items()
    ]
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
    write_sweep_files(sweep_dir, text, grid_path)
    for command, group in commands:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed ({result.returncode}): {result.stderr.strip()}\n  {shlex.join(command)}")
        job = result.stdout.strip().split(";")[0]
        shape = f" ({' '.join(spec.sbatch_for(group[0].name))})" if len(commands) > 1 else ""
        print(f"submitted array job {job}: {len(group)} point(s){shape}, logs in {sweep_dir / 'logs'}")


def write_sweep_files(sweep_dir: Path, text: str, grid_path: Path) -> None:
    """What every launcher leaves in the sweep folder before the first run starts: manifest, grid.yaml, logs/."""
    (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
    write_text(sweep_dir / MANIFEST_FILE, text)
    shutil.copyfile(grid_path, sweep_dir / "grid.yaml")


# Options only sbatch reads, and what to use instead under the local launcher.
_SLURM_ONLY = {
    "concurrency": "use --parallel N for the number of fits at once",
    "sbatch": "the local launcher runs `timelit fit` directly",
    "signal_seconds": "there is no time limit to warn of; Ctrl-C/SIGTERM to the launcher stops the fits cleanly",
    "script": "the local launcher runs `timelit fit` directly (set TIMELIT to use another executable)",
    "ignore_queue": "the local launcher asks no queue; run folders held by another launcher are skipped",
}


def check_launcher_options(launcher: str, parallel: int | None, **slurm_options: Any) -> None:
    """Refuse the options the chosen launcher would silently ignore: a user who asks for `--concurrency 4` locally
    expects 4 fits at once, and would get one."""
    if launcher not in ("slurm", "local"):
        raise LauncherOptionError(f"--launcher must be slurm or local, got {launcher!r}")
    if launcher == "slurm":
        if parallel is not None:
            raise LauncherOptionError(
                "--parallel is the local launcher's (--launcher local); under Slurm, --concurrency N limits how "
                "many array tasks run at once"
            )
        return
    given = [name for name, value in slurm_options.items() if value not in (None, False)]
    if given:
        raise LauncherOptionError(
            "--launcher local does not take "
            + "; ".join(f"--{name} ({_SLURM_ONLY[name]})" for name in given)
            + ". The grid's own sbatch:, resources: and signal_seconds: are ignored under it."
        )
    if parallel is not None and parallel < 1:
        raise LauncherOptionError(f"--parallel must be at least 1, got {parallel}")


def run_locally(
    sweep: str,
    sweep_dir: Path,
    total: int,
    chosen: list[Point],
    parallel: int,
    dry_run: bool,
    grid_path: Path,
    text: str,
) -> None:
    """The local launcher's share of `sweep_command`: statuses, then the fits (timelit/launch_local.py)."""
    from timelit import launch_local

    rows = [(point, launch_local.status(point)) for point in chosen]
    todo = [point for point, state in rows if state in ("run", "resume")]
    width = max((len(point.name) for point, _ in rows), default=4)
    print(f"sweep {sweep}: {total} points in {sweep_dir}, local launcher, --parallel {parallel}")
    for point, state in rows:
        print(f"  {point.index:>4}  {point.name:<{width}}  {state}")
    if not todo:
        print("nothing to run")
        return
    if dry_run:
        print(f"\nwould write {sweep_dir / MANIFEST_FILE} and run, {parallel} at a time:")
        command = shlex.join(launch_local.timelit_executable())
        for point in todo:
            print(f"  [{point.index}] {command} {shlex.join(point.argv)}")
        return
    code = launch_local.launch(todo, sweep_dir, parallel, prepare=lambda: write_sweep_files(sweep_dir, text, grid_path))
    if code:
        raise SystemExit(code)
