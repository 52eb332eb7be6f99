"""The software and machine a run's figures were computed with, recorded in results.json beside the figures.

    run_environment(trainer)   ->  {"timelit": "0.1.0", "commit": "47fe5a3…", "torch": "2.14.1", "torch_threads": 2,
                                    "device": "Intel(R) Xeon(R) …", "precision": "32-true", "world_size": 1, …}

Why it is in the results. On a CPU the number of torch threads changes the order of float sums, and over a 400-step
quickstart run that moves the final GM about as much as another seed does (docs/science.md); a base model trained on
another VM scored 1.9 A_KA points apart. Runs of one study are comparable only when these agree, so `timelit report`
warns when they do not (`NUMERIC_FIELDS`), and a reader can tell which machine and which code made a figure.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

NUMERIC_FIELDS = ("commit", "torch", "open_clip", "device", "torch_threads", "precision", "world_size")
"""What can change a run's numbers for the same config and seed. The host name, Python and Lightning versions are
recorded too but are not compared: Slurm spreads one study over many nodes of one kind."""


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; empty off Linux, where `platform.processor()` is used instead."""
    try:
        with open("/proc/cpuinfo") as file:
            return next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), "")
    except OSError:
        return ""


def _source_commit() -> str | None:
    """The git commit of the timelit source when it runs from a checkout (`pip install -e .`), with `+dirty` when
    tracked files differ from it; None for an installed wheel or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit


@functools.cache
def _static() -> dict[str, Any]:
    """What cannot change while the process runs (computed once: git is a subprocess)."""
    import torch  # here, not at the top: `timelit report` uses `differences` and must start without torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    return {
        "timelit": _version("timelit"),
        "commit": _source_commit(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion, which weights_only checkpoint loading refuses
        "lightning": _version("lightning"),
        "open_clip": _version("open_clip_torch"),
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "gpus": gpus,
        "host": platform.node(),
    }


def run_environment(trainer: Any = None) -> dict[str, Any]:
    """The environment of this process for `trainer`'s run: software versions, the device that computed (the GPU
    model on a GPU run, the CPU model otherwise), torch's thread count, precision and world size."""
    import torch

    static = _static()
    accelerator = type(trainer.accelerator).__name__ if trainer is not None else None
    on_gpu = accelerator == "CUDAAccelerator" and static["gpus"]
    return {
        **static,
        "device": static["gpus"][0] if on_gpu else static["cpu"],
        "accelerator": accelerator,
        "torch_threads": torch.get_num_threads(),
        "precision": str(trainer.precision) if trainer is not None else None,
        "world_size": int(trainer.world_size) if trainer is not None else 1,
    }


def differences(environments: dict[str, dict[str, Any]]) -> dict[str, dict[Any, list[str]]]:
    """For each NUMERIC_FIELDS field on which the named environments disagree: value -> the names that have it."""
    found: dict[str, dict[Any, list[str]]] = {}
    for field in NUMERIC_FIELDS:
        values: dict[Any, list[str]] = {}
        for name, environment in environments.items():
            values.setdefault(environment.get(field), []).append(name)
        if len(values) > 1:
            found[field] = values
    return found
