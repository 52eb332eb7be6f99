"""ViT-B-16 training throughput and MFU on one GPU: `timelit fit` against a plain loop, bf16 autocast, batch 512.

    python bench/gpu_throughput.py                     # on a GPU node: ViT-B-16, batch 512 (halved until it fits)
    python bench/gpu_throughput.py --quick             # CPU, timelit-micro-ViT, a few steps (the smoke test)

What runs: the same harness as bench/train_overhead.py (`_fit.py`): `timelit fit --config quickstart.yaml` through
`timelit.commands.cli.run_lightning` with `model.model_name ViT-B-16`, `pretrained null` (random weights: no download),
`trainer.precision bf16-mixed` and every callback of a user's run, on in-memory batches (the quickstart's images
through ViT-B-16's transforms, 224 px, decoded once, pinned), and `SideBySide` alternating blocks of timelit's steps
with a plain loop's (same model copy, AdamW, ClipLoss, clip 1.0, `torch.autocast(bfloat16)`) on the same GPU.
Steps are timed with `torch.cuda.synchronize()` at each step's end on both sides.

MFU = samples/s x GFLOPs per sample (timelit.training.flops, counted as the reference does: 123.82 for ViT-B-16 at 224
px) / the card's dense bf16 peak (a table of NVIDIA datasheet figures by device name; `--peak-tflops` overrides).

The batch is 512 (the reference); on CUDA out-of-memory it is halved until it fits, and the table says which ran.
Writes bench/results/gpu_throughput.json, whose `best` entry bench/data_pipeline.py and bench/task_boundary.py
read for their GPU-rate figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import benchmark_args, machine, quiet_logs, table, write_report

# Dense (no sparsity) bf16 tensor-core peaks, TFLOPS, from NVIDIA's datasheets; matched against the device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "GH200": 989.4,
    "H100 NVL": 835.5,
    "H100 PCIe": 756.5,
    "H100": 989.4,  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    "A100": 312.0,
    "L40S": 362.1,
    "A10G": 70.0,
}


def peak_tflops(device_name: str | None, override: float | None) -> float | None:
    if override:
        return override
    if not device_name:
        return None
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def ensure_images(root: Path) -> Path:
    """A small quickstart benchmark to draw in-memory batches from (its base model is not used)."""
    from timelit.data.synth.benchmark import is_ready, synthesize

    if not is_ready(root):
        synthesize(root, scale=0.2, base_model="timelit-micro-ViT", base_steps=1)
    return root


def one_run(args: argparse.Namespace, batch: int) -> dict[str, Any]:
    import torch
    from _fit import SideBySide, fit_args, run_fit

    from timelit.training.flops import measure_step

    cost = measure_step(args.model, batch)
    run_dir = Path(tempfile.mkdtemp(prefix="gpu_throughput_", dir=args.tmp))
    extra = (
        "--trainer.accelerator",
        args.accelerator,
        "--trainer.devices",
        "1",
        "--trainer.precision",
        args.precision,
        "--trainer.callbacks+=_fit.SideBySide",
        "--trainer.callbacks.init_args.block",
        str(args.block),
        "--trainer.callbacks.init_args.warmup",
        str(args.warmup),
        "--trainer.enable_progress_bar",
        "false",
        "--data.init_args.eval_datasets",
        "[COLOURS]",
        "--data.init_args.eval_batch_size",
        str(min(batch, 256)),
        "--data.init_args.cached_batches",
        str(args.cached_batches),
    )
    fargs = fit_args(
        args.data_root,
        run_dir,
        args.model,
        None,
        args.tasks,
        args.steps,
        batch,
        cost.gflops,
        in_memory=True,
        num_workers=0,
        extra=extra,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cli = run_fit(fargs)
    side = next(c for c in cli.trainer.callbacks if isinstance(c, SideBySide))
    summary = side.summary()
    summary["gflops_per_sample"] = cost.gflops_per_sample
    summary["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del cli, side
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    quiet_logs()
    import torch

    args.data_root = ensure_images(Path(args.data_root).expanduser())
    cuda = torch.cuda.is_available()
    args.accelerator = "gpu" if cuda else "cpu"
    device = machine()
    peak = peak_tflops(device["cuda"], args.peak_tflops)
    report: dict[str, Any] = {
        "machine": device,
        "device": device,  # the key data_pipeline.py and task_boundary.py read
        "settings": {k: str(v) for k, v in vars(args).items()},
        "peak_bf16_tflops": peak,
        "runs": [],
    }
    if not cuda:
        report["note"] = "no CUDA device: a CPU check of the script, not a GPU measurement"
    batch = args.batch_size
    while batch >= 1:
        try:
            result = one_run(args, batch)
            break
        except torch.cuda.OutOfMemoryError:
            report["runs"].append({"batch": batch, "error": "CUDA out of memory"})
            print(f"batch {batch} does not fit; halving", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            batch //= 2
    else:
        raise RuntimeError("not even batch 1 fits")
    rows = []
    for side in ("timelit", "plain"):
        step = result[f"{side}_median_s"]
        rate = batch / step
        mfu = rate * result["gflops_per_sample"] / (peak * 1e3) if peak else None
        rows.append(
            {
                "side": "timelit fit" if side == "timelit" else "plain loop",
                "model": args.model,
                "batch": batch,
                "precision": args.precision,
                "step_s": step,
                "samples_per_s": rate,
                "mfu": mfu,
            }
        )
    report["runs"].append({"batch": batch, **result})
    report["rows"] = rows
    report["timelit_over_plain"] = result["median_block_ratio"]
    report["best"] = {
        "model": args.model,
        "batch": batch,
        "samples_per_s": rows[0]["samples_per_s"],
        "plain_samples_per_s": rows[1]["samples_per_s"],
        "mfu": rows[0]["mfu"],
    }
    path = write_report("gpu_throughput", report, Path(args.out))
    print(render(report))
    print(f"\nwrote {path}")
    return report


def render(report: dict[str, Any]) -> str:
    device = report["device"]["cuda"] or f"CPU ({report['device']['cpu']})"
    head = (
        f"{device}; peak bf16 {report['peak_bf16_tflops']} TFLOPS; "
        f"{report['runs'][-1]['gflops_per_sample']:.2f} GFLOPs per sample; timelit/plain (median of blocks) "
        f"{report['timelit_over_plain']:.3f}"
    )
    body = table(
        ["side", "model", "batch", "precision", "step s", "samples/s", "MFU"],
        [[*[*r.values()][:-1], f"{r['mfu']:.1%}" if r["mfu"] else "n/a"] for r in report["rows"]],
    )
    return head + ("\n" + report["note"] if "note" in report else "") + "\n" + body


QUICK = {"model": "timelit-micro-ViT", "batch_size": 8, "steps": 5, "block": 2, "warmup": 1, "cached_batches": 2}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--steps", type=int, default=41, help="steps per task")
    parser.add_argument("--tasks", type=int, default=1)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--cached-batches", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not in table")
    parser.add_argument("--data-root", default=str(Path(tempfile.gettempdir()) / "timelit_bench_images"))
    parser.add_argument("--tmp", default=None)
    args = benchmark_args(parser, argv, QUICK, "a few steps of a micro model on CPU")
    os.environ.setdefault("TIMELIT_LOG_LEVEL", "WARNING")
    return args


if __name__ == "__main__":
    main()
