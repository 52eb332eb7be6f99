"""Seeds derived from integers, and seeding that costs microseconds rather than milliseconds.

timelit reseeds often: the training step from (seed, rank, global step), so a resumed run draws what an uninterrupted
one draws; every augmented sample from (seed, task, batch, source, slot), so a batch does not depend on which worker
built it. `torch.manual_seed` is the wrong tool at that rate: in a process where CUDA (or XPU/MTIA) is not
initialised, which is every CPU run and every loader worker, it queues a lazy seeding call for each device type
together with `traceback.format_stack()`, 0.1-2 ms per call depending on the stack depth (bench/train_overhead.py
measured it at about a third of the pipeline's cost with 0 workers). Seeding the CPU generator, and the current CUDA
device only where CUDA is up, draws the same numbers for everything timelit does.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike `hash` of a tuple containing strings)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def seed_torch_cpu(seed: int) -> None:
    """Seed torch's CPU generator only (augmentations and everything else that runs on the CPU)."""
    torch.default_generator.manual_seed(int(seed))


def seed_step(seed: int) -> None:
    """Seed Python, NumPy, torch's CPU generator and, when in use, the current CUDA / XPU device or MPS (dropout).

    One process drives one device under DDP, so the current device is the only CUDA generator a step draws from.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    seed_torch_cpu(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed(int(seed))
    if hasattr(torch, "xpu") and torch.xpu.is_initialized():
        torch.xpu.manual_seed(int(seed))
    if torch.backends.mps.is_available():  # no lazy queue on MPS: seeding it directly is cheap
        torch.mps.manual_seed(int(seed))
