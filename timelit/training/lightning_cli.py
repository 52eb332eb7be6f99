"""timelit's LightningCLI: `timelit fit|validate|test` (timelit/commands/cli.py dispatches here).

Kept apart from timelit/commands/cli.py, which every `timelit` command imports: importing Lightning takes ~7 s on a
small machine, and `timelit sweep`, `timelit report` or `timelit --help` should not wait for it.

What a user sees is set here too: Lightning's log lines once and without its tips (`quiet_lightning`), a model summary
with the measured GFLOPs per step (`install_step_cost_summary`), parse errors in one line (`TimeArgumentParser`) and
a summary at the end of fit (`TimeLightningCLI.after_fit`).
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from timelit.training import lightning_internals
from timelit.utilities import early_signals
from timelit.utilities.errors import OneLineParserErrors, UserError, reading_checkpoint
from timelit.utilities.resources import PACKAGE_DIR

DEFAULTS_DIR = PACKAGE_DIR / "training" / "cli_defaults"


class ResumeMismatchError(UserError, ValueError):
    """`timelit fit` into a run folder whose last.ckpt was made under another experiment config; the message lists
    the settings that differ."""


class TimeArgumentParser(OneLineParserErrors, LightningArgumentParser):
    """LightningArgumentParser whose errors (an unknown option, a value that is not one of a Literal's choices) are one
    line naming the key, with the nearest valid name, instead of the whole usage (timelit.utilities.errors)."""


class TimeLightningCLI(LightningCLI):
    """LightningCLI with timelit's always-on callbacks and the trainer settings a stream needs.

    Config sections beyond LightningCLI's own, one callback each: `protocol` (TimeMerge: init/deploy/merge
    technique), `budget` (ComputeBudget: steps per task from a GFLOP budget, or metering only), `results`
    (TaskResults: results.json and per-task TensorBoard scalars), `skipped` (SkippedSamples: samples that do not
    decode, counted and reported), `checkpoint` (StreamCheckpoint: last.ckpt every N steps and at every task end)
    and `preemption` (Preemption: save, requeue and stop on SIGUSR1/SIGTERM). The trainer's `max_epochs` follows
    `data.num_tasks` and the seeds of model and data follow `seed_everything`.
    """

    def _parse_ckpt_path(self) -> None:
        """LightningCLI's first read of `--ckpt_path` (for the hyperparameters saved in it), with a file that is not a
        torch checkpoint or is cut short reported in one line naming it. A private method of LightningCLI
        (timelit.training.lightning_internals lists it); its config parse raises UsageError, none of these."""
        subcommand = self.config.get("subcommand")
        with reading_checkpoint(self.config[subcommand].get("ckpt_path") if subcommand else None):
            super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: Any) -> None:
        from timelit.training.callbacks.budget import ComputeBudget
        from timelit.training.callbacks.checkpoint import StreamCheckpoint
        from timelit.training.callbacks.preemption import Preemption
        from timelit.training.callbacks.results import TaskResults
        from timelit.training.callbacks.skipped import SkippedSamples
        from timelit.training.callbacks.time_merge import TimeMerge

        parser.add_lightning_class_args(TimeMerge, "protocol")
        parser.add_lightning_class_args(ComputeBudget, "budget")
        parser.add_lightning_class_args(TaskResults, "results")
        parser.add_lightning_class_args(SkippedSamples, "skipped")
        parser.add_lightning_class_args(StreamCheckpoint, "checkpoint")
        # After `checkpoint`, so that trainer.checkpoint_callback stays StreamCheckpoint (Preemption saves through it).
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.link_arguments("data.init_args.num_tasks", "trainer.max_epochs")
        parser.link_arguments("seed_everything", "data.init_args.seed")
        parser.link_arguments("seed_everything", "model.init_args.seed")
        parser.set_defaults(
            {
                # The sanity check is the zero-shot evaluation before the stream: it must see whole datasets.
                "trainer.num_sanity_val_steps": -1,
                # Every task has its own training loader (and evaluation switches between subsets and full splits).
                "trainer.reload_dataloaders_every_n_epochs": 1,
                # timelit's loaders split data by rank themselves; a DistributedSampler would duplicate samples.
                "trainer.use_distributed_sampler": False,
                "trainer.gradient_clip_val": 1.0,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "timelit", "version": ""},
                },
            }
        )

    def before_fit(self) -> None:
        """Without a Preemption callback, give the requeue signals held since start-up back
        (timelit.utilities.early_signals)."""
        from timelit.training.callbacks.preemption import Preemption

        if not any(isinstance(callback, Preemption) for callback in self.trainer.callbacks):
            early_signals.release()

    def fit(self, **kwargs: Any) -> None:
        """`trainer.fit` with the run folder locked and cleaned of killed writes' leftovers
        (timelit.training.run_folder), refusing to resume a folder whose checkpoint was made under a different
        experiment config. The lock comes first, so that a second fit into a busy folder stops before it reads or
        writes anything there."""
        from timelit.training.run_folder import claim_run_folder

        lock = claim_run_folder(self.trainer)
        try:
            self._check_resumed_config()
            self.trainer.fit(**kwargs)
        finally:
            if lock is not None:
                lock.release()

    def _check_resumed_config(self) -> None:
        if self.config.fit.get("ckpt_path") != "last":
            return
        run_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        saved = run_dir / "config.yaml"
        if not saved.is_file() or not any(run_dir.glob("checkpoints/last*.ckpt")):
            return
        # Both sides as SaveConfigCallback writes them, so that tuples, paths and numbers compare alike.
        parser = lightning_internals.subcommand_parser(self, "fit")
        current = yaml.safe_load(parser.dump(self.config.fit, skip_none=False, skip_validation=True))
        differences = config_differences(yaml.safe_load(saved.read_text()) or {}, current)
        if differences:
            raise ResumeMismatchError(
                f"{run_dir} holds a run of another experiment, and fit would resume it from its last.ckpt:\n  "
                + "\n  ".join(differences)
                + "\nRun the new experiment elsewhere (--trainer.logger.init_args.name NEW), or start this directory "
                "over with --ckpt_path null."
            )

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        """Inside a Slurm job, use SLURMEnvironment with Lightning's own requeue off: the `preemption` callback
        saves and requeues outside the signal handler. (A config default cannot do this: SLURMEnvironment reads
        SLURM_* variables when it is built, and they do not exist elsewhere.) Checkpoints are written by
        AtomicCheckpointIO unless the config chose a CheckpointIO (`install_atomic_checkpoint_io`)."""
        from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

        configured = self._trainer_config().get("plugins") or []
        configured = configured if isinstance(configured, list) else [configured]
        if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in configured):
            kwargs["plugins"] = [*configured, SLURMEnvironment(auto_requeue=False)]
        trainer = super().instantiate_trainer(**kwargs)
        install_atomic_checkpoint_io(trainer)
        configured = self._trainer_config().get("callbacks") or []
        install_step_cost_summary(trainer, configured if isinstance(configured, list) else [configured])
        return trainer

    def _trainer_config(self) -> Any:
        """The `trainer` section of the instantiated config, inside the subcommand's section when there is one."""
        return self.config_init.get(str(self.subcommand), self.config_init).get("trainer") or {}

    def after_fit(self) -> None:
        """The run in a few lines on stdout: A_KA / A_ZS / GM from zero-shot to the last task done, the run folder
        and the command that shows its curves."""
        from timelit.training.callbacks.results import TaskResults, run_directory

        trainer = self.trainer
        results = next((c for c in trainer.callbacks if isinstance(c, TaskResults)), None)  # type: ignore[attr-defined]
        if results is None or not trainer.is_global_zero:
            return
        summary = fit_summary(results.points, self.datamodule.num_tasks, run_directory(trainer), trainer.logger)
        print(summary, flush=True)


