"""Preemption under DDP (2 CPU processes, gloo): a signal that reaches one rank only stops both at the same step,
rank 0 writes last.ckpt, and nothing hangs (research/ecosystem_reliability_anchors.md: PL#21406, PL#20280) — also
when it arrives before training starts, where Lightning's own SIGTERM handler (which broadcasts inside the handler)
used to be live."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from timelit.training.callbacks.checkpoint import StreamCheckpoint
    from timelit.training.callbacks.preemption import Preempted, Preemption

    out, signal_rank, signum, where = Path(sys.argv[1]), int(sys.argv[2]), getattr(signal, sys.argv[3]), sys.argv[4]


    class Linear(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            # Called after Lightning's signal registration and before on_train_start (no sanity check here).
            if where == "loader" and self.trainer.global_rank == signal_rank:
                os.kill(os.getpid(), signum)
            g = torch.Generator().manual_seed(0)
            return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)), 2)


    class SignalOneRank(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if where == "batch" and trainer.global_rank == signal_rank and batch_idx == 2:
                os.kill(os.getpid(), signum)


    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", strategy="ddp", devices=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=out,
        callbacks=[Preemption(), SignalOneRank(), StreamCheckpoint(every_n_train_steps=100, dirpath=str(out / "ckpt"))],
    )
    try:
        trainer.fit(Linear())
    except Preempted as stop:
        record = {"step": trainer.global_step, "code": stop.code}
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        raise
    """
)


@pytest.mark.parametrize(
    ("signal_rank", "signame", "where", "step"),
    [(1, "SIGUSR1", "batch", 3), (0, "SIGTERM", "batch", 3), (1, "SIGTERM", "loader", 1)],
)
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, signal_rank, signame, where, step):
    script = tmp_path / "fit_ddp.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # not a Slurm job: no requeue
    env.update(MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(signal_rank), signame, where],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    expected = 128 + getattr(signal, signame)
    assert result.returncode == expected, result.stdout[-2000:] + result.stderr[-3000:]
    markers = [tmp_path / f"rank{rank}.json" for rank in (0, 1)]
    deadline = time.monotonic() + 60  # rank 1 is rank 0's child process and may end a moment later
    while not all(marker.exists() for marker in markers) and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = [json.loads(marker.read_text()) for marker in markers]
    assert ranks == [{"step": step, "code": expected}] * 2  # both ranks trained up to the signal, then stopped
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == step
