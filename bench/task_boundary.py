"""Seconds spent at a task boundary with ViT-B/16-sized weights, per TIME protocol and number of stored experts.

    python bench/task_boundary.py                     # ft/ft, ema/ema, zs/all average, all/all TIES at 20 and 100
    python bench/task_boundary.py --quick             # timelit-micro-ViT, 3 and 5 experts (the smoke test)

What runs is TimeMerge's own code (timelit/training/callbacks/time_merge.py) with a stand-in trainer (one rank, no
collective) and a LightningModule stand-in holding an open_clip ViT-B-16 (149.6M float32 parameters, random weights), on
safetensors files in a temporary folder. Before the boundary the store holds N - 1 experts (random, θ0 + N(0, 1e-3²))
and the merged files of task N - 2 the protocol needs; the boundary of task N - 1 then

1. stores the expert: copies the live weights to the CPU and writes `expert_<task>.safetensors` (+ sha256),
2. writes the merged weights the protocol needs: the task EMA (pairwise with the previous EMA file), the merge of all
   N experts (streamed from their files), each written atomically with its sha256,
3. swaps the deployed weights in for the evaluation and the live ones back after it (on_validation_start/end),
4. loads the next task's init weights (start_task),

timed separately by wrapping the functions TimeMerge calls (no behaviour changes). all/all TIES is incremental since
issue 17 (`protocol.fold_all`); here no running state of the previous task is on disk, so its boundary rebuilds the
state from every expert, which costs what the full recompute costs: bench/boundary_incremental.py measures the
boundary with the previous state in place, side by side with the full recompute. Also shown: a task-end
checkpoint of the weights and the AdamW moments (`torch.save`, what StreamCheckpoint writes at every task end, but
without the callbacks' small state). The page cache is as the run leaves it: experts are written just before, so
they are cached while they fit in RAM (24 GB here) and read from disk beyond that.

The reference task: 1420 steps of ViT-B/16 at batch 512 (FoMo-in-Flux, 20 tasks). Its step time comes from
bench/results/gpu_throughput.json when that was measured on a GPU, else from an assumed MFU (labelled ESTIMATE).

Disk: each expert is 0.56 GB; N = 100 needs ~57 GB. When the largest N does not fit in the free space of --tmp
(less a margin), the script measures the largest N that fits and extrapolates linearly to the requested N, saying so.
Prints a table and writes bench/results/task_boundary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import benchmark_args, machine, median, peak_rss_mb, table, write_report

REFERENCE_GFLOPS_PER_STEP = 63_394.76  # FIF_REFERENCE.md §4: ViT-B/16, one 512-sample step
REFERENCE_STEPS = 1420
H100_BF16_DENSE_TFLOPS = 989.4

PROTOCOLS: dict[str, dict[str, Any]] = {
    "ft/ft": {"init": "ft", "deploy": "ft"},
    "ema/ema": {"init": "ema", "deploy": "ema", "technique": "interpolation", "ema_weight": 0.5},
    "zs/all average": {"init": "zs", "deploy": "all", "technique": "average"},
    "all/all TIES": {"init": "all", "deploy": "all", "technique": "ties", "hparams": {"k": 0.3, "scope": "tower"}},
}


# --------------------------------------------------------------------------- weights on disk


def shapes(model: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_weights(layout: dict[str, tuple[int, ...]], generator: Any, base: dict | None = None) -> dict:
    import torch

    if base is None:
        return {k: 0.02 * torch.randn(s, generator=generator) for k, s in layout.items()}
    return {k: v + 1e-3 * torch.randn(v.shape, generator=generator) for k, v in base.items()}


def free_gb(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return usage.free / 2**30


def stored_experts(model: Any, layout: dict[str, tuple[int, ...]], folder: Path, count: int) -> tuple[Any, list[str]]:
    """A stand-in module (θ0 as `zero_shot_weights`, its live weights one more draw) and `count` experts saved in
    `folder` as expert_NNNN.safetensors; returns the module and the experts' sha256 in order. Every draw comes from one
    generator seeded 0, in this order, so both boundary benchmarks time the same weights."""
    import torch

    from timelit.merging import save_weights

    generator = torch.Generator().manual_seed(0)
    base = random_weights(layout, generator)
    module = SimpleNamespace(model=model, zero_shot_weights=base)
    module.model.load_state_dict(random_weights(layout, generator, base))
    folder.mkdir()
    hashes = [
        save_weights(folder / f"expert_{t:04d}.safetensors", random_weights(layout, generator, base))
        for t in range(count)
    ]
    os.sync()  # the experts' dirty pages reach the disk before anything is timed
    return module, hashes


# --------------------------------------------------------------------------- TimeMerge with stand-ins


class _Strategy:
    root_device = "cpu"

    def barrier(self, name: str | None = None) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


def fake_trainer(task: int, num_tasks: int) -> Any:
    from lightning.pytorch.trainer.states import TrainerFn

    return SimpleNamespace(
        is_global_zero=True,
        strategy=_Strategy(),
        callbacks=[],
        current_epoch=task,
        sanity_checking=False,
        state=SimpleNamespace(fn=TrainerFn.FITTING),
        datamodule=SimpleNamespace(num_tasks=num_tasks),
        max_epochs=num_tasks,
        log_dir=None,  # the run folder; unused, as the store_dir of TimeMerge is set and no task here is the last
        default_root_dir=".",
        checkpoint_callback=None,  # no last.ckpt is written here
    )


class Timings:
    """Wall time per phase, collected by wrapping the functions TimeMerge calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.phase = "other"

    @contextmanager
    def measure(self, phase: str):
        previous, self.phase = self.phase, phase
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - began
            self.phase = previous