class AtomicSaveConfig(SaveConfigCallback):
    """SaveConfigCallback whose `config.yaml` is written atomically (timelit.utilities.atomic): a resume compares the
    new config with it, and a file cut short by a kill would fail that check with a YAML error instead."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from timelit.utilities.atomic import write_text

        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank asks
        if trainer.is_global_zero:
            write_text(Path(log_dir) / self.config_filename, self.parser.dump(self.config, skip_none=False))
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def install_atomic_checkpoint_io(trainer: Any) -> bool:
    """Give the trainer's strategy timelit's AtomicCheckpointIO when it would use Lightning's default TorchCheckpointIO.

    Done on the built trainer rather than by adding a `trainer.plugins` entry, so that whatever the user configured
    stays: a CheckpointIO plugin of their own, a strategy built with its `checkpoint_io`, and the strategies that need
    their own IO (XLA's refuses any other, AsyncCheckpointIO wraps one) all keep theirs. Returns whether it replaced.
    """
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    from timelit.training.callbacks.checkpoint import AtomicCheckpointIO

    if type(trainer.strategy.checkpoint_io) is not TorchCheckpointIO:
        return False
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    return True


def install_step_cost_summary(trainer: Any, configured: list[Any]) -> bool:
    """Put timelit's StepCostSummary in place of the ModelSummary that Lightning adds by default (one whose FLOPs
    read 0, timelit.training.callbacks.summary); a ModelSummary the config asked for stays. Returns whether it
    replaced."""
    from lightning.pytorch.callbacks import ModelSummary

    from timelit.training.callbacks.summary import StepCostSummary

    for position, callback in enumerate(trainer.callbacks):
        if type(callback) is ModelSummary and not any(callback is c for c in configured):
            trainer.callbacks[position] = StepCostSummary()
            return True
    return False


def fit_summary(points: list[dict[str, Any]], num_tasks: int, run_dir: Path, logger: Any) -> str:
    """What `timelit fit` prints at its end: tasks done, A_KA / A_ZS / GM from the zero-shot point to the last task,
    the run folder with the files a user opens first, and the TensorBoard command."""
    done = points[-1]["tasks_done"] if points else 0
    lines = [f"timelit fit: {done} of {num_tasks} task(s) done"]
    if done < num_tasks:
        lines[0] += f"; the same command resumes from {run_dir / 'checkpoints'}"
    if points:
        first, last = points[0], points[-1]
        figures = "   ".join(
            f"{key} {first[key]:.2f} -> {last[key]:.2f}" if first is not last else f"{key} {last[key]:.2f}"
            for key in ("A_KA", "A_ZS", "GM")
            if key in last  # A_ZS and GM only where there are held-out sets
        )
        start = "zero-shot" if first["tasks_done"] == 0 else f"after task {first['tasks_done']}"
        lines.append(f"  {figures}   ({start} -> after task {last['tasks_done']})")
    files = [f for f in ("results.json", "final_model.safetensors", "checkpoints/last.ckpt") if (run_dir / f).exists()]
    lines.append(f"  run folder: {run_dir}" + (f"  ({', '.join(files)})" if files else ""))
    from lightning.pytorch.loggers import TensorBoardLogger

    if isinstance(logger, TensorBoardLogger):
        lines.append(f"  curves:     tensorboard --logdir {logger.save_dir}")
    return "\n".join(lines)


# Lightning's messages that a timelit run cannot act on: an advert for its cloud logger (logged at every start), a
# deprecation inside Lightning's own use of torch, and the missing `last` checkpoint of every first run, whose hint
# (`ModelCheckpoint(save_last=True)`) is wrong for timelit (StreamCheckpoint writes last.ckpt).
_LIGHTNING_TIPS = ("💡 Tip:",)
_LIGHTNING_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"\.fit\(ckpt_path=\"last\"\) is set, but there is no last checkpoint available", UserWarning),
    # `args` is the command line itself here, not a second one beside sys.argv.
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning),
    # On any machine with Slurm installed: timelit's Slurm runs go through `timelit sweep` and slurm/array.sbatch,
    # which call srun themselves; a fit started by hand there is a local run, not a mistake.
    (r"The `srun` command is available on your system but is not used", Warning),
)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name.startswith("lightning") and str(record.msg).startswith(_LIGHTNING_TIPS))


_NO_TIPS = _NoTips()


def quiet_lightning() -> None:
    """Each of Lightning's log lines once, and none of the tips and warnings above (issue 19, item 7).

    `import lightning` gives its `lightning` logger a console handler of its own while leaving it to propagate to
    the root logger; where `timelit.commands.cli.configure_logging` set up a root handler, every INFO line of
    Lightning's was printed twice. That handler is removed, so Lightning's lines pass through timelit's alone."""
    root = logging.getLogger()
    if root.handlers:
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout):
                lightning_logger.removeHandler(handler)
        for handler in root.handlers:
            handler.addFilter(_NO_TIPS)
    for message, category in _LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


