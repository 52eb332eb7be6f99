"""TimeMerge carries `all` as running state (issue 17, item 2): a boundary that dies while folding resumes from the
task-end checkpoint before it to the files of an uninterrupted stream."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import open_clip
import pytest
import torch

from timelit.merging import merge, running
from timelit.training.callbacks.time_merge import TimeMerge

TASKS = 5
PROTOCOL = {"init": "all", "deploy": "all", "technique": "ties", "hparams": {"k": 0.3, "scope": "tower"}}


class _Strategy:
    def barrier(self, name: str | None = None) -> None:
        pass

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


def _trainer(task: int) -> Any:
    return SimpleNamespace(
        is_global_zero=True,
        strategy=_Strategy(),
        callbacks=[],
        current_epoch=task,
        datamodule=SimpleNamespace(num_tasks=TASKS + 1),  # no task here is the last: no final model
        max_epochs=TASKS + 1,
        checkpoint_callback=None,
        log_dir=None,  # the run folder: unused, TimeMerge's store_dir is set
        default_root_dir=".",
    )


@pytest.fixture(scope="module")
def stream() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=8,
        vision_cfg={"layers": 2, "width": 16, "patch_size": 4, "image_size": 8, "head_width": 8},
        text_cfg={"layers": 1, "width": 16, "heads": 2, "context_length": 5, "vocab_size": 20},
    )
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    experts = [
        {
            k: v + 0.02 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(TASKS)
    ]
    return base, experts


def _boundaries(callback: TimeMerge, base: dict, experts: list[dict], tasks: range) -> None:
    for task in tasks:
        module = SimpleNamespace(model=SimpleNamespace(state_dict=lambda e=experts[task]: e), zero_shot_weights=base)
        callback.started_task = task
        callback.finish_task(_trainer(task), module, task)


def _callback(store: Path, checkpoint: dict | None = None) -> TimeMerge:
    callback = TimeMerge(**PROTOCOL, store_dir=str(store))
    if checkpoint is not None:
        callback.load_state_dict(checkpoint)  # before setup, as Lightning restores it
    callback.setup(_trainer(0), SimpleNamespace(), "fit")
    return callback


@pytest.mark.parametrize("dies", ["while writing the state", "after the state, writing all_0003"])
def test_a_boundary_that_dies_while_folding_resumes_to_the_same_files(stream, tmp_path, monkeypatch, dies):
    base, experts = stream
    uninterrupted = _callback(tmp_path / "a")
    for task in range(TASKS):  # each boundary's `all` has the bits of the merge of every expert so far
        _boundaries(uninterrupted, base, experts, range(task, task + 1))
        merged = merge(base, experts[: task + 1], PROTOCOL["technique"], **PROTOCOL["hparams"]) if task else experts[0]
        with running.SafetensorsReader(tmp_path / "a" / f"all_{task:04d}.safetensors") as written:
            assert all(torch.equal(written.tensor(k), merged[k]) for k in merged)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    states = [n for n in names if n.startswith("all_state")]
    assert states == ["all_state_0003.safetensors", "all_state_0004.safetensors"]

    killed = _callback(tmp_path / "b")
    _boundaries(killed, base, experts, range(3))
    checkpoint = killed.state_dict()  # the task-end checkpoint of task 2

    class Died(Exception):
        pass

    if dies == "while writing the state":
        write, calls = running.StateWriter.write, [0]

        def dying_write(self, *args: Any) -> None:
            calls[0] += 1
            if calls[0] == 30:
                raise Died
            write(self, *args)

        monkeypatch.setattr(running.StateWriter, "write", dying_write)
    else:
        import timelit.merging.merged_files as merged_files

        def dying_save(path, *args: Any, **kwargs: Any) -> str:
            raise Died

        monkeypatch.setattr(merged_files, "save_weights", dying_save)
    with pytest.raises(Died):
        _boundaries(killed, base, experts, range(3, 4))
    assert (tmp_path / "b" / "all_state_0002.safetensors").exists()
    monkeypatch.undo()

    resumed = _callback(tmp_path / "b", checkpoint)
    _boundaries(resumed, base, experts, range(3, TASKS))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == names
    for name in names:
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
