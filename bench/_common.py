"""Helpers shared by the benchmarks: the machine record, medians, peak memory, tables, the JSON report, the options
every script takes (`--out`, `--quick`) and the data module on a synthesized benchmark.

    python bench/train_overhead.py --quick        (every script in bench/ uses these)

Every benchmark writes `bench/results/<name>.json` holding the command, the machine (CPU, cores, load averages at
start and end, torch version and threads) and its measurements, and prints a Markdown table. The machine the numbers
in bench/README.md come from is a shared 2-core VM whose load is often 3-10, so the scripts alternate the things they
compare and report medians; the load is recorded with every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICKSTART = "~/.cache/timelit/quickstart"  # what `timelit fit --config quickstart.yaml` writes: the default data
QUICK_DATA = Path(tempfile.gettempdir()) / "timelit_bench_quick"  # --quick's tiny benchmark instead
SYNTH_POOL = "SYNTH_POOL"  # the pretraining pool timelit.data.synth writes (its POOL_NAME)


def _proc(path: str, prefix: str) -> str:
    with open(path) as file:
        return next((line.split(":", 1)[1].strip() for line in file if line.startswith(prefix)), "?")


def machine() -> dict[str, Any]:
    """What the numbers were measured on (the load average is the 1/5/15-minute one at the call)."""
    import torch

    return {
        "cpu": _proc("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "ram_gb": round(int(_proc("/proc/meminfo", "MemTotal").split()[0]) / 2**20, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def write_report(name: str, report: dict[str, Any], out_dir: Path | None = None) -> Path:
    """`<out_dir>/<name>.json` with the command and the machine at the end of the run added."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": name, "command": "python " + " ".join(sys.argv), **report, "machine_at_end": machine()}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    return path


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats get 3 significant decimals unless already formatted."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def benchmark_args(
    parser: argparse.ArgumentParser, argv: list[str] | None, quick: dict[str, Any], quick_help: str | None = None
) -> argparse.Namespace:
    """`parser`'s arguments and the two every benchmark takes: `--out`, the folder of its JSON report, and `--quick`,
    which sets the options in `quick` (the smoke test's sizes, over whatever the command line said) and moves a
    `--data-root` left at QUICKSTART to QUICK_DATA, so that a quick run never writes into the user's benchmark."""
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in quick.items():
            setattr(args, name, copy.deepcopy(value))  # a run may change its lists; the next parse gets fresh ones
        if getattr(args, "data_root", None) == QUICKSTART:
            args.data_root = str(QUICK_DATA)
    return args


def synthetic_data(root: str | Path, bundle: Any, data_class: Any = None, **options: Any) -> Any:
    """`data_class` (default TimeDataModule) on the benchmark timelit.data.synth wrote at `root` (its manifests beside
    the data, the random stream, SYNTH_POOL for pretraining), set up for fit with the transforms and tokenizer of
    `bundle` (build_clip's); `options` are the data module's other arguments."""
    from timelit.data.datamodule import Preprocessing, TimeDataModule

    data_class = data_class or TimeDataModule
    data = data_class(str(root), manifests=str(root), stream="random", pretraining_pool=SYNTH_POOL, **options)
    data.set_preprocessing(Preprocessing(bundle.train_transform, bundle.eval_transform, bundle.tokenizer))
    data.setup("fit")
    return data


# --------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    return float(_proc("/proc/self/status", "VmHWM").split()[0]) / 1024


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(p) for p in file.read().split()]
    except OSError:
        return []


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (the forked workers' copy of the parent) counted once overall."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            return next(int(line.split()[1]) for line in file if line.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0


class TreeMemory:
    """Samples the PSS of this process and all its descendants (loader workers) every `interval` seconds and keeps
    the peak of their sum: what the pipeline holds in memory, counting pages shared after fork once."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[int]:
        pids, todo = [], [os.getpid()]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += _children(pid)
        return pids

    def sample(self) -> float:
        total = sum(_pss_kb(pid) for pid in self._tree()) / 1024
        self.peak_mb = max(self.peak_mb, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def quiet_logs() -> None:
    """Keep Lightning's and timelit's per-run INFO lines out of the benchmark's table."""
    import logging
    import warnings

    import lightning  # noqa: F401  (it sets its loggers to INFO when imported: import first, then lower them)

    os.environ.setdefault("TIMELIT_LOG_LEVEL", "WARNING")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "timelit"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*srun.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
