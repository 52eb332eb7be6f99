"""TimeMerge's wiring: its settings are the protocol's, recorded in results.json, and it reads the module, the data
module and the checkpoint callback through timelit.training.contracts."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import timelit.merging.merged_files as merged_files
from timelit.training.callbacks.time_merge import TimeMerge

BASE = {"w": torch.zeros(3)}


class _Strategy:
    def barrier(self, name: str | None = None) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


def _trainer(task: int, run_dir: Path, **fields: Any) -> Any:
    values = {
        "is_global_zero": True,
        "strategy": _Strategy(),
        "callbacks": [],
        "current_epoch": task,
        "datamodule": None,
        "max_epochs": 3,
        "checkpoint_callback": None,
        "log_dir": str(run_dir),
        "default_root_dir": str(run_dir),
    }
    return SimpleNamespace(**{**values, **fields})


def test_settings_are_checked_when_the_callback_is_built_and_recorded_as_given():
    with pytest.raises(ValueError, match="all_weighting='linear' has no effect"):
        TimeMerge(init="ema", deploy="ema", all_weighting="linear")
    merge = TimeMerge(init="zs", deploy="all", all_weighting="linear", all_include_base=True)
    assert merge.run_record(None)["protocol"] == {
        "init": "zs",
        "deploy": "all",
        "technique": "interpolation",
        "hparams": {},
        "ema_weight": 0.5,
        "ema_start": "base",
        "all_weighting": "linear",
        "all_include_base": True,
    }


def test_a_module_without_zero_shot_weights_is_named_at_the_start_of_fit(tmp_path):
    merge = TimeMerge(init="ft", deploy="ft")
    merge.setup(_trainer(0, tmp_path), SimpleNamespace(), "fit")
    with pytest.raises(RuntimeError, match="needs a LightningModule with `zero_shot_weights`"):
        merge.on_fit_start(_trainer(0, tmp_path), SimpleNamespace(model=None))


@pytest.mark.parametrize("checkpoints", [True, False])
def test_the_last_task_reserves_the_final_model_and_a_checkpoint_folder_its_last_ckpt(
    tmp_path, monkeypatch, checkpoints
):
    seen: dict[Path, int] = {}
    monkeypatch.setattr(merged_files, "space_shortfalls", lambda needs: seen.update(needs) or [])
    merge = TimeMerge(init="ft", deploy="ft")
    fields = {"checkpoint_callback": SimpleNamespace(dirpath=str(tmp_path / "ckpt"))} if checkpoints else {}
    # No task stream in the data module: the number of tasks is max_epochs, so task 2 is the last.
    trainer = _trainer(2, tmp_path, **fields)
    merge.setup(trainer, SimpleNamespace(), "fit")
    module = SimpleNamespace(model=SimpleNamespace(state_dict=lambda: BASE), zero_shot_weights=BASE)
    merge.finish_task(trainer, module, 2)
    expected = {tmp_path / "experts": 12, tmp_path: 12} | ({tmp_path / "ckpt": 36} if checkpoints else {})
    assert seen == expected
