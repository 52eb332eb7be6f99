"""Wall time and peak RSS of merging 2-20 ViT-B/16-sized experts: timelit's streaming engine vs stacking in memory.

    python bench/merge_bench.py                                 # full: 2-20 experts of 149.6M params, ~13 GB on disk
    python bench/merge_bench.py --sizes 2 5 --params-scale 0.1  # a quick check
    python bench/merge_bench.py --sizes 2 8 20 --params-scale 0.02 --out /tmp/merge_bench_small.json \\
        --methods average ties model_stock tall_masks consensus_ties random   # issue 16's techniques, small
    python bench/merge_bench.py --model timelit-tiny-ViT --sizes 2 8 20 --out bench/results/merge_bench_svd_tiny.json \\
        --methods task_arithmetic tsv iso_c iso_cts opcm              # the SVD methods on the quickstart model
    python bench/merge_bench.py --sizes 2 --out bench/results/merge_bench_svd_vit_b_16.json \\
        --methods task_arithmetic tsv iso_c iso_cts opcm              # ... and on ViT-B-16 (minutes per run)

Experts are random (theta_0 ~ N(0, 0.02^2), theta_i = theta_0 + N(0, 0.001^2)) with the real shapes of an open_clip
architecture (``--model``, default ViT-B-16, read from ``open_clip.create_model(model, device="meta")``; timelit's
own configs such as the quickstart's timelit-tiny-ViT included; ``--params-scale`` shrinks every first dimension) and
are written as safetensors to a temporary directory that is deleted afterwards. Random task vectors have flat
spectra, so the SVD methods' cost (which depends on the shapes, not the values) is what these runs measure.

Every measurement runs in a fresh subprocess that reports its own wall time (the merge call only, not interpreter
start-up) and peak RSS (``VmHWM``, which counts the interpreter and torch, about 0.5 GB, too); the page cache is
warmed by reading the inputs once before each run, so both sides read from memory.

- "stream" is ``timelit.merging.merge`` on the safetensors paths (one torch thread, its default).
- "naive" flattens and stacks the experts into an N x D matrix as FusionBench and the FoMo-in-Flux pipeline do, with
  torch's default threads (written with in-place operations where the reference code would allocate, so it is the
  lean version of that approach). Naive runs whose estimated peak exceeds ``--naive-limit-gb`` (or 95% of the memory
  available at the time) are skipped and marked so in the table; the naive worker volunteers to the OOM killer.
  Only average, TIES and MagMax have a naive version; the other techniques are measured streamed only.

Prints a table and writes ``bench/results/merge_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HPARAMS = {
    "average": {},
    "ties": {"k": 0.2},
    "magmax": {},
    "model_stock": {},
    "tall_masks": {"mask_lambda": 0.4, "min_agree": 2},
    "consensus_ties": {"k": 0.2, "mask_lambda": 0.4, "min_agree": 2},
    "random": {"seed": 0},
    "task_arithmetic": {},
    "tsv": {},
    "iso_c": {},
    "iso_cts": {"common_space_fraction": 0.8},
    "opcm": {"alpha": 0.5},
}
NAIVE_MODELS = {"average": (1.05, 4.2), "ties": (5.0, 3.0), "magmax": (3.1, 2.2)}
"""Naive peak RSS above the interpreter's, in model sizes, as a * N + b: fitted to runs at --params-scale 0.25 with
N = 2 and 5 (TIES at N = 5, full size, measured 15.8 GB against 16.1 GB estimated)."""


def model_shapes(model: str, scale: float) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of open_clip architecture ``model`` (timelit's configs registered), first dims scaled."""
    import open_clip

    from timelit.training.clip import register_model_configs

    register_model_configs()
    state = open_clip.create_model(model, device="meta").state_dict()
    return {key: (max(1, round(v.shape[0] * scale)), *v.shape[1:]) if v.dim() else () for key, v in state.items()}


