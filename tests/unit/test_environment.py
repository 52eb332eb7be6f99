"""What results.json records of the software and machine (timelit.utilities.environment)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

from timelit.utilities.environment import NUMERIC_FIELDS, differences, run_environment

REPO = Path(__file__).resolve().parents[2]


def test_the_environment_names_versions_device_and_threads() -> None:
    environment = run_environment()
    assert set(NUMERIC_FIELDS) <= set(environment)
    assert environment["torch"] == torch.__version__ and environment["torch_threads"] == torch.get_num_threads()
    assert environment["device"] == environment["cpu"] != ""  # no trainer on a GPU: the CPU computed
    if (REPO / ".git").exists():  # an editable install from a checkout: the commit that ran, marked if edited
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert environment["commit"].removesuffix("+dirty") == head.stdout.strip()


def test_differences_name_the_runs_on_each_side() -> None:
    same = {"torch": "2.14.1", "torch_threads": 1, "device": "cpu A"}
    runs = {"a": same, "b": same | {"host": "other node"}, "c": same | {"torch_threads": 2}}
    assert differences(runs) == {"torch_threads": {1: ["a", "b"], 2: ["c"]}}  # the host is not compared
    assert differences({"a": same, "b": dict(same)}) == {}
