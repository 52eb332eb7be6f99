"""Training-step overhead of `timelit fit` against a plain PyTorch loop on the same model and the same batches.

    python bench/train_overhead.py                    # the quickstart's tiny model at batch 128 (~10 min)
    python bench/train_overhead.py --quick --data-root /tmp/bench --model timelit-micro-ViT --batch-size 16

What runs. `timelit fit --config quickstart.yaml` through `timelit.commands.cli.run_lightning`, so the Trainer has every
callback a user's run has (TimeMerge, ComputeBudget with a GFLOP budget, TaskResults, StreamCheckpoint every 50
steps, Preemption, the progress bar, TensorBoard), and a plain loop (`_fit.PlainLoop`: forward, ClipLoss, backward,
clip at 1.0, AdamW, warm-up + cosine) on a copy of the same initial weights. Both take the same in-memory batches,
decoded once by timelit's pipeline. `_fit.SideBySide` alternates blocks of steps of the two inside one fit, so they
share the machine's load; the figures are medians of per-step times and the median over blocks of the per-block
ratio. Variants:

* in-memory: the training step itself (what Lightning and timelit's hooks add);
* in-memory, before fixes: the same with timelit's behaviour before its overhead fixes monkeypatched back in
  (`_fit.BeforeFixes`: torch.manual_seed per step and per sample, tarfile for every sample, every scalar logged at
  every step), run right after or before the other, so "before" and "now" see the same machine;
* micro model: the fixed per-step overhead in milliseconds, where the model's own work is small;
* micro model, bare Lightning: the same step as the smallest LightningModule (no timelit module, callbacks, logger or
  progress bar), which splits that overhead into Lightning's loop and timelit's own code;
* shards, 0 workers: the full pipeline with the real shard loaders, decoding in the training process;
* shards, N workers: loader workers in the background (alternated whole runs, as workers prefetch across blocks).
Every variant runs now and before the fixes, back to back, in alternating order over repeats.

Prints a table and writes bench/results/train_overhead.json. Evaluation and task boundaries are outside the timed
steps (the first step of each task is reported apart): bench/eval_cost.py and bench/task_boundary.py measure them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import QUICKSTART, benchmark_args, machine, median, quiet_logs, synthetic_data, table, write_report

BEFORE = ", before fixes"


def ensure_data(root: Path, quick: bool) -> Path:
    """The quickstart benchmark at `root` (written if missing: full size, or 5% with a micro base in --quick)."""
    from timelit.data.synth.benchmark import is_ready, synthesize

    root = root.expanduser()
    if not is_ready(root):
        print(f"writing the quickstart benchmark into {root} ...", flush=True)
        if quick:
            synthesize(root, scale=0.05, base_model="timelit-micro-ViT", base_steps=5)
        else:
            synthesize(root)
    return root


def one_fit(
    args: argparse.Namespace,
    data_root: Path,
    model: str,
    batch: int,
    in_memory: bool,
    workers: int,
    before: bool,
    steps: int | None = None,
    block: int | None = None,
) -> dict[str, Any]:
    """One `timelit fit` with SideBySide (plain blocks unless `block` is 0); its timing summary and wall time."""
    from _fit import BeforeFixes, SideBySide, fit_args, run_fit

    from timelit.training.flops import measure_step

    steps = steps or args.steps
    block = args.block if block is None else block
    cost = measure_step(model, batch)
    run_dir = Path(tempfile.mkdtemp(prefix="train_overhead_", dir=args.tmp))
    pretrained = data_root / "base_model.safetensors" if model == args.data_model else None
    extra = [
        "--trainer.callbacks+=_fit.SideBySide",
        "--trainer.callbacks.init_args.block",
        str(block),
        "--trainer.enable_progress_bar",
        str(not args.no_progress_bar).lower(),
    ]
    if args.eval_datasets:
        extra += ["--data.init_args.eval_datasets", "[" + ",".join(args.eval_datasets) + "]"]
    fargs = fit_args(
        data_root,
        run_dir,
        model,
        pretrained,
        args.tasks,
        steps,
        batch,
        cost.gflops,
        in_memory,
        workers,
        extra=tuple(extra),
    )
    started = time.perf_counter()
    behaviour = BeforeFixes() if before else contextlib.nullcontext()
    # The progress bar and Lightning's messages go to the log, as they would to a terminal.
    try:
        with open(args.log, "a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log), behaviour:
            cli = run_fit(fargs)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    side = next(c for c in cli.trainer.callbacks if isinstance(c, SideBySide))
    summary = side.summary()
    summary["fit_wall_s"] = time.perf_counter() - started
    summary["load_average"] = os.getloadavg()[0]
    return summary


def one_bare_fit(args: argparse.Namespace, data_root: Path, model: str, batch: int, steps: int) -> dict[str, Any]:
    """The plain step as a bare LightningModule (`_fit.BareLightning`), side by side with the plain loop."""
    from _fit import BareLightning, InMemoryTimeData, PlainRecipe, bare_fit

    from timelit.training.clip import read_state_dict

    started = time.perf_counter()
    data = InMemoryTimeData(
        str(data_root), manifests=str(data_root), stream="random", num_tasks=args.tasks, batch_size=batch,
        pretraining_pool="SYNTH_POOL", steps_per_task=steps, num_workers=0, eval_datasets=args.eval_datasets,
    )  # fmt: skip
    weights = read_state_dict(data_root / "base_model.safetensors") if model == args.data_model else None
    with open(args.log, "a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        module = BareLightning(PlainRecipe(model, steps, lr=3e-4), weights)
        summary = bare_fit(data, module, args.tasks, args.block).summary()
    summary["fit_wall_s"] = time.perf_counter() - started
    summary["load_average"] = os.getloadavg()[0]
    return summary


PROFILED = {
    "LightningModule.log (all calls)": ("lightning/pytorch/core/module.py", "log"),
    "torch.manual_seed (all calls)": ("torch/random.py", "manual_seed"),
    "timelit.training.seeding.seed_step": ("timelit/training/seeding.py", "seed_step"),
    "CLIPFineTuner.on_train_batch_start": ("timelit/training/model.py", "on_train_batch_start"),
    "CLIPFineTuner.training_step (forward + loss + logging)": ("timelit/training/model.py", "training_step"),
    "batch to device (move_data_to_device)": ("lightning/fabric/utilities/apply_func.py", "move_data_to_device"),
    "callbacks: on_train_batch_start": ("lightning/pytorch/trainer/call.py", "_call_callback_hooks"),
    "TimeMerge.on_train_batch_end": ("timelit/training/callbacks/time_merge.py", "on_train_batch_end"),
    "ComputeBudget.on_train_batch_end": ("timelit/training/callbacks/budget.py", "on_train_batch_end"),
    "Preemption.on_train_batch_end": ("timelit/training/callbacks/preemption.py", "on_train_batch_end"),
    "StreamCheckpoint.on_train_batch_end": ("timelit/training/callbacks/checkpoint.py", "on_train_batch_end"),
    "progress bar on_train_batch_end": ("callbacks/progress/tqdm_progress.py", "on_train_batch_end"),
    "optimizer step (AdamW)": ("torch/optim/adamw.py", "step"),
    "backward": ("torch/autograd/__init__.py", "backward"),
    "one training-loop iteration (advance)": ("loops/training_epoch_loop.py", "advance"),
}


def profile_fit(args: argparse.Namespace, data_root: Path, before: bool) -> dict[str, Any]:
    """Seconds per step (cumulative, under cProfile, which inflates Python-heavy code) of the functions a step of
    the micro model's in-memory fit spends its time in, without plain blocks."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    one_fit(args, data_root, args.micro_model, args.micro_batch, True, 0, before, args.micro_steps, block=0)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    steps = args.micro_steps * args.tasks
    out = {}
    for label, (file_end, name) in PROFILED.items():
        found = [v for (f, _, n), v in stats.items() if f.endswith(file_end) and n == name]
        out[label] = {
            "ms_per_step": 1e3 * sum(v[3] for v in found) / steps,
            "calls_per_step": sum(v[1] for v in found) / steps,
        }
    return out


