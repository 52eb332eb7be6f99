"""Whether a value logged now with `on_step=True` reaches the logger.

Lightning writes step-level values only every `trainer.log_every_n_steps` steps and drops the others, but each
`LightningModule.log` call still costs its bookkeeping (0.1-0.5 ms on a CPU). Scalars that are not needed on the
progress bar are therefore logged only at the steps that reach the logger. Lightning keeps that decision in a
private property and has no public one; if it moves, every step logs again (correct, only slower).
"""

from __future__ import annotations

import lightning as L


def reaches_logger(trainer: L.Trainer) -> bool:
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