# Settings that change what an experiment computes; loader workers and evaluation batch sizes do not (the data
# pipeline's batches are a function of the seed, not of the number of workers).
_EXPERIMENT_KEYS = ("seed_everything", "model", "data", "protocol", "budget")
_NEUTRAL_KEYS = {"data.init_args.num_workers", "data.init_args.eval_batch_size", "data.init_args.synthesize_if_missing"}
# Settings added after runs were saved, with the value a config without them meant: a run started before
# `data.images` existed resumes under the default, not as another experiment.
_ADDED_KEYS = {"data.init_args.images": "host"}


def config_differences(saved: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every experiment setting that differs between two fit configs."""

    def flatten(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}.{key}").items()}
        return {prefix: value}

    old = {k: v for key in _EXPERIMENT_KEYS for k, v in flatten(saved.get(key), key).items()}
    cur = {k: v for key in _EXPERIMENT_KEYS for k, v in flatten(new.get(key), key).items()}
    for config in (old, cur):
        for key, implied in _ADDED_KEYS.items():
            if key.split(".init_args.")[0] + ".class_path" in config:
                config.setdefault(key, implied)
    return [
        f"{key}: {old.get(key)!r} -> {cur.get(key)!r}"
        for key in sorted(old.keys() | cur.keys())
        if key not in _NEUTRAL_KEYS and old.get(key) != cur.get(key)
    ]


def _resolve_config_args(args: list[str]) -> list[str]:
    """Replace `--config NAME` by the path of a shipped config when NAME is not a file."""
    from timelit.utilities.resources import resolve_config

    resolved, take_next = [], False
    for arg in args:
        if take_next:
            resolved.append(str(resolve_config(arg)))
            take_next = False
        elif arg in ("--config", "-c"):
            resolved.append(arg)
            take_next = True
        elif arg.startswith("--config="):
            resolved.append(f"--config={resolve_config(arg.split('=', 1)[1])}")
        else:
            resolved.append(arg)
    return resolved


def run_lightning(args: list[str], run: bool = True) -> TimeLightningCLI:
    """`timelit fit|validate|test ...` (also the entry point the tests call in-process)."""
    from timelit.data.datamodule import TimeDataModule
    from timelit.training.model import CLIPFineTuner

    quiet_lightning()
    return TimeLightningCLI(
        CLIPFineTuner,
        TimeDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=AtomicSaveConfig,
        save_config_kwargs={"overwrite": True},
        # `fit` resumes from the run's last.ckpt by default (a requeued Slurm job must); see cli_defaults/fit.yaml.
        parser_kwargs={"fit": {"default_config_files": [str(DEFAULTS_DIR / "fit.yaml")]}},
        parser_class=TimeArgumentParser,
        args=_resolve_config_args(args),
        run=run,
    )
