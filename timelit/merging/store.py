"""ExpertStore: the fine-tuned weights of every task, one safetensors file each, written atomically.

    store = ExpertStore("runs/x/experts")
    store.add(task=3, state_dict=model.state_dict(), metadata={"stream": "random_1", "config": cfg_hash})
    merged = merge(base, store, "ties", k=0.3)          # streams the files; never holds every expert in memory
    ckpt["expert_store"] = store.state_dict()           # the index: file names and sha256 per task
    store.load_state_dict(ckpt["expert_store"])         # after a restart: verify the files, forget newer ones

The FoMo-in-Flux pipeline keeps every expert in CPU RAM (``running``) and loses them on a crash; here experts live
on disk and a checkpoint holds only their index, so a resumed run merges exactly the experts it had checkpointed.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from timelit.merging.safetensors_io import file_sha256, load_weights, read_metadata, save_weights

_NAME = re.compile(r"^expert_(\d{4,})\.safetensors$")
TASK_KEY = "timelit.task"


def expert_name(task: int) -> str:
    return f"expert_{task:04d}.safetensors"


class ExpertStore:
    """A directory holding ``expert_{task:04d}.safetensors`` files, listed in task order.

    Iterating yields the files' paths oldest first, which is the order ``merge`` folds experts in. The listing comes
    from the directory when the store is opened and from :meth:`load_state_dict` after a restart; files the index
    does not list (written after the checkpoint it came from) are ignored until their task is added again.

    Args:
        directory: where the experts live; created if missing.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._hashes: dict[int, str | None] = {}  # task -> sha256, None until needed
        for path in self.directory.iterdir():
            if match := _NAME.match(path.name):
                self._hashes[int(match.group(1))] = None
        self._hashes = dict(sorted(self._hashes.items()))

    def path(self, task: int) -> Path:
        return self.directory / expert_name(task)

    def add(self, task: int, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
        """Write the expert of ``task`` atomically (replacing an earlier file of the same task) and return its path.

        ``metadata`` is free-form strings (stream name, config hash, ...); the task index is added as
        ``timelit.task``. Tensors are written from the CPU, made contiguous one at a time.
        """
        if isinstance(task, bool) or not isinstance(task, int) or task < 0:
            raise ValueError(f"task must be a non-negative integer, got {task!r}")
        path = self.path(task)
        self._hashes[task] = save_weights(path, state_dict, {**(metadata or {}), TASK_KEY: str(task)})
        self._hashes = dict(sorted(self._hashes.items()))
        return path

    @property
    def tasks(self) -> list[int]:
        return list(self._hashes)

    @property
    def paths(self) -> list[Path]:
        return [self.path(task) for task in self._hashes]

    def __len__(self) -> int:
        return len(self._hashes)

    def __iter__(self) -> Iterator[Path]:
        return iter(self.paths)

    def __contains__(self, task: object) -> bool:
        return task in self._hashes

    def load(self, task: int) -> dict[str, torch.Tensor]:
        """The expert of ``task`` as a state dict in memory."""
        return load_weights(self._existing(task))

    def metadata(self, task: int) -> dict[str, str]:
        return read_metadata(self._existing(task))

    def _existing(self, task: int) -> Path:
        if task not in self._hashes:
            raise KeyError(f"no expert for task {task} in {self.directory}; stored tasks: {self.tasks}")
        return self.path(task)

    def index(self) -> list[dict[str, Any]]:
        """``[{"task", "file", "sha256"}]`` in task order; hashes of files this process did not write are computed
        (once) by reading them."""
        for task, digest in self._hashes.items():
            if digest is None:
                self._hashes[task] = file_sha256(self.path(task))
        return [{"task": t, "file": self.path(t).name, "sha256": h} for t, h in self._hashes.items()]

    def state_dict(self) -> dict[str, Any]:
        """What a Lightning callback saves in its checkpoint state: the index."""
        return {"experts": self.index()}

    def load_state_dict(self, state: Mapping[str, Any], verify: bool = True) -> None:
        """Re-open the store as the checkpoint saw it.

        Every indexed file must exist and, with ``verify``, hash to the recorded sha256 (one read of each file).
        Files that the index does not list are ignored, with a warning, and overwritten when their task is added.
        """
        hashes: dict[int, str | None] = {}
        for item in state["experts"]:
            task, path = int(item["task"]), self.directory / item["file"]
            if path != self.path(task):
                raise ValueError(f"checkpointed expert file {item['file']!r} does not match task {task}")
            if not path.exists():
                raise FileNotFoundError(f"expert of task {task} listed in the checkpoint is missing: {path}")
            if verify and file_sha256(path) != item["sha256"]:
                raise ValueError(f"expert of task {task} changed since the checkpoint was saved: {path}")
            hashes[task] = item["sha256"]
        newer = sorted(task for task in self._hashes if task not in hashes)
        if newer:
            warnings.warn(
                f"{self.directory}: ignoring experts of tasks {newer}, which the checkpoint does not list",
                stacklevel=2,
            )
        self._hashes = dict(sorted(hashes.items()))