def alternated(args: argparse.Namespace, data_root: Path, workers: int, before: bool) -> dict[str, Any]:
    """A fit with loader workers (timelit's steps only), between two plain runs of as many steps: workers prefetch
    across blocks, so the two sides cannot share one fit."""
    before = standalone_plain(args, data_root, args.model, args.batch_size, args.steps)
    result = one_fit(args, data_root, args.model, args.batch_size, False, workers, before, block=0)
    after = standalone_plain(args, data_root, args.model, args.batch_size, args.steps)
    plain = before[args.warmup :] + after[args.warmup :]
    result.update(plain_median_s=median(plain), plain_steps=len(plain), plain_mean_s=sum(plain) / len(plain))
    result["median_block_ratio"] = result["timelit_median_s"] / median(before[args.warmup :])
    result["ratio_to_plain_after"] = result["timelit_median_s"] / median(after[args.warmup :])
    return result


def standalone_plain(args: argparse.Namespace, data_root: Path, model: str, batch: int, steps: int) -> list[float]:
    """`steps` plain steps outside any Trainer (for the runs whose loader workers forbid interleaving)."""
    from _fit import InMemoryTimeData, PlainLoop, PlainRecipe, time_plain

    from timelit.training.clip import build_clip, read_state_dict

    options = {"num_tasks": args.tasks, "batch_size": batch, "steps_per_task": steps, "num_workers": 0}
    data = synthetic_data(data_root, build_clip(model), InMemoryTimeData, **options)
    weights = read_state_dict(data_root / "base_model.safetensors") if model == args.data_model else None
    loop = PlainLoop(PlainRecipe(model, steps), weights)
    batches = data.cached()
    loop.step(batches[0])
    return time_plain(loop, batches, steps)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    quiet_logs()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    data_root = ensure_data(Path(args.data_root), args.quick)
    args.data_model = _base_model(data_root)
    args.log = Path(args.out) / "train_overhead.log"
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("")
    report: dict[str, Any] = {"machine": machine(), "settings": _settings(args), "variants": {}}
    variants = report["variants"]

    def record(name: str, result: dict[str, Any]) -> None:
        variants.setdefault(name, []).append(result)
        print(
            f"  {name}: timelit {result['timelit_median_s'] * 1e3:.1f} ms, plain {result['plain_median_s'] * 1e3:.1f}"
            f" ms per step, block ratio {result['median_block_ratio']:.3f}, load {result['load_average']:.1f}",
            flush=True,
        )

    for repeat in range(args.repeats):  # each variant now and before the fixes, back to back, order alternating
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        now_and_before = ((False, ""), (True, BEFORE))
        both = now_and_before if repeat % 2 else now_and_before[::-1]
        for before, suffix in both if "in-memory" in args.variants else ():
            record(f"in-memory{suffix}", one_fit(args, data_root, args.model, args.batch_size, True, 0, before))
        for before, suffix in both if "micro" in args.variants and args.micro_model else ():
            result = one_fit(args, data_root, args.micro_model, args.micro_batch, True, 0, before, args.micro_steps)
            record(f"micro model, batch {args.micro_batch}{suffix}", result)
        if "bare" in args.variants and args.micro_model:
            result = one_bare_fit(args, data_root, args.micro_model, args.micro_batch, args.micro_steps)
            record(f"micro model, batch {args.micro_batch}, bare Lightning", result)
        for before, suffix in both if "shards" in args.variants else ():
            record(
                f"shards, 0 workers{suffix}", one_fit(args, data_root, args.model, args.batch_size, False, 0, before)
            )
        for workers in (w for w in args.workers if w > 0) if "shards" in args.variants else ():
            for before, suffix in both:
                result = alternated(args, data_root, workers, before)
                record(f"shards, {workers} workers (runs alternated){suffix}", result)
    if args.profile and args.micro_model:
        report["profile"] = {
            f"micro model, batch {args.micro_batch}": profile_fit(args, data_root, False),
            f"micro model{BEFORE}": profile_fit(args, data_root, True),
        }
    report["before_vs_now"] = before_vs_now(report)
    report["rows"] = rows(report, args.batch_size, args.micro_batch)
    path = write_report("train_overhead", report, Path(args.out))
    print(render(report))
    print(f"\nwrote {path}")
    return report


