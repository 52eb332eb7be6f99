"""What `timelit fit` does to its run folder before it writes anything there: lock it, remove leftovers.

    lock = claim_run_folder(trainer)      # rank 0; None on the other ranks
    ...  trainer.fit(...)  ...
    lock.release()

The lock (`<run dir>/fit.lock`, timelit.utilities.folder_lock) keeps a second fit out of a folder that one is writing:
the second one stops at once with the first one's host and pid, before it has written a byte. Held, it also makes every
temporary file in the run's folders (the run folder, its checkpoint folder, its experts folder) a leftover of a write
that was killed midway, whoever wrote it, so they are all removed (timelit.utilities.atomic.remove_temporaries). Only
rank 0 does either: the other ranks never write into these folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timelit.training.contracts import ExpertStoreOwner
from timelit.utilities.atomic import remove_run_temporaries
from timelit.utilities.folder_lock import FolderLock, lock_run_folder


def run_folders(trainer: Any) -> list[Path]:
    """The folders the fit writes into: the run folder, its checkpoint folder and its experts folder (each
    callback's `store_directory(run_dir)`, e.g. TimeMerge's).

    Resolved here without `timelit.training.callbacks.results.run_directory`, which caches the run folder per trainer:
    cached on rank 0 alone, it would spare rank 0 a broadcast that the other ranks make in `setup`, and DDP would
    hang there."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    folders = [run_dir, run_dir / "checkpoints"]
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            folders.append(Path(callback.dirpath))
        elif isinstance(callback, ExpertStoreOwner):
            folders.append(Path(callback.store_directory(run_dir)))
    return list(dict.fromkeys(folders))


def claim_run_folder(trainer: Any) -> FolderLock | None:
    """On global rank 0: lock the run folder (or raise RunFolderBusy) and remove the temporary files of its folders,
    logging the bytes freed. None on other ranks."""
    if not trainer.is_global_zero:
        return None
    folders = run_folders(trainer)
    lock = lock_run_folder(folders[0])
    try:
        remove_run_temporaries(folders)
    except BaseException:
        lock.release()
        raise
    return lock
