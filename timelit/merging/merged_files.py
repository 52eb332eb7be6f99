"""The files of a TIME run beside its experts: θ0, the merged weights, the running state of `all`.

    files = MergedFiles(ExpertStore("runs/x/experts"), kinds=("ema",))
    files.save("ema", 3, weights, metadata)     # experts/ema_0003.safetensors, its sha256 kept for the checkpoint
    files.prune(3)                              # ema_0001 and all_state_0001 removed: no checkpoint reads them now
    files.restore(hashes, finished_task=3)      # on resume: the files the run will read are the recorded ones

Names in the store's folder: `base.safetensors` (θ0), `expert_NNNN` (the ExpertStore), `<kind>_NNNN` (kind: ema,
all, ft_zs), `all_state_NNNN`; `final_model.safetensors` goes to the run folder. Only the last two tasks' merged and
state files are kept (docs/ARCHITECTURE.md, "What a run writes, and why").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from timelit.merging.running import state_bytes
from timelit.merging.safetensors_io import file_sha256, save_weights
from timelit.merging.store import ExpertStore, expert_name
from timelit.merging.technique import Technique
from timelit.utilities.disk_space import space_shortfalls

BASE_FILE = "base.safetensors"
FINAL_FILE = "final_model.safetensors"
KEPT_TASKS = 2  # a resume redoes at most the boundary after its checkpoint, which reads the task before's files


def merged_name(kind: str, task: int) -> str:
    return f"{kind}_{task:04d}.safetensors"


def state_name(task: int) -> str:
    return f"all_state_{task:04d}.safetensors"


def merged_task(name: str) -> int:
    """The task of a merged file's name (`ema_0003.safetensors` -> 3)."""
    return int(name.removesuffix(".safetensors").rsplit("_", 1)[1])


def intact(path: Path, digest: str | None) -> bool:
    """Whether `path` is the file a checkpoint recorded with sha256 `digest` (None: it recorded none)."""
    return digest is not None and path.exists() and file_sha256(path) == digest


def recorded_file(state: Mapping[str, Any], kind: str, task: int) -> tuple[str, str | None]:
    """The name of the file holding `kind` (`ft`: the expert) after `task`, and the sha256 that TimeMerge's
    checkpoint state `state` recorded for it (None if none)."""
    if kind == "ft":
        digests = {entry["file"]: entry["sha256"] for entry in state["store"]["experts"]}
        name = expert_name(task)
    else:
        digests, name = state.get("merged", {}), merged_name(kind, task)
    return name, digests.get(name)


class MergedFiles:
    """The merged weights and `all` states of `kinds` in an ExpertStore's folder, and the sha256 of those written.

    Args:
        store: the experts; the other files live in its folder.
        kinds: the merged weights the protocol writes (ema, all, ft_zs).
        keep_merged: keep every task's merged files instead of the last two (`all` states are pruned anyway).
    """

    def __init__(self, store: ExpertStore, kinds: Iterable[str], keep_merged: bool = False) -> None:
        self.store, self.kinds, self.keep_merged = store, tuple(kinds), keep_merged
        self.hashes: dict[str, str] = {}  # file name -> sha256, of every merged file a checkpoint may refer to

    @property
    def directory(self) -> Path:
        return self.store.directory

    @property
    def base(self) -> Path:
        return self.directory / BASE_FILE

    def path(self, kind: str, task: int) -> Path:
        """The file holding `kind` (`ft` = the expert, ema, all, ft_zs) after `task`."""
        return self.store.path(task) if kind == "ft" else self.directory / merged_name(kind, task)

    def state(self, task: int) -> Path:
        """The running state of `all` after `task` (incremental techniques)."""
        return self.directory / state_name(task)

    def fingerprints(self, tasks: Sequence[int]) -> list[str]:
        """The sha256 of the experts of `tasks`, in that order."""
        hashes = {entry["task"]: entry["sha256"] for entry in self.store.index()}
        return [hashes[task] for task in tasks]

    def save_base(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Write θ0 once: a run that resumes finds it there."""
        if not self.base.exists():
            save_weights(self.base, weights, {"timelit.kind": "base"})

    def save(self, kind: str, task: int, weights: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
        path = self.path(kind, task)
        self.hashes[path.name] = save_weights(path, weights, metadata)
        return path

    def prune(self, task: int) -> None:
        """After `task`'s boundary: remove the merged files and `all` state of task `task - 2`, which the newest
        checkpoint can no longer refer to."""
        if task < KEPT_TASKS:
            return
        old_task = task - KEPT_TASKS
        self.state(old_task).unlink(missing_ok=True)
        if self.keep_merged:
            return
        for kind in self.kinds:
            old = self.path(kind, old_task)
            if old.exists():
                old.unlink()
                self.hashes.pop(old.name, None)

    def restore(self, hashes: Mapping[str, str], finished_task: int, verify: bool = True) -> None:
        """Take a checkpoint's record of merged files; with `verify`, check the ones the resumed run will read: those
        of the last finished task (the next init, the next EMA step, the deployed weights). Older ones may be gone:
        a run killed after the boundary of the next task, before its task-end checkpoint, had already pruned them,
        and nothing reads them."""
        self.hashes = dict(hashes)
        if not verify:
            return
        for name, digest in list(self.hashes.items()):
            path = self.directory / name
            if merged_task(name) < finished_task and not path.exists():
                del self.hashes[name]
            elif not intact(path, digest):
                raise FileNotFoundError(f"{path}: merged weights listed in the checkpoint are missing or changed")

    def boundary_shortfall(
        self,
        task: int,
        base: Mapping[str, torch.Tensor],
        folded: Technique | None,
        final: Path | None,
        checkpoint_dir: Path | None,
    ) -> str | None:
        """Why the disk cannot take the files of `task`'s boundary, or None.

        Each expert or merged file is the size of θ0 (`base`); `folded` is the technique whose `all` state the
        boundary writes (None: none), `final` the final model's path after the last task, and the task-end last.ckpt
        in `checkpoint_dir` needs the size of the previous one (three times the weights before the first: weights
        and AdamW's two moments). Checked before anything is written, so a short disk stops the run with the previous
        last.ckpt and the files it lists intact instead of failing halfway through the boundary.
        """
        weights = sum(t.numel() * t.element_size() for t in base.values())
        names = [self.store.path(task).name, *(self.path(kind, task).name for kind in sorted(self.kinds))]
        needs: dict[Path, int] = {self.directory: len(names) * weights}
        if folded is not None:
            needs[self.directory] += state_bytes(folded, [t.numel() for t in base.values() if t.is_floating_point()])
            names.append(self.state(task).name)
        if final is not None:
            needs[final.parent] = needs.get(final.parent, 0) + weights
            names.append(final.name)
        if checkpoint_dir is not None:
            last = checkpoint_dir / "last.ckpt"
            needs[checkpoint_dir] = needs.get(checkpoint_dir, 0) + (
                last.stat().st_size if last.exists() else 3 * weights
            )
            names.append("last.ckpt")
        short = space_shortfalls(needs)
        if not short:
            return None
        return (
            f"not enough disk space for the files of task {task}'s boundary ({', '.join(names)}): {'; '.join(short)}. "
            "Nothing of it was written and the previous last.ckpt is intact: free space, then run the same command "
            "to resume"
        )