def before_vs_now(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant: timelit's median step before the fixes over now, pooled over repeats (same machine, back to
    back), and the overhead over the plain loop on each side."""
    out = []
    for name, runs in report["variants"].items():
        if name.endswith(BEFORE) or name + BEFORE not in report["variants"]:
            continue
        old = report["variants"][name + BEFORE]
        now_s, before_s = median(r["timelit_median_s"] for r in runs), median(r["timelit_median_s"] for r in old)
        out.append(
            {
                "variant": name,
                "before_ms": before_s * 1e3,
                "now_ms": now_s * 1e3,
                "before_over_now": before_s / now_s,
                "before_over_plain": median(r["median_block_ratio"] for r in old),
                "now_over_plain": median(r["median_block_ratio"] for r in runs),
            }
        )
    return out


def render_profile(report: dict[str, Any]) -> str:
    if "profile" not in report:
        return ""
    names = list(report["profile"])
    first = report["profile"][names[0]]
    body = [
        [
            label,
            *(f"{report['profile'][n][label]['ms_per_step']:.2f}" for n in names),
            f"{first[label]['calls_per_step']:.1f}",
        ]
        for label in first
    ]
    return "\nwhere a step's time goes (cProfile, ms per step)\n" + table(["function", *names, "calls per step"], body)


def rows(report: dict[str, Any], batch: int, micro_batch: int) -> list[dict[str, Any]]:
    """One row per variant, pooled over repeats: medians of the per-run figures."""
    out = []
    for name, runs in report["variants"].items():
        size = micro_batch if name.startswith("micro") else batch
        lit = median(r["timelit_median_s"] for r in runs)
        plain = median(r["plain_median_s"] for r in runs)
        ratio = median(r["median_block_ratio"] for r in runs)
        mean_ratio = median(r["timelit_mean_s"] / r["plain_mean_s"] for r in runs)
        out.append(
            {
                "variant": name,
                "runs": len(runs),
                "batch": size,
                "timelit_steps_per_s": 1 / lit,
                "plain_steps_per_s": 1 / plain,
                "timelit_ms": lit * 1e3,
                "plain_ms": plain * 1e3,
                "overhead_ms": (lit - plain) * 1e3,
                "ratio_median_of_blocks": ratio,
                "ratio_of_means": mean_ratio,
                "first_step_of_task_s": median(s for r in runs for s in r["first_step_of_task_s"][1:]),
                "load": median(r["load_average"] for r in runs),
            }
        )
    return out


def render(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    where = f"{m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load {m['load_average']} at start"
    what = f"{s['model']} batch {s['batch_size']}, {s['tasks']} tasks x {s['steps']} steps"
    body = table(
        [
            "variant",
            "runs",
            "batch",
            "timelit steps/s",
            "plain steps/s",
            "timelit ms",
            "plain ms",
            "overhead ms",
            "timelit/plain (median of blocks)",
            "timelit/plain (means, incl. checkpoints)",
            "1st step of a task s",
            "load",
        ],
        [list(r.values()) for r in report["rows"]],
    )
    versus = table(
        ["variant", "timelit ms before fixes", "timelit ms now", "before / now", "before / plain", "now / plain"],
        [list(r.values()) for r in report.get("before_vs_now", [])],
    )
    return (
        f"{where}; {what}\n{body}\n\nbefore the fixes vs now (timelit's median step)\n{versus}{render_profile(report)}"
    )


def _base_model(data_root: Path) -> str:
    import json

    return json.loads((data_root / "READY.json").read_text()).get("base_model", "timelit-tiny-ViT")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "model",
        "batch_size",
        "steps",
        "tasks",
        "block",
        "repeats",
        "threads",
        "workers",
        "micro_model",
        "micro_batch",
        "micro_steps",
        "eval_datasets",
        "data_root",
    )
    return {k: getattr(args, k) for k in keys}


QUICK = {"steps": 5, "tasks": 2, "repeats": 1, "block": 2, "warmup": 1, "micro_steps": 5, "workers": [1]}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=QUICKSTART, help="a quickstart benchmark")
    parser.add_argument("--model", default="timelit-tiny-ViT")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=41, help="steps per task (one task's last step ends a block)")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--block", type=int, default=2, help="steps per side-by-side block")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="*", default=[2], help="loader workers of the shard runs (>0)")
    parser.add_argument("--micro-model", default="timelit-micro-ViT", help="'' to skip the fixed-overhead variant")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--micro-steps", type=int, default=201, help="steps per task of the micro-model variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--eval-datasets",
        nargs="*",
        default=["COLOURS", "CREATURES"],
        help="evaluated after tasks (default: a held-out and an adaptation set that both benchmark sizes have)",
    )
    parser.add_argument("--no-progress-bar", action="store_true", help="as `--trainer.enable_progress_bar false`")
    parser.add_argument("--tmp", default=None, help="where run folders go (default: the system temp dir)")
    parser.add_argument("--profile", action="store_true", help="also profile the micro model's fit (cProfile)")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["in-memory", "micro", "bare", "shards"],
        help="which to run (bare: the "
        "micro model's step as a bare LightningModule, no timelit code, to split Lightning's cost from timelit's)",
    )
    return benchmark_args(parser, argv, QUICK, "a few steps on a tiny benchmark (the smoke test)")


if __name__ == "__main__":
    main()
