"""ExpertStore and the safetensors helpers: atomic writes, task order, a checkpointable index."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch

from timelit.merging import ExpertStore, load_weights, read_metadata, safetensors_io, save_weights


def test_experts_round_trip_with_metadata_in_task_order(tmp_path, clip_base):
    store = ExpertStore(tmp_path)
    for task in (3, 1, 2):
        store.add(task, {"w": torch.full((2,), float(task))}, metadata={"stream": "random_1"})
    assert store.tasks == [1, 2, 3] and len(store) == 3 and 2 in store
    assert [p.name for p in store] == ["expert_0001.safetensors", "expert_0002.safetensors", "expert_0003.safetensors"]
    assert store.load(2)["w"].tolist() == [2.0, 2.0]
    assert store.metadata(3) == {"stream": "random_1", "timelit.task": "3"}
    assert ExpertStore(tmp_path).tasks == [1, 2, 3]  # re-opened from the directory
    with pytest.raises(KeyError, match=r"no expert for task 7 .* stored tasks: \[1, 2, 3\]"):
        store.load(7)


def test_files_are_plain_safetensors_and_non_contiguous_tensors_are_stored_by_value(tmp_path):
    matrix = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": matrix.t(), "h": torch.ones(3, dtype=torch.bfloat16), "i": torch.arange(3), "s": torch.tensor(2.5)}
    save_weights(tmp_path / "x.safetensors", tensors, {"a": "b"})
    for loaded in (safetensors.torch.load_file(tmp_path / "x.safetensors"), load_weights(tmp_path / "x.safetensors")):
        assert all(
            torch.equal(loaded[key], value) and loaded[key].dtype == value.dtype for key, value in tensors.items()
        )
    safetensors.torch.save_file({"v": matrix}, tmp_path / "y.safetensors", metadata={"k": "v"})
    assert torch.equal(load_weights(tmp_path / "y.safetensors")["v"], matrix)
    assert read_metadata(tmp_path / "y.safetensors") == {"k": "v"}
    with pytest.raises(ValueError, match="metadata must map strings to strings"):
        save_weights(tmp_path / "z.safetensors", tensors, {"task": 3})


def test_a_failure_mid_write_leaves_the_previous_expert_and_no_temporary_file(tmp_path, monkeypatch):
    store = ExpertStore(tmp_path)
    store.add(0, {"w": torch.zeros(4)})
    original = safetensors_io._serialised

    def crash_after_header(header, tensors):
        yield from list(original(header, tensors))[:1]
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io, "_serialised", crash_after_header)
    with pytest.raises(OSError, match="disk full"):
        store.add(0, {"w": torch.ones(4)})
    with pytest.raises(OSError, match="disk full"):
        store.add(1, {"w": torch.ones(4)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_0000.safetensors"]
    assert store.load(0)["w"].tolist() == [0.0] * 4


def test_a_process_killed_mid_write_leaves_no_expert_file(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, torch
        from timelit.merging import ExpertStore, safetensors_io
        original = safetensors_io._serialised
        def die_mid_write(header, tensors):
            parts = original(header, tensors)
            yield next(parts)
            yield next(parts)
            os._exit(9)  # killed: no cleanup runs
        safetensors_io._serialised = die_mid_write
        ExpertStore({str(tmp_path)!r}).add(0, {{"a": torch.ones(1000), "b": torch.ones(1000)}})
        """
    )
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 9
    assert not (tmp_path / "expert_0000.safetensors").exists()
    assert len(ExpertStore(tmp_path)) == 0  # the half-written temporary file is never listed


def test_the_index_round_trips_through_a_checkpoint(tmp_path):
    store = ExpertStore(tmp_path)
    for task in range(3):
        store.add(task, {"w": torch.full((3,), float(task))})
    checkpoint = {"experts": store.state_dict()}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["experts"]

    store.add(3, {"w": torch.ones(3)})  # written after the checkpoint, then the run crashed
    resumed = ExpertStore(tmp_path)
    with pytest.warns(UserWarning, match=r"ignoring experts of tasks \[3\]"):
        resumed.load_state_dict(state)
    assert resumed.tasks == [0, 1, 2] and resumed.state_dict() == state
    resumed.add(3, {"w": torch.full((3,), 9.0)})  # the re-run task replaces the stale file
    assert resumed.tasks == [0, 1, 2, 3] and resumed.load(3)["w"].tolist() == [9.0] * 3


def test_a_changed_or_missing_expert_is_detected_on_resume(tmp_path):
    store = ExpertStore(tmp_path)
    store.add(0, {"w": torch.zeros(3)})
    store.add(1, {"w": torch.zeros(3)})
    state = store.state_dict()
    save_weights(store.path(1), {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="expert of task 1 changed since the checkpoint was saved"):
        ExpertStore(tmp_path).load_state_dict(state)
    store.path(0).unlink()
    with pytest.raises(FileNotFoundError, match="expert of task 0 listed in the checkpoint is missing"):
        ExpertStore(tmp_path).load_state_dict(state)


def test_files_get_the_permissions_a_plain_open_would_give(tmp_path):
    previous = os.umask(0o022)
    try:
        path = ExpertStore(tmp_path).add(0, {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600: other users of a cluster group can read
