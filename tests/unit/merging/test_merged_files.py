"""The files a TIME run keeps beside its experts: names, which are kept, the checkpoint's record, disk space."""

from __future__ import annotations

import pytest
import torch

from timelit.merging import ExpertStore, validate
from timelit.merging import merged_files as mf
from timelit.merging.merged_files import MergedFiles, recorded_file

WEIGHTS = {"w": torch.arange(4.0)}


def _boundaries(files: MergedFiles, tasks: range) -> None:
    for task in tasks:
        files.store.add(task, WEIGHTS)
        files.state(task).write_bytes(b"state")
        for kind in files.kinds:
            files.save(kind, task, WEIGHTS, {"timelit.kind": kind})
        files.prune(task)


def test_only_the_last_two_tasks_merged_files_and_states_are_kept(tmp_path):
    files = MergedFiles(ExpertStore(tmp_path), ("ema", "all"))
    _boundaries(files, range(4))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        *(f"all_{t:04d}.safetensors" for t in (2, 3)),
        *(f"all_state_{t:04d}.safetensors" for t in (2, 3)),
        *(f"ema_{t:04d}.safetensors" for t in (2, 3)),
        *(f"expert_{t:04d}.safetensors" for t in range(4)),  # every expert: `all` and `timelit merge` read them
    ]
    assert sorted(files.hashes) == [n for n in names if n.startswith(("all_0", "ema_"))]


def test_keep_merged_keeps_every_merged_file_but_not_the_states(tmp_path):
    files = MergedFiles(ExpertStore(tmp_path), ("ft_zs",), keep_merged=True)
    _boundaries(files, range(4))
    assert sorted(p.name for p in tmp_path.glob("ft_zs_*")) == [f"ft_zs_{t:04d}.safetensors" for t in range(4)]
    assert sorted(p.name for p in tmp_path.glob("all_state_*")) == [
        "all_state_0002.safetensors",
        "all_state_0003.safetensors",
    ]


def test_a_restore_forgets_pruned_files_and_refuses_changed_ones(tmp_path):
    files = MergedFiles(ExpertStore(tmp_path), ("ema",))
    _boundaries(files, range(2))
    recorded = dict(files.hashes)  # a checkpoint after task 1: ema_0000 and ema_0001
    _boundaries(files, range(2, 3))  # the next boundary ran and pruned ema_0000 before the run was killed
    resumed = MergedFiles(ExpertStore(tmp_path), ("ema",))
    resumed.restore(recorded, finished_task=1)
    assert list(resumed.hashes) == ["ema_0001.safetensors"]
    files.path("ema", 1).write_bytes(b"changed")
    with pytest.raises(FileNotFoundError, match=r"ema_0001\.safetensors: merged weights listed in the checkpoint"):
        MergedFiles(ExpertStore(tmp_path), ("ema",)).restore(recorded, finished_task=1)


def test_the_checkpoint_records_the_deployed_file_of_each_kind(tmp_path):
    files = MergedFiles(ExpertStore(tmp_path), ("ema",))
    _boundaries(files, range(1))
    state = {"store": files.store.state_dict(), "merged": files.hashes}
    assert recorded_file(state, "ema", 0) == ("ema_0000.safetensors", files.hashes["ema_0000.safetensors"])
    assert recorded_file(state, "ft", 0) == ("expert_0000.safetensors", files.store.index()[0]["sha256"])
    assert recorded_file(state, "ema", 5) == ("ema_0005.safetensors", None)


def test_a_boundary_reserves_every_file_it_writes_and_names_them_when_short(tmp_path, monkeypatch):
    files = MergedFiles(ExpertStore(tmp_path / "experts"), ("all", "ema"))
    seen = {}

    def short(needs):
        seen.update(needs)
        return ["the disk is full"]

    monkeypatch.setattr(mf, "space_shortfalls", short)
    base = {"w": torch.zeros(20), "step": torch.zeros(5, dtype=torch.int64)}  # 120 bytes, 20 floating
    folded = validate("ties", {})  # the running state: 4 float32 fields per floating entry
    message = files.boundary_shortfall(3, base, folded, tmp_path / "final_model.safetensors", tmp_path / "checkpoints")
    assert seen == {tmp_path / "experts": 3 * 120 + 4 * 4 * 20, tmp_path: 120, tmp_path / "checkpoints": 360}
    assert message.startswith(
        "not enough disk space for the files of task 3's boundary (expert_0003.safetensors, all_0003.safetensors, "
        "ema_0003.safetensors, all_state_0003.safetensors, final_model.safetensors, last.ckpt): the disk is full."
    )
    monkeypatch.setattr(mf, "space_shortfalls", lambda needs: [])
    assert files.boundary_shortfall(3, base, None, None, None) is None
