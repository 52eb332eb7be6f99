"""TaskResults writes the forgetting matrix into results.json and TensorBoard, from the stream's datasets per task.

python -m pytest tests/unit/callbacks/test_results.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from timelit.data.mixture import Mixture
from timelit.data.streams import Concept, Stream
from timelit.training.callbacks.results import TaskResults


class Writer:
    """What TaskResults uses of a SummaryWriter, recording the calls."""

    def __init__(self) -> None:
        self.scalars: dict[str, dict[int, float]] = {}
        self.texts: dict[str, str] = {}

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.setdefault(tag, {})[global_step] = value

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self.texts[tag] = text

    def flush(self) -> None:
        pass


def trainer(run_dir: Path, writer: Writer) -> SimpleNamespace:
    """A dataset-incremental stream of 3 tasks: A, then B, then C."""
    stream = Stream("incremental", [[Concept(name, "x")] for name in "ABC"], [{}, {}, {}])
    datamodule = SimpleNamespace(  # what timelit.training.contracts.TaskStream promises
        stream=stream,
        num_tasks=3,
        mixture=Mixture(0.0, 1.0, 0.0),
        seed=7,
        batch_size=8,
        steps_per_task=2,
        stream_spec="incremental",
        manifests_spec="test",
        eval_specs=[],
        set_steps_per_task=lambda steps: None,
    )
    return SimpleNamespace(
        log_dir=str(run_dir),
        default_root_dir=str(run_dir),
        lightning_module=None,
        datamodule=datamodule,
        callbacks=[],
        loggers=[SimpleNamespace(experiment=writer)],
    )


def point(tasks_done: int, a: float, b: float, c: float) -> dict:
    adapt = {"role": "adapt", "task": "classification"}
    datasets = {"A": {**adapt, "figure": a}, "B": {**adapt, "figure": b}, "C": {**adapt, "figure": c}}
    return {"tasks_done": tasks_done, "A_KA": (a + b + c) / 3, "A_ZS": 50.0, "GM": 0.0, "datasets": datasets}


def test_results_json_and_tensorboard_hold_the_forgetting_matrix(tmp_path):
    writer = Writer()
    fake = trainer(tmp_path, writer)
    callback = TaskResults()
    rows = [point(0, 10, 10, 10), point(1, 80, 12, 11), point(2, 60, 90, 12), point(3, 50, 70, 95)]
    for row in rows:
        callback.points.append(row)
        callback._write(fake)
        callback._log_tensorboard(fake, row, {"datasets": {}, "scope": "subset"}, callback._forgetting(fake))
    callback._log_matrix(fake)

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["run"]["data"]["task_datasets"] == [["A"], ["B"], ["C"]]
    assert data["run"]["data"]["mixture"] == {"pretraining": 0.0, "current": 1.0, "replay": 0.0}
    forgetting = data["forgetting"]
    assert forgetting["rows"] == [0, 1, 2, 3] and forgetting["columns"] == ["A", "B", "C"]
    assert forgetting["matrix"][2] == [60, 90, 12]
    # T = 3: A 50 - 80, B 70 - 90; forgetting from the best since the own task; first half (t_j <= 1.5): A.
    assert forgetting["bwt"] == pytest.approx(-25.0)
    assert forgetting["avg_forgetting"] == pytest.approx(25.0)
    assert forgetting["first_half_drop"] == pytest.approx(30.0)
    assert forgetting["history"][0] == {"tasks_done": 1, "bwt": None, "avg_forgetting": None, "first_half_drop": None}

    assert writer.scalars["forgetting/bwt"] == {2: -20.0, 3: -25.0}  # after 1 task nothing can be forgotten yet
    assert writer.scalars["forgetting/first_half_drop"] == {2: 20.0, 3: 30.0}
    assert "| 3 | 50.0 | 70.0 | 95.0 |" in writer.texts["forgetting/matrix"]


def test_without_a_stream_the_section_is_null(tmp_path):
    fake = trainer(tmp_path, Writer())
    fake.datamodule = SimpleNamespace(num_tasks=1)  # e.g. a data module of another kind
    callback = TaskResults()
    callback.points.append(point(0, 10, 10, 10))
    callback._write(fake)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["forgetting"] is None and "data" not in data["run"]  # no task stream, no data header
    assert not math.isnan(data["points"][0]["A_KA"])


def test_the_environment_of_the_points_is_recorded_and_survives_a_resume(tmp_path):
    torch = pytest.importorskip("torch")
    fake = trainer(tmp_path, Writer())
    fake.accelerator, fake.precision, fake.world_size = SimpleNamespace(), "32-true", 1
    threads = torch.get_num_threads()
    callback = TaskResults()
    try:
        torch.set_num_threads(2)
        callback._note_environment(fake, 0)
        callback._note_environment(fake, 1)  # nothing changed: no second entry
        resumed = TaskResults()
        resumed.load_state_dict(json.loads(json.dumps(callback.state_dict())))  # through a checkpoint's JSON-able state
        torch.set_num_threads(1)  # resumed elsewhere, with one thread
        resumed._note_environment(fake, 2)
        resumed.points.append(point(0, 10, 10, 10))
        resumed._write(fake)
    finally:
        torch.set_num_threads(threads)
    environments = json.loads((tmp_path / "results.json").read_text())["environments"]
    assert [(e["from_tasks_done"], e["torch_threads"]) for e in environments] == [(0, 2), (2, 1)]
    assert environments[0]["torch"] == torch.__version__ and environments[0]["precision"] == "32-true"
    assert environments[0]["device"] and environments[0]["world_size"] == 1
