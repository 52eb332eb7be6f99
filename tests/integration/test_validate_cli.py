"""`timelit validate` and `timelit test` on the checkpoint of a finished fit, as a user runs them.

    python -m pytest tests/integration/test_validate_cli.py -q

Which weights the commands evaluate is TimeMerge's business (tests/integration/test_time_merge.py); here the
commands must run and leave their records beside the run's results.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean

import pytest

from timelit.commands.cli import run_lightning


def check_record(path: Path, datasets: set[str]) -> None:
    """A full-split record of every evaluation dataset whose summary is the one its figures give."""
    record = json.loads(path.read_text())
    assert record["scope"] == "full"
    assert set(record["datasets"]) == datasets
    for name, entry in record["datasets"].items():
        assert 0.0 <= entry["figure"] <= 100.0 and entry["n"] > 0, name
    by_role = {
        role: mean(e["figure"] for e in record["datasets"].values() if e["role"] == role) for role in ("adapt", "eval")
    }
    assert record["A_KA"] == pytest.approx(by_role["adapt"])
    assert record["A_ZS"] == pytest.approx(by_role["eval"])
    assert record["GM"] == pytest.approx(math.sqrt(by_role["adapt"] * by_role["eval"]))


@pytest.mark.slow
def test_validate_and_test_write_their_records_for_a_checkpoint(tiny_benchmark, tmp_path, quick_fit_args):
    args = quick_fit_args(tiny_benchmark, tmp_path, tasks=1, steps=2)
    run_lightning(args)
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "last.ckpt"
    # The datasets of the fit's own full evaluation after the stream: the streamed adaptation sets and the held out.
    datasets = set(json.loads((run / "results.json").read_text())["full"]["end"]["datasets"])
    assert len(datasets) > 2

    for command in ("validate", "test"):
        run_lightning([command, *args[1:], "--ckpt_path", str(checkpoint)])
        check_record(run / f"{command}_results.json", datasets)
