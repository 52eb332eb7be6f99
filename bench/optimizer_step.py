"""The AdamW kernel: torch's default (a loop of per-tensor ops on a CPU), `foreach` and `fused`, alone and in a fit.

    python bench/optimizer_step.py --data-root ~/.cache/timelit/quickstart      # ~5 min
    python bench/optimizer_step.py --quick --data-root /tmp/bench                   # the smoke test

Why. A profile of the quickstart's step found the optimizer at a sixth of it: timelit-tiny-ViT has 7.2M parameters,
6.3M of them in the text token embedding, and torch's default AdamW on a CPU runs a dozen small ops per tensor.
CLIPFineTuner now asks for the fused kernel (`model.fused: null` = fused except under mixed precision, see
timelit/training/model.py). Two measurements, each variant alternated with the others:

1. one `optimizer.step()` of the model's real parameter groups and gradients, per kernel;
2. `timelit fit` on the quickstart's real pipeline (shards, loader workers, every callback), median step, with
   `--model.init_args.fused false` (torch's default, what timelit ran before) and `true`.

Prints a table and writes bench/results/optimizer_step.json.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import QUICKSTART, benchmark_args, machine, median, quiet_logs, table, write_report

KERNELS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_alone(model_name: str, batch: int, repeats: int, steps: int) -> dict[str, list[float]]:
    """Milliseconds of one AdamW step per kernel, on the model's parameter groups with real gradients."""
    import torch
    from open_clip.loss import ClipLoss

    from timelit.training.clip import build_clip
    from timelit.training.optim import parameter_groups

    bundle = build_clip(model_name)
    model = bundle.model.train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size)
    texts = bundle.tokenizer(["a photo of a red circle shape"] * batch)
    loss = ClipLoss()(*model(images, texts))
    loss.backward()
    out: dict[str, list[float]] = {name: [] for name in KERNELS}
    for repeat in range(repeats):
        for name in KERNELS if repeat % 2 == 0 else reversed(KERNELS):
            optimizer = torch.optim.AdamW(parameter_groups(model, 0.2, False), lr=1e-6, **KERNELS[name])
            optimizer.step()  # allocates the moments
            began = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            out[name].append((time.perf_counter() - began) / steps * 1e3)
    return out


def fit_steps(args: argparse.Namespace, data_root: Path) -> dict[str, list[dict[str, float]]]:
    """timelit fit's median and mean step (ms) with the unfused and the fused AdamW, alternated."""
    from _fit import SideBySide, fit_args, run_fit
    from train_overhead import _base_model

    from timelit.training.flops import measure_step

    cost = measure_step(args.model, args.batch_size)
    pretrained = data_root / "base_model.safetensors" if args.model == _base_model(data_root) else None
    out: dict[str, list[dict[str, float]]] = {"false": [], "true": []}
    for repeat in range(args.repeats):
        for fused in ("false", "true") if repeat % 2 == 0 else ("true", "false"):
            run_dir = Path(tempfile.mkdtemp(prefix="optimizer_step_", dir=args.tmp))
            extra = (
                "--trainer.callbacks+=_fit.SideBySide", "--trainer.callbacks.init_args.block", "0",
                "--trainer.enable_progress_bar", "false", "--model.init_args.fused", fused,
                "--data.init_args.eval_datasets", "[COLOURS]",
            )  # fmt: skip
            fargs = fit_args(
                data_root, run_dir, args.model, pretrained, 1, args.steps, args.batch_size, cost.gflops, False,
                args.workers, extra=extra,
            )  # fmt: skip
            try:
                with open(args.log, "a") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
                    cli = run_fit(fargs)
            finally:
                shutil.rmtree(run_dir, ignore_errors=True)
            summary = next(c for c in cli.trainer.callbacks if isinstance(c, SideBySide)).summary()
            median_ms, mean_ms = summary["timelit_median_s"] * 1e3, summary["timelit_mean_s"] * 1e3
            out[fused].append({"median_ms": median_ms, "mean_ms": mean_ms})
            print(f"  fit, fused {fused}: median step {out[fused][-1]['median_ms']:.1f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    quiet_logs()
    from train_overhead import ensure_data

    data_root = ensure_data(Path(args.data_root), args.quick)
    args.log = Path(args.out) / "optimizer_step.log"
    args.log.parent.mkdir(parents=True, exist_ok=True)
    args.log.write_text("")
    report: dict[str, Any] = {"machine": machine(), "settings": {k: str(v) for k, v in vars(args).items()}}
    report["step_alone_ms"] = step_alone(args.model, args.batch_size, args.repeats, args.optimizer_steps)
    report["fit_step_ms"] = fit_steps(args, data_root)
    alone = {name: median(ms) for name, ms in report["step_alone_ms"].items()}
    fit = {k: median(r["median_ms"] for r in runs) for k, runs in report["fit_step_ms"].items()}
    report["summary"] = {
        "step_alone_median_ms": alone,
        "fit_median_step_ms": fit,
        "fit_unfused_over_fused": fit["false"] / fit["true"],
    }
    path = write_report("optimizer_step", report, Path(args.out))
    print(f"{args.model} at batch {args.batch_size}, {report['machine']['cores']} cores")
    print(table(["AdamW kernel", "one step alone, ms (median)"], [[k, v] for k, v in alone.items()]))
    print(table(
        ["timelit fit (real pipeline)", "median step ms", "runs"],
        [["unfused (torch's default)", fit["false"], args.repeats], ["fused", fit["true"], args.repeats]],
    ))  # fmt: skip
    print(f"unfused / fused: {fit['false'] / fit['true']:.2f}\nwrote {path}")
    return report


# 6 steps: SideBySide drops the first of a task and 3 of warm-up.
QUICK = {"model": "timelit-micro-ViT", "batch_size": 8, "steps": 6, "workers": 0, "repeats": 1, "optimizer_steps": 2}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=QUICKSTART, help="a quickstart benchmark")
    parser.add_argument("--model", default="timelit-tiny-ViT")
    parser.add_argument("--batch-size", type=int, default=64, help="the quickstart's batch")
    parser.add_argument("--steps", type=int, default=80, help="training steps of each fit")
    parser.add_argument("--workers", type=int, default=2, help="loader workers of each fit (the quickstart's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimizer-steps", type=int, default=20, help="timed AdamW steps per kernel and repeat")
    parser.add_argument("--tmp", default=None, help="where run folders go (default: the system temp dir)")
    return benchmark_args(parser, argv, QUICK, "a few steps on a tiny benchmark (the smoke test)")


if __name__ == "__main__":
    main()
