"""The private Lightning API timelit depends on (timelit/training/lightning_internals.py) still behaves as timelit
expects.

    OMP_NUM_THREADS=1 python -m pytest tests/unit/test_lightning_internals.py -q

Each test checks a behaviour through Lightning itself, not only that a name exists: a Lightning release that renames,
removes or changes any of these fails here, naming the function in timelit.training.lightning_internals to adapt.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from timelit.training import lightning_internals
from timelit.training.callbacks.checkpoint import StreamCheckpoint

STEPS = 6


class Model(BoringModel):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(STEPS * 2, 32)), batch_size=2)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return super().training_step(batch[0], batch_idx)


class Steps(Logger):
    """Records the steps at which Lightning hands metrics to a logger."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[int] = []

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "probe" in metrics:
            self.steps.append(int(step or 0))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def trainer(tmp_path, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "limit_val_batches": 0,
    }
    return L.Trainer(**{**defaults, **kwargs})


def test_reaches_logger_is_true_exactly_at_the_steps_the_logger_receives(tmp_path):
    """`trainer._logger_connector.should_update_logs`: the steps whose `on_step` values reach the logger."""

    class Probe(Callback):
        def __init__(self) -> None:
            self.reaching: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if lightning_internals.reaches_logger(trainer):
                self.reaching.append(trainer.global_step - 1)
            pl_module.log("probe", float(batch_idx), on_step=True, on_epoch=False)

    logger, probe = Steps(), Probe()
    trainer(tmp_path, logger=logger, log_every_n_steps=2, callbacks=[probe]).fit(Model())
    assert logger.steps and probe.reaching == logger.steps
    assert len(logger.steps) < STEPS  # the decision is not "every step"


class SignalsSeen(Callback):
    """The SIGTERM handler in place when training starts; optionally keeps Lightning's handlers off at `setup`."""

    def __init__(self, keep_off: bool) -> None:
        self.keep_off = keep_off
        self.kept_off: bool | None = None
        self.handler: Any = None

    def setup(self, trainer, pl_module, stage) -> None:
        if self.keep_off:
            self.kept_off = lightning_internals.keep_signal_handlers_off(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self.handler = signal.getsignal(signal.SIGTERM)

    def teardown(self, trainer, pl_module, stage) -> None:
        lightning_internals.let_signal_handlers_back(trainer)


def _sentinel(signum: int, frame: Any) -> None:  # pragma: no cover - never called
    pass


@pytest.fixture
def sigterm_sentinel():
    previous = signal.signal(signal.SIGTERM, _sentinel)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_lightning_installs_its_handlers_through_the_connector_that_can_be_kept_off(tmp_path, sigterm_sentinel):
    """`trainer._signal_connector.register_signal_handlers`: called after the callbacks' `setup`, before training."""
    lightnings = SignalsSeen(keep_off=False)
    trainer(tmp_path, callbacks=[lightnings]).fit(Model())
    assert lightnings.handler is not _sentinel  # Lightning wrapped SIGTERM during the fit

    kept = SignalsSeen(keep_off=True)
    run = trainer(tmp_path, callbacks=[kept])
    run.fit(Model())
    assert kept.kept_off is True and kept.handler is _sentinel and run.received_sigterm is False
    assert "register_signal_handlers" not in vars(run._signal_connector)  # let back: a later validate is Lightning's


def test_a_corrected_record_is_what_lightning_restores(tmp_path, sigterm_sentinel):
    """`_signal_connector._original_handlers`: what Lightning's teardown puts back."""
    run = trainer(tmp_path)
    connector = run._signal_connector
    connector.register_signal_handlers()
    assert signal.getsignal(signal.SIGTERM) is not _sentinel
    lightning_internals.replace_recorded_handler(run, int(signal.SIGTERM), _sentinel, signal.SIG_DFL)
    connector.teardown()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_cluster_environment_is_the_one_the_trainer_was_given(tmp_path):
    """`trainer._accelerator_connector.cluster_environment`, where Lightning's signal connector reads
    `auto_requeue`."""
    environment = LightningEnvironment()
    assert lightning_internals.cluster_environment(trainer(tmp_path, plugins=[environment])) is environment


class Recording(ModelCheckpoint):
    """A ModelCheckpoint that records every save passing through `_save_checkpoint`, as StreamCheckpoint's does."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved: list[str] = []

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        self.saved.append(filepath)
        super()._save_checkpoint(trainer, filepath)


def test_save_last_checkpoint_writes_last_ckpt_through_the_callbacks_own_save(tmp_path):
    """`_save_last_checkpoint`, `_monitor_candidates`, `_last_global_step_saved`, `_should_save_on_exception`, and
    `_save_checkpoint`, which StreamCheckpoint overrides."""
    checkpoint = Recording(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0, every_n_train_steps=1000, save_on_exception=True
    )
    seen: dict[str, Any] = {}

    class SaveAtStep2(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step != 2:
                return
            seen["before"] = lightning_internals.should_save_on_exception(checkpoint, trainer)
            lightning_internals.save_last_checkpoint(checkpoint, trainer)
            seen["step"] = lightning_internals.last_saved_step(checkpoint)
            seen["after"] = lightning_internals.should_save_on_exception(checkpoint, trainer)

    run = trainer(tmp_path, callbacks=[SaveAtStep2(), checkpoint], enable_checkpointing=True, max_steps=3)
    run.fit(Model())
    last = str(tmp_path / "ckpt" / "last.ckpt")
    assert checkpoint.saved[0] == last and checkpoint.last_model_path == last
    assert seen == {"before": True, "step": 2, "after": False}
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert "_save_checkpoint" in vars(StreamCheckpoint)  # timelit's override of the method checked above


def test_subcommand_parser_is_the_parser_the_config_is_saved_with(tmp_path):
    """`LightningCLI._parser(subcommand)`: TimeLightningCLI compares a resumed run's config dumped with it."""

    class Stop(Exception):
        pass

    seen: dict[str, Any] = {}

    class Probe(LightningCLI):
        def before_fit(self) -> None:
            seen["parser"] = lightning_internals.subcommand_parser(self, "fit")
            seen["callbacks"] = list(self.trainer.callbacks)
            raise Stop

    args = ["fit", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.max_epochs=1"]
    with pytest.raises(Stop):
        Probe(BoringModel, args=args)
    assert isinstance(seen["parser"], LightningArgumentParser)
    saver = next(c for c in seen["callbacks"] if isinstance(c, SaveConfigCallback))
    assert saver.parser is seen["parser"]
