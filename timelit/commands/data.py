"""`timelit data synth`: the procedural quickstart benchmark (timelit/data/synth.py).

    timelit data synth --out ~/.cache/timelit/quickstart

The other `timelit data` subcommands (new, prepare, verify, stream) are still defined beside their work in
timelit/data/ (issue 19 item 3 splits that package; their functions come here then).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


def synth_command(
    out: str = "~/.cache/timelit/quickstart",
    seed: int = 0,
    scale: float = 1.0,
    base_model: str = "timelit-tiny-ViT",
    base_steps: int = 800,
    force: bool = False,
    size: Literal["quickstart", "science"] = "quickstart",
) -> None:
    """Write the embedded quickstart benchmark (shards, manifests, stream, pool) and train its base model.

    Takes about three minutes on two CPU cores; does nothing when OUT already holds a complete benchmark.

    Args:
        out: folder to write into (the quickstart config reads ~/.cache/timelit/quickstart).
        seed: seed of every drawing and of the base model's training.
        scale: multiplies the size of every dataset and of the pool.
        base_model: open_clip architecture of the base model (the config's model.model_name must match).
        base_steps: training steps of the base model on the pool (batch 128).
        force: write everything again even if OUT is complete.
        size: `quickstart` (3 held-out and 4 adaptation datasets, the default run's) or `science` (the same and 8
            more adaptation datasets: the 12-dataset horizons of configs/sweeps/scaling.yaml).
    """
    from timelit.data.synth import READY_FILE, synthesize

    root = synthesize(out, seed=seed, scale=scale, base_model=base_model, base_steps=base_steps, force=force, size=size)
    report = json.loads((Path(root) / READY_FILE).read_text())
    print(f"quickstart benchmark in {root}")
    print(f"{'dataset':<12}{'role':<7}{'zero-shot':>10}{'chance':>8}")
    for name, row in sorted(report["zero_shot"].items(), key=lambda kv: (kv[1]["role"], kv[0])):
        print(f"{name:<12}{row['role']:<7}{row['figure']:>10.1f}{row['chance']:>8.1f}")