@contextmanager
def instrumented(timings: Timings):
    """Wrap the merge, save and copy functions TimeMerge's boundary calls (in timelit.training.protocol and
    timelit.merging.merged_files) so each is timed under its phase."""
    import timelit.merging.merged_files as files
    import timelit.training.protocol as protocol

    saved = {name: getattr(protocol, name) for name in ("pairwise", "merge_all", "fold_all")}
    save_weights = files.save_weights
    store_add = files.ExpertStore.add

    def wrap(name: str, phase: str):
        original = saved[name]

        def timed(*args: Any, **kwargs: Any) -> Any:
            with timings.measure(phase):
                return original(*args, **kwargs)

        return timed

    def timed_add(self: Any, *args: Any, **kwargs: Any) -> Any:
        with timings.measure("store expert (write + sha256)"):
            return store_add(self, *args, **kwargs)

    protocol.pairwise = wrap("pairwise", "EMA merge")
    protocol.merge_all = wrap("merge_all", "all merge")
    protocol.fold_all = wrap("fold_all", "all merge")

    def timed_save(path: Any, *args: Any, **kwargs: Any) -> Any:
        phase = f"write {Path(path).name.split('_')[0]} (+ sha256)"
        with timings.measure(phase):
            return save_weights(path, *args, **kwargs)

    files.save_weights = timed_save
    files.ExpertStore.add = timed_add
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(protocol, name, value)
        files.save_weights = save_weights
        files.ExpertStore.add = store_add


def boundary(
    protocol: dict[str, Any], n: int, experts_dir: Path, hashes: list[str], work: Path, module: Any
) -> dict[str, float]:
    """The boundary of task n - 1 with n - 2 tasks finished before it, timed per phase."""
    from timelit.training.callbacks.time_merge import TimeMerge

    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    for t in range(n - 1):  # the stored experts: hard links, no copy
        os.link(experts_dir / f"expert_{t:04d}.safetensors", store / f"expert_{t:04d}.safetensors")
    callback = TimeMerge(**protocol, store_dir=str(store))
    task = n - 1
    trainer = fake_trainer(task, n + 1)
    callback.setup(trainer, module, "fit")
    # The index a running stream holds: every hash was computed when its expert was written.
    index = [{"task": t, "file": f"expert_{t:04d}.safetensors", "sha256": hashes[t]} for t in range(n - 1)]
    callback.store.load_state_dict({"experts": index}, verify=False)
    for kind in callback.kinds:  # the previous task's merged files, as the last boundary left them
        os.link(experts_dir / "expert_0000.safetensors", store / f"{kind}_{task - 1:04d}.safetensors")
    callback.finished_task, callback.started_task = task - 1, task
    timings = Timings()
    with instrumented(timings):
        began = time.perf_counter()
        callback.finish_task(trainer, module, task)
        timings.seconds["total: store + merges (finish_task)"] = time.perf_counter() - began
        with timings.measure("swap deployed weights in and out (evaluation)"):
            callback.on_validation_start(trainer, module)
            callback.on_validation_end(trainer, module)
        with timings.measure("load next task's init weights (start_task)"):
            callback.start_task(fake_trainer(task + 1, n + 1), module, task + 1)
    return dict(timings.seconds)


