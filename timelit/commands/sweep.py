"""`timelit sweep`: expand a grid of configs into runs and submit them as Slurm array jobs (one per resource shape),
or run them on this machine.

    timelit sweep --grid model_size --dry_run true                       what would be submitted, nothing written
    timelit sweep --grid model_size --concurrency 8 --sbatch '[--partition=gpu, --time=48:00:00]'
    timelit sweep --grid model_size ...                             again: finished points are skipped
    timelit sweep --grid quickstart --launcher local --parallel 2   no Slurm: fits as subprocesses, 2 at once
    timelit report runs/model_size

The grid is read by timelit/study/grid.py and expanded into points by study/plan.py; study/slurm.py and
study/local.py launch them. A manifest that differs from the grid's expansion is never overwritten silently, since
requeued tasks read it again (study/manifest.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import replace
from pathlib import Path
from typing import Literal

from timelit.study import local, slurm
from timelit.study.grid import check_sbatch_options, find_grid, load_grid
from timelit.study.manifest import check_manifest, manifest_text
from timelit.study.plan import expand
from timelit.utilities.errors import UserError


class LauncherOptionError(UserError, ValueError):
    """An option of one launcher given to the other (`--concurrency` to the local one, `--parallel` to Slurm)."""


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
    the same points run on this machine as `timelit fit` subprocesses (timelit/study/local.py).

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

    requested = slurm.SlurmOptions(concurrency, tuple(sbatch or ()), signal_seconds, script, ignore_queue)
    check_launcher_options(launcher, parallel, requested)
    grid_path = find_grid(grid)
    spec = load_grid(grid_path)
    options = replace(requested, sbatch=tuple(check_sbatch_options(list(requested.sbatch), "--sbatch")))
    points = expand(spec, root, overrides)
    sweep_dir = Path(root).expanduser().resolve() / spec.name
    text = manifest_text(points)
    check_manifest(sweep_dir, text, grid_path, rewrite_manifest)
    chosen = [p for p in points if not only or any(fnmatch.fnmatchcase(p.name, pattern) for pattern in only)]
    if launcher == "local":
        local.run(spec, sweep_dir, len(points), chosen, text, parallel or 1, dry_run)
    else:
        slurm.submit(spec, sweep_dir, len(points), chosen, text, options, dry_run)


# Options only sbatch reads, and what to use instead under the local launcher.
_SLURM_ONLY = {
    "concurrency": "use --parallel N for the number of fits at once",
    "sbatch": "the local launcher runs `timelit fit` directly",
    "signal_seconds": "there is no time limit to warn of; Ctrl-C/SIGTERM to the launcher stops the fits cleanly",
    "script": "the local launcher runs `timelit fit` directly (set TIMELIT to use another executable)",
    "ignore_queue": "the local launcher asks no queue; run folders held by another launcher are skipped",
}


def check_launcher_options(launcher: str, parallel: int | None, slurm_options: slurm.SlurmOptions) -> None:
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
    given = slurm_options.given()
    if given:
        raise LauncherOptionError(
            "--launcher local does not take "
            + "; ".join(f"--{name} ({_SLURM_ONLY[name]})" for name in given)
            + ". The grid's own sbatch:, resources: and signal_seconds: are ignored under it."
        )
    if parallel is not None and parallel < 1:
        raise LauncherOptionError(f"--parallel must be at least 1, got {parallel}")