def generate(directory: Path, n: int, scale: float, model: str) -> None:
    from timelit.merging import save_weights

    generator = torch.Generator().manual_seed(0)
    shapes = model_shapes(model, scale)
    base = {key: 0.02 * torch.randn(shape, generator=generator) for key, shape in shapes.items()}
    save_weights(directory / "base.safetensors", base)
    for i in range(n):
        expert = {key: value + 0.001 * torch.randn(value.shape, generator=generator) for key, value in base.items()}
        save_weights(directory / f"expert_{i:04d}.safetensors", expert)


def naive(method: str, base_path: Path, paths: list[Path]) -> dict[str, torch.Tensor]:
    """Flatten every model into one row of an N x D matrix, merge along N, unflatten (FusionBench / the pipeline)."""
    from safetensors.torch import load_file

    base = load_file(base_path)
    flat_base = torch.cat([value.reshape(-1) for value in base.values()])
    rows = torch.empty(len(paths), flat_base.numel())
    for i, path in enumerate(paths):
        expert = load_file(path)
        torch.cat([expert[key].reshape(-1) for key in base], out=rows[i])
        del expert
    if method == "average":
        merged = rows.mean(0)
    else:
        rows -= flat_base  # task vectors
        merged = flat_base + (_naive_ties(rows, HPARAMS["ties"]["k"]) if method == "ties" else _naive_magmax(rows))
    out, start = {}, 0
    for key, value in base.items():
        out[key] = merged[start : start + value.numel()].reshape(value.shape).clone()
        start += value.numel()
    return out


def _naive_ties(rows: torch.Tensor, k: float) -> torch.Tensor:
    """prateeky2806/ties-merging: kthvalue trim per row, sign by mass, disjoint mean."""
    magnitudes = rows.abs()
    kth = magnitudes.kthvalue(rows.shape[1] - math.ceil(k * rows.shape[1]) + 1, dim=1, keepdim=True).values
    rows.mul_(magnitudes >= kth)
    del magnitudes
    sign = torch.sign(rows.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    rows.mul_(torch.where(sign > 0, rows > 0, rows < 0))
    return rows.sum(0) / (rows != 0).sum(0).clamp(min=1)


def _naive_magmax(rows: torch.Tensor) -> torch.Tensor:
    """danielm1405/magmax: per entry the task vector of largest magnitude, ties to the later expert."""
    index = rows.shape[0] - 1 - rows.abs().flip(0).argmax(0)
    return rows.gather(0, index.unsqueeze(0)).squeeze(0)


def worker(args: argparse.Namespace) -> None:
    directory = Path(args.dir)
    if args.worker == "generate":
        return generate(directory, args.n, args.params_scale, args.model)
    import timelit.merging as merging

    base, paths = directory / "base.safetensors", sorted(directory.glob("expert_*.safetensors"))[: args.n]
    start = time.perf_counter()
    if args.worker == "stream":
        threads = args.stream_threads or None
        hparams = HPARAMS[args.method]
        out = merging.merge(base, paths, args.method, chunk_size=args.chunk_size, threads=threads, **hparams)
    elif args.worker == "naive":
        with open("/proc/self/oom_score_adj", "w") as oom:
            oom.write("1000")  # on a shared machine, if memory runs out, this is the process to kill
        out = naive(args.method, base, paths)
    else:  # "idle": the interpreter, torch and timelit alone
        out = {}
    wall, peak = time.perf_counter() - start, peak_rss_mb()  # before the checksum's own temporaries
    checksum = sum(float(value.abs().sum(dtype=torch.float64)) for value in out.values())
    print(json.dumps({"wall_s": round(wall, 2), "peak_rss_mb": round(peak), "checksum": checksum}))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that across ``exec`` from the parent that
    spawned the worker, so every worker would report at least the parent's RSS."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def measure(args: argparse.Namespace, directory: Path, kind: str, method: str, n: int) -> dict:
    files = [directory / "base.safetensors", *sorted(directory.glob("expert_*.safetensors"))[:n]]
    for path in files:  # warm the page cache so both sides read from memory
        with open(path, "rb") as file:
            while file.read(1 << 24):
                pass
    command = [sys.executable, __file__, "--worker", kind, "--dir", str(directory), "--n", str(n), "--method", method]
    command += ["--chunk-size", str(args.chunk_size), "--stream-threads", str(args.stream_threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else f"exit {result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _proc(path: str, prefix: str) -> str:
    with open(path) as file:
        return next(line.split(":", 1)[1].strip() for line in file if line.startswith(prefix))


def machine() -> dict:
    return {
        "cpu": _proc("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "ram_gb": round(int(_proc("/proc/meminfo", "MemTotal").split()[0]) / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads_naive": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="merge_bench_", dir=args.tmp))
    try:
        generate_command = [sys.executable, __file__, "--worker", "generate", "--dir", str(directory)]
        generate_command += ["--n", str(max(args.sizes)), "--params-scale", str(args.params_scale)]
        subprocess.run([*generate_command, "--model", args.model], check=True)
        params = sum(math.prod(shape) for shape in model_shapes(args.model, args.params_scale).values())
        report = {
            "command": " ".join(sys.argv),
            "machine": machine(),
            "model": args.model,
            "params": params,
            "model_gb": round(params * 4 / 2**30, 3),
            "chunk_size": args.chunk_size,
            "stream_threads": args.stream_threads,
            "baseline": measure(args, directory, "idle", "average", 0),
            "runs": [],
        }
        for n in args.sizes:
            for method in args.methods:
                run = {"n": n, "method": method, "stream": measure(args, directory, "stream", method, n)}
                run["naive"] = naive_run(args, report, directory, method, n)
                run["load_average"] = os.getloadavg()[0]
                report["runs"].append(run)
                print(row(run), flush=True)
    finally:
        shutil.rmtree(directory)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))


def naive_run(args: argparse.Namespace, report: dict, directory: Path, method: str, n: int) -> dict:
    if method not in NAIVE_MODELS:
        return {"skipped": "no naive version"}
    a, b = NAIVE_MODELS[method]
    estimate = (a * n + b) * report["model_gb"] + report["baseline"]["peak_rss_mb"] / 1024
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) for line in meminfo if line.startswith("MemAvailable")) / 2**20
    if estimate > min(args.naive_limit_gb, 0.95 * available):
        return {"skipped": f"est. {estimate:.0f} GB"}
    return measure(args, directory, "naive", method, n)


