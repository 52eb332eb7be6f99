"""Callbacks the integration tests attach to real `timelit fit` runs (`--trainer.callbacks+=probes.RankProbe`, with
this folder on PYTHONPATH): they record what each rank did into `<run dir>/probe_rank<r>.json`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def weights_hash(module) -> str:
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(-1).numpy().tobytes())
    return digest.hexdigest()


class RankProbe(Callback):
    """Per rank: the sample keys of every step, and weight hashes at each task start, evaluation and the end."""

    def __init__(self) -> None:
        self.record: dict = {"keys": [], "starts": {}, "evaluated": {}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.record["keys"].append([trainer.current_epoch, trainer.global_step, batch["keys"]])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:  # after TimeMerge loaded the init weights and the first step ran on them
            self.record["starts"][trainer.current_epoch] = weights_hash(pl_module.model)

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.record["evaluated"][trainer.current_epoch] = weights_hash(pl_module.model)

    def on_fit_end(self, trainer, pl_module):
        self.record["final_live"] = weights_hash(pl_module.model)
        self.record["world_size"] = trainer.world_size
        run_dir = Path(trainer.logger.log_dir)
        (run_dir / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(self.record))