def checkpoint_seconds(module: Any, work: Path) -> float:
    """torch.save of the weights and two AdamW moments, as the task-end checkpoint holds them."""
    import torch

    state = {k: v.detach() for k, v in module.model.state_dict().items()}
    moments = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in state.items()}
    path = work / "last.ckpt"
    began = time.perf_counter()
    torch.save({"state_dict": state, "optimizer": moments}, path)
    seconds = time.perf_counter() - began
    path.unlink()
    return seconds


# --------------------------------------------------------------------------- the benchmark


def reference_task(args: argparse.Namespace) -> dict[str, Any]:
    measured = Path(args.out) / "gpu_throughput.json"
    if measured.exists():
        report = json.loads(measured.read_text())
        best = report.get("best") or {}
        if best.get("model") == "ViT-B-16" and report.get("device", {}).get("cuda"):
            step = 512 / best["samples_per_s"]
            return {
                "step_s": step,
                "task_s": step * REFERENCE_STEPS,
                "source": f"measured on {report['device']['cuda']} ({measured})",
            }
    step = REFERENCE_GFLOPS_PER_STEP / (args.assumed_mfu * H100_BF16_DENSE_TFLOPS * 1e3)
    return {
        "step_s": step,
        "task_s": step * REFERENCE_STEPS,
        "source": f"ESTIMATE: {REFERENCE_GFLOPS_PER_STEP:,} GFLOPs per step / (H100 SXM bf16 dense "
        f"{H100_BF16_DENSE_TFLOPS} TFLOPS x assumed MFU {args.assumed_mfu:.0%}); no GPU in this session",
    }


