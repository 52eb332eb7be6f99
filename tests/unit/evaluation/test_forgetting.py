"""The forgetting matrix, backward transfer, average forgetting and first-half drop against hand-computed values.

python -m pytest tests/unit/evaluation/test_forgetting.py -q
"""

from __future__ import annotations

import math

import pytest

from timelit.data.streams import Concept, Stream
from timelit.training.evaluation.forgetting import forgetting_matrix, from_results, own_tasks

# R[i][j] after i tasks (row 0 = zero-shot). A is trained by task 1, B by task 2, C by tasks 1 and 3 (a random stream
# spreads it: its own task is 3), E by task 4; D is evaluated as an adaptation dataset but never trained.
R = {
    0: {"A": 10, "B": 12, "C": 8, "D": 20, "E": 5},
    1: {"A": 60, "B": 15, "C": 30, "D": 21, "E": 6},
    2: {"A": 50, "B": 70, "C": 35, "D": 22, "E": 7},
    3: {"A": 65, "B": 65, "C": 80, "D": 19, "E": 9},
    4: {"A": 40, "B": 62, "C": 70, "D": 18, "E": 75},
}
TASK_DATASETS = [["A", "C"], ["B"], ["C"], ["E"]]


def points(matrix: dict[int, dict[str, float]]) -> list[dict]:
    """results.json points: the adaptation figures plus a held-out dataset, which is no column of the matrix."""
    return [
        {
            "tasks_done": tasks_done,
            "A_KA": 0.0,
            "datasets": {
                **{name: {"role": "adapt", "task": "classification", "figure": v} for name, v in row.items()},
                "HELD_OUT": {"role": "eval", "task": "classification", "figure": 90.0},
            },
        }
        for tasks_done, row in matrix.items()
    ]


def test_the_matrix_has_a_row_per_point_and_a_column_per_adaptation_dataset():
    matrix = forgetting_matrix(list(reversed(points(R))), TASK_DATASETS)
    assert matrix.tasks == [0, 1, 2, 3, 4]
    assert matrix.datasets == ["A", "B", "C", "D", "E"]
    assert matrix.values[3] == [65, 65, 80, 19, 9]
    assert matrix.own_task == {"A": 1, "B": 2, "C": 3, "D": None, "E": 4}


def test_bwt_forgetting_and_first_half_drop_match_the_hand_computed_values():
    matrix = forgetting_matrix(points(R), TASK_DATASETS)
    # t_j < T = 4: A, B, C (D never trained, E just learnt).
    assert matrix.counted("bwt") == matrix.counted("avg_forgetting") == ["A", "B", "C"]
    # BWT: A 40-60, B 62-70, C 70-80.
    assert matrix.bwt == pytest.approx((-20 - 8 - 10) / 3)
    # Forgetting: A max(60, 50, 65) - 40 = 25, B max(70, 65) - 62 = 8, C 80 - 70 = 10.
    assert matrix.avg_forgetting == pytest.approx((25 + 8 + 10) / 3)
    # First half (t_j <= 2): A 60 - 40, B 70 - 62.
    assert matrix.counted("first_half_drop") == ["A", "B"]
    assert matrix.first_half_drop == pytest.approx(14.0)


def test_the_history_gives_the_numbers_as_they_stood_after_each_task():
    history = {h["tasks_done"]: h for h in forgetting_matrix(points(R), TASK_DATASETS).to_dict()["history"]}
    assert all(math.isnan(history[1][k]) for k in ("bwt", "avg_forgetting", "first_half_drop"))  # nothing to forget
    assert history[2] == {"tasks_done": 2, "bwt": -10.0, "avg_forgetting": 10.0, "first_half_drop": 10.0}
    # T = 3: A 65 - 60 and B 65 - 70; A's best before 3 was 60 < 65 (negative forgetting); first half: A alone.
    assert history[3] == {"tasks_done": 3, "bwt": 0.0, "avg_forgetting": 0.0, "first_half_drop": -5.0}


def test_an_unfinished_run_measures_up_to_its_last_point_and_leaves_unreached_datasets_out():
    matrix = forgetting_matrix(points({t: R[t] for t in (0, 1, 2)}), TASK_DATASETS)
    assert matrix.last == 2
    assert matrix.counted("bwt") == ["A"]
    assert matrix.bwt == -10.0


def test_missing_figures_drop_only_the_numbers_that_need_them():
    broken = {t: dict(row) for t, row in R.items()}
    broken[1]["A"] = None  # a null in results.json: A's own-task figure is unknown
    matrix = forgetting_matrix(points(broken), TASK_DATASETS)
    assert math.isnan(matrix.figure(1, "A"))
    assert matrix.bwt == pytest.approx((-8 - 10) / 2)  # A has no R[t_A]
    assert matrix.avg_forgetting == pytest.approx((25 + 8 + 10) / 3)  # A's best is still 65 (after task 3)
    assert matrix.first_half_drop == pytest.approx(8.0)


def test_a_random_stream_gives_each_dataset_the_last_task_that_trains_it():
    stream = Stream(
        name="random",
        tasks=[[Concept("A", "x"), Concept("C", "y")], [Concept("B", "z"), Concept("A", "w")], [Concept("C", "v")]],
        labels=[{}, {}, {}],
    )
    assert stream.task_datasets == [["A", "C"], ["B", "A"], ["C"]]
    assert own_tasks(stream.task_datasets) == {"A": 2, "C": 3, "B": 2}


def test_the_results_section_and_a_header_without_task_datasets():
    data = {"run": {"data": {"task_datasets": TASK_DATASETS}}, "points": points(R)}
    section = from_results(data).to_dict()
    assert section["rows"] == [0, 1, 2, 3, 4] and section["columns"] == ["A", "B", "C", "D", "E"]
    assert section["own_task"] == [1, 2, 3, None, 4]
    assert section["matrix"][4] == [40, 62, 70, 18, 75]
    assert section["first_half_drop"] == pytest.approx(14.0)
    assert section["counted"]["first_half_drop"] == ["A", "B"]
    assert from_results({"run": {"data": {}}, "points": points(R)}) is None
