"""The `all` task boundary at t = 5, 20 and 100 experts: today's full recompute against the incremental fold, one run.

    python bench/boundary_incremental.py                          # timelit-tiny-ViT (7.6M params), all/all TIES
    python bench/boundary_incremental.py --protocols "all/all TIES" "all/all task arithmetic" --model timelit-mini-ViT
    python bench/boundary_incremental.py --quick                  # timelit-micro-ViT, t = 3 and 5 (the smoke test)

What runs is TimeMerge's own boundary (`finish_task`: store the expert, write `all_<task>` and, incremental, the next
`all_state_<task>`) with bench/task_boundary.py's stand-in trainer and module, on safetensors files in a temporary
folder holding t - 1 stored experts (random, θ0 + N(0, 1e-3²)), twice per t:

- **full**: `protocol.incremental_all` patched to say no, so TimeMerge merges every expert again with `merge_all`,
  as it did before (issue 17, item 2);
- **incremental**: `protocol.fold_all` folds the newest expert into the running state of the t - 1 before it, which
  is prepared untimed (one `fold_all` over them; its seconds are reported as the cost of a rebuild).

Both write `all_<task>`; the script checks that the two files are byte-identical. The model size is chosen so that
the three sizes run in a few minutes on 2 busy cores: the boundary's cost is proportional to the parameter count
for both paths, so the ratios carry over to ViT-B/16 (149.6M parameters, 20x more), the absolute seconds do not.
Prints a table and writes bench/results/boundary_incremental.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import benchmark_args, machine, median, peak_rss_mb, table, write_report
from task_boundary import fake_trainer, free_gb, shapes, stored_experts

PROTOCOLS: dict[str, dict[str, Any]] = {
    "all/all TIES": {"init": "all", "deploy": "all", "technique": "ties", "hparams": {"k": 0.3, "scope": "tower"}},
    "all/all task arithmetic": {
        "init": "all",
        "deploy": "all",
        "technique": "task_arithmetic",
        "hparams": {"lam": 0.3},
    },
    "zs/all DARE-TIES": {"init": "zs", "deploy": "all", "technique": "dare_ties", "hparams": {"p": 0.7}},
}
MODES = ("full", "incremental")


def prepare_state(protocol: dict[str, Any], base: dict, experts: list[Path], hashes: list[str], path: Path) -> float:
    """The running state of the experts before the boundary, as the previous boundary would have left it."""
    from timelit.training.protocol import fold_all

    began = time.perf_counter()
    fold_all(base, [str(p) for p in experts], hashes, protocol["technique"], protocol["hparams"], None, path)
    return time.perf_counter() - began


def boundary(
    protocol: dict[str, Any], mode: str, n: int, experts: Path, hashes: list[str], state: Path, work: Path, module: Any
) -> tuple[float, str]:
    """Seconds of the boundary of task n - 1 (n experts after it) in `mode`, and the sha256 of its `all` file."""
    import timelit.training.callbacks.time_merge as tm
    import timelit.training.protocol as rules

    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    task = n - 1
    for t in range(task):  # hard links: no copy
        os.link(experts / f"expert_{t:04d}.safetensors", store / f"expert_{t:04d}.safetensors")
    if mode == "incremental":
        os.link(state, store / f"all_state_{task - 1:04d}.safetensors")
    callback = tm.TimeMerge(**protocol, store_dir=str(store))
    trainer = fake_trainer(task, n + 1)
    callback.setup(trainer, module, "fit")
    index = [{"task": t, "file": f"expert_{t:04d}.safetensors", "sha256": hashes[t]} for t in range(task)]
    callback.store.load_state_dict({"experts": index}, verify=False)
    callback.finished_task, callback.started_task = task - 1, task
    incremental_all = rules.incremental_all
    if mode == "full":
        rules.incremental_all = lambda technique: False  # TimeMerge before issue 17: merge_all over every expert
    try:
        began = time.perf_counter()
        callback.finish_task(trainer, module, task)
        seconds = time.perf_counter() - began
    finally:
        rules.incremental_all = incremental_all
    if mode == "incremental":
        assert (store / f"all_state_{task:04d}.safetensors").exists(), "the incremental path was not taken"
    digest = hashlib.sha256((store / f"all_{task:04d}.safetensors").read_bytes()).hexdigest()
    shutil.rmtree(store)
    return seconds, digest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    import torch

    from timelit.training.clip import build_clip

    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove the experts when stopped
    tmp = Path(tempfile.mkdtemp(prefix="boundary_incremental_", dir=args.tmp))
    model = build_clip(args.model).model
    layout = shapes(model)
    params = sum(int(torch.Size(s).numel()) for s in layout.values())
    report: dict[str, Any] = {
        "machine": machine(),
        "settings": vars(args),
        "model": args.model,
        "params": params,
        "free_gb_at_start": free_gb(tmp),
        "results": [],
    }
    print(f"{args.model}: {params / 1e6:.2f}M params; t = {args.sizes}; {', '.join(args.protocols)}", flush=True)
    try:
        experts = tmp / "experts"
        module, hashes = stored_experts(model, layout, experts, max(args.sizes) - 1)
        base = module.zero_shot_weights
        runs = []
        for name in args.protocols:
            protocol = PROTOCOLS[name]
            for n in args.sizes:
                state = tmp / f"state_{n}.safetensors"
                before = [experts / f"expert_{t:04d}.safetensors" for t in range(n - 1)]
                rebuild = prepare_state(protocol, base, before, hashes[: n - 1], state)
                digests = {}
                for repeat in range(args.repeats):  # alternating order, so neither mode always runs first
                    for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                        seconds, digests[mode] = boundary(protocol, mode, n, experts, hashes, state, tmp / "w", module)
                        runs.append({"protocol": name, "n": n, "mode": mode, "s": seconds, "load": os.getloadavg()[0]})
                        print(
                            f"  {name:24} t={n:3} {mode:11} {seconds:7.2f} s (load {runs[-1]['load']:.1f})", flush=True
                        )
                report["results"].append(
                    {
                        "protocol": name,
                        "t": n,
                        **{
                            f"{mode}_s": median(r["s"] for r in runs[-2 * args.repeats :] if r["mode"] == mode)
                            for mode in MODES
                        },
                        "rebuild_state_s": rebuild,
                        "state_mb": state.stat().st_size / 2**20,
                        "identical": digests["full"] == digests["incremental"],
                        "load": median(r["load"] for r in runs[-2 * args.repeats :]),
                    }
                )
                state.unlink()
        report["runs"] = runs
        report["peak_rss_mb"] = peak_rss_mb()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not all(r["identical"] for r in report["results"]):
        raise AssertionError("the incremental `all` file differs from the full recompute's")
    path = write_report("boundary_incremental", report, Path(args.out))
    print(render(report))
    print(f"\nwrote {path}")
    return report


def render(report: dict[str, Any]) -> str:
    smallest = {}
    rows = []
    for r in report["results"]:
        first = smallest.setdefault(r["protocol"], r)
        rows.append(
            [
                r["protocol"],
                r["t"],
                f"{r['full_s']:.2f}",
                f"{r['incremental_s']:.2f}",
                f"{r['full_s'] / r['incremental_s']:.1f}x",
                f"{r['incremental_s'] / first['incremental_s']:.2f}x",
                f"{r['full_s'] / first['full_s']:.2f}x",
                "yes" if r["identical"] else "NO",
                f"{r['load']:.1f}",
            ]
        )
    header = [
        "protocol",
        "t",
        "full s",
        "incremental s",
        "full / incr.",
        "incr. vs smallest t",
        "full vs smallest t",
        "same bytes",
        "load",
    ]
    return f"{report['model']} ({report['params'] / 1e6:.2f}M params), boundary of task t:\n\n" + table(header, rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="timelit-tiny-ViT")
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 100], help="experts after the boundary (t)")
    parser.add_argument("--protocols", nargs="+", default=["all/all TIES"], choices=list(PROTOCOLS))
    parser.add_argument("--repeats", type=int, default=1, help="boundaries per mode and size (medians)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; merges use 1)")
    parser.add_argument("--tmp", default=None)
    args = benchmark_args(parser, argv, {"model": "timelit-micro-ViT", "sizes": [3, 5]})
    if min(args.sizes) < 2:
        parser.error("--sizes must be at least 2: the boundary folds into the state of the experts before it")
    return args


if __name__ == "__main__":
    main()