def plan_sizes(args: argparse.Namespace, model_gb: float, tmp: Path) -> tuple[list[int], list[int]]:
    """(sizes to measure, requested sizes that do not fit and are extrapolated from the two largest measured)."""
    largest_fit = int((free_gb(tmp) - args.margin_gb) / model_gb) - 3  # + the new expert and two merged files
    measured = [n for n in args.sizes if n <= largest_fit]
    if len(measured) < len(args.sizes):
        measured.append(max(2, min(args.fallback, largest_fit)))
    measured = sorted(set(measured))
    return measured, [n for n in args.sizes if n not in measured]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    import torch

    from timelit.training.clip import build_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove tens of GB of experts when stopped
    tmp = Path(tempfile.mkdtemp(prefix="task_boundary_", dir=args.tmp))
    model = build_clip(args.model).model
    layout = shapes(model)
    params = sum(int(torch.Size(s).numel()) for s in layout.values())
    model_gb = params * 4 / 2**30
    sizes, extrapolated = plan_sizes(args, model_gb, tmp)
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": vars(args),
        "params": params,
        "model_gb": model_gb,
        "free_gb_at_start": free_gb(tmp),
        "measured_sizes": sizes,
        "extrapolated_sizes": list(extrapolated),
        "reference_task": reference_task(args),
        "results": [],
    }
    print(
        f"{args.model}: {params / 1e6:.1f}M params, {model_gb:.2f} GB per expert; "
        f"{report['free_gb_at_start']:.0f} GB free in {tmp.parent}; measuring N = {sizes}"
        + (f", extrapolating to {list(extrapolated)}" if extrapolated else ""),
        flush=True,
    )
    try:
        experts = tmp / "experts"
        began = time.perf_counter()
        module, hashes = stored_experts(model, layout, experts, max(sizes) - 1)
        report["generate_seconds"] = time.perf_counter() - began
        report["checkpoint_s"] = checkpoint_seconds(module, tmp)
        runs = []
        for repeat in range(args.repeats):  # sizes in alternating order, so neither always runs first
            for n in sizes if repeat % 2 == 0 else sizes[::-1]:
                for name, protocol in PROTOCOLS.items():
                    if name not in args.protocols:
                        continue
                    seconds = boundary(protocol, n, experts, hashes, tmp / "work", module)
                    runs.append({"protocol": name, "n": n, "seconds": seconds, "load": os.getloadavg()[0]})
                    print(f"  N={n:3} {name:15} {_total(seconds):7.1f} s  (load {runs[-1]['load']:.1f})", flush=True)
        report["runs"] = runs
        report["peak_rss_mb"] = peak_rss_mb()
        for n in sizes:
            for name in dict.fromkeys(r["protocol"] for r in runs):
                same = [r for r in runs if r["protocol"] == name and r["n"] == n]
                phases = {k: median(r["seconds"].get(k, 0.0) for r in same) for k in same[0]["seconds"]}
                report["results"].append(
                    {
                        "protocol": name,
                        "n": n,
                        "seconds": phases,
                        "load": median(r["load"] for r in same),
                        "repeats": len(same),
                    }
                )
        report["results"] += extrapolate(report["results"], extrapolated, sizes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["rows"] = rows(report)
    path = write_report("task_boundary", report, Path(args.out))
    print(render(report))
    print(f"\nwrote {path}")
    return report


def _total(seconds: dict[str, float]) -> float:
    keys = (
        "total: store + merges (finish_task)",
        "swap deployed weights in and out (evaluation)",
        "load next task's init weights (start_task)",
    )
    return sum(seconds.get(k, 0.0) for k in keys)


def extrapolate(results: list[dict[str, Any]], targets: list[int], sizes: list[int]) -> list[dict[str, Any]]:
    """The `all` merge reads every expert (TIES three times), so its time is extrapolated linearly in N through the
    two largest measured sizes; every other phase does not depend on N and is taken as its median over them."""
    if not targets or len(sizes) < 2:
        return []
    lo, hi = sizes[-2], sizes[-1]
    out = []
    for name in dict.fromkeys(r["protocol"] for r in results):
        a = next(r for r in results if r["protocol"] == name and r["n"] == lo)["seconds"]
        b = next(r for r in results if r["protocol"] == name and r["n"] == hi)["seconds"]
        for n in targets:
            seconds = {k: (a.get(k, 0.0) + b[k]) / 2 for k in b}
            merge_lo, merge_hi = a.get("all merge", 0.0), b.get("all merge", 0.0)
            seconds["all merge"] = max(0.0, merge_hi + (merge_hi - merge_lo) * (n - hi) / (hi - lo))
            finish = "total: store + merges (finish_task)"
            seconds[finish] += seconds["all merge"] - (merge_lo + merge_hi) / 2
            out.append({"protocol": name, "n": n, "seconds": seconds, "extrapolated_from": [lo, hi]})
    return out


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    task_s = report["reference_task"]["task_s"]
    out = []
    for r in report["results"]:
        s = r["seconds"]
        total = _total(s) + report["checkpoint_s"]
        ema = s.get("EMA merge", 0.0) + s.get("write ema (+ sha256)", 0.0)
        merge_all = s.get("all merge", 0.0) + s.get("write all (+ sha256)", 0.0)
        out.append(
            {
                "protocol": r["protocol"],
                "N": f"{r['n']}" + (" (extrapolated)" if "extrapolated_from" in r else ""),
                "store expert s": s["total: store + merges (finish_task)"] - ema - merge_all,
                "of which write + sha256 s": s.get("store expert (write + sha256)", 0.0),
                "EMA s": ema,
                "all merge s": merge_all,
                "swap for eval s": s.get("swap deployed weights in and out (evaluation)", 0.0),
                "load init s": s.get("load next task's init weights (start_task)", 0.0),
                "checkpoint s": report["checkpoint_s"],
                "boundary total s": total,
                "share of task": f"{100 * total / (total + task_s):.1f}%",
                "load": r.get("load", float("nan")),
            }
        )
    return out


def render(report: dict[str, Any]) -> str:
    ref = report["reference_task"]
    head = (
        f"{report['params'] / 1e6:.1f}M params; reference task: {REFERENCE_STEPS} steps x {ref['step_s']:.3f} s "
        f"= {ref['task_s']:.0f} s ({ref['source']})"
    )
    return head + "\n" + table(list(report["rows"][0]), [list(r.values()) for r in report["rows"]])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100], help="experts stored after the boundary")
    parser.add_argument("--fallback", type=int, default=50, help="largest N to measure when the largest does not fit")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--margin-gb", type=float, default=15.0, help="disk left free for others")
    parser.add_argument("--repeats", type=int, default=2, help="boundaries per protocol and size (medians)")
    parser.add_argument("--assumed-mfu", type=float, default=0.4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; merges use 1)")
    parser.add_argument("--tmp", default=None)
    return benchmark_args(parser, argv, {"model": "timelit-micro-ViT", "sizes": [3, 5], "fallback": 5, "repeats": 1})


if __name__ == "__main__":
    main()
