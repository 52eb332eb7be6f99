"""`timelit fit` with DDP over 2 CPU processes (gloo): ranks read disjoint samples, take the same number of steps,
and hold identical weights at every task start, every evaluation and the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
TIMELIT = Path(sys.executable).parent / "timelit"  # the console script beside this interpreter, venv active or not


@pytest.mark.slow
@pytest.mark.ddp
def test_two_ranks_split_data_and_agree_on_every_merge(tiny_benchmark, tmp_path, quick_fit_args):
    args = quick_fit_args(
        tiny_benchmark, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.callbacks+=probes.RankProbe", "--protocol.init", "all", "--protocol.deploy", "ema",
        tasks=3, steps=3,
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([str(TIMELIT), *args], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    run = tmp_path / "run"
    ranks = [json.loads((run / f"probe_rank{r}.json").read_text()) for r in range(2)]
    assert {r["world_size"] for r in ranks} == {2}
    steps = [[(task, step) for task, step, _ in r["keys"]] for r in ranks]
    assert steps[0] == steps[1] and len(steps[0]) == 9  # same steps, 3 tasks x 3
    for (_, _, keys0), (_, _, keys1) in zip(ranks[0]["keys"], ranks[1]["keys"]):
        assert len(keys0) == len(keys1) == 8  # the global batch of 16 split evenly
        assert not set(keys0) & set(keys1), "a sample was read by both ranks in the same step"
    for field in ("starts", "evaluated"):
        assert ranks[0][field] == ranks[1][field] and len(ranks[0][field]) == 3
    assert ranks[0]["final_live"] == ranks[1]["final_live"]
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] and [p["tasks_done"] for p in results["points"]] == [0, 1, 2, 3]
    assert (run / "final_model.safetensors").exists()