def row(run: dict) -> str:
    def cell(result: dict) -> str:
        if "wall_s" not in result:
            return f"{result.get('skipped', 'error'):>22}"
        return f"{result['wall_s']:8.1f} s {result['peak_rss_mb'] / 1024:7.2f} GB"

    stream, naive = run["stream"], run["naive"]
    ratio = f"{naive['wall_s'] / stream['wall_s']:5.1f}x" if "wall_s" in naive and "wall_s" in stream else "     -"
    return (
        f"| {run['method']:14} | {run['n']:3} | {cell(stream)} | {cell(naive)} | {ratio} | {run['load_average']:4.1f} |"
    )


def table(report: dict) -> str:
    return "\n".join(
        [
            f"{report.get('model', 'ViT-B-16')}: {report['params'] / 1e6:.1f}M params ({report['model_gb']:.2f} GB "
            "in float32); "
            f"interpreter + torch alone: {report['baseline']['peak_rss_mb'] / 1024:.2f} GB RSS",
            "| method         |   N | stream: wall, peak RSS | naive: wall, peak RSS  | naive/stream | load |",
            "|---|---|---|---|---|---|",
            *(row(run) for run in report["runs"]),
        ]
    )


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 5, 10, 20], help="numbers of experts")
    parser.add_argument("--methods", nargs="+", default=list(HPARAMS), choices=list(HPARAMS))
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture whose shapes the experts have")
    parser.add_argument("--params-scale", type=float, default=1.0, help="shrink the first dimension of every tensor")
    parser.add_argument("--chunk-size", type=int, default=1 << 22)
    parser.add_argument("--stream-threads", type=int, default=1, help="merge(threads=...); 0 keeps torch's default")
    parser.add_argument("--naive-limit-gb", type=float, default=16.5, help="skip naive runs estimated above this")
    parser.add_argument("--tmp", default=None, help="where the temporary experts go (default: the system temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "merge_bench.json")
    parser.add_argument("--worker", choices=["generate", "stream", "naive", "idle"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="average", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    worker(arguments) if arguments.worker else main(arguments)
