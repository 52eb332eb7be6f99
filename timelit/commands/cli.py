"""The `timelit` command.

    timelit fit --config best_in_time.yaml            the whole stream; resumes from last.ckpt when there is one
    timelit validate --config quickstart.yaml --ckpt_path runs/quickstart/checkpoints/last.ckpt
    timelit data synth --out ~/.cache/timelit/quickstart

`fit`, `validate` and `test` go to a LightningCLI (jsonargparse, `class_path`/`init_args`, `--print_config`,
dotted overrides). The other subcommands are plain typed functions dispatched by jsonargparse: LightningCLI
subcommands must be Trainer methods, so they cannot live inside it. A `--config` that is not a file is looked up
among the configs shipped with timelit, so the commands above work from any directory.

A mistake in what was asked (a missing file or config, an unknown option, method or dataset, an empty folder) ends in
one line naming it and exit status 2, the traceback only under `--debug` or TIMELIT_DEBUG=1
(timelit/utilities/errors.py).

This module imports nothing heavy: the LightningCLI subclass lives in timelit/training/lightning_cli.py and each tool's
module is imported only when that tool runs, so `timelit --help`, `timelit sweep` and `timelit report` start in a
fraction of a second instead of the ~7 s that importing torch and Lightning takes.
"""

from __future__ import annotations

import ast
import importlib
import logging
import os
import sys
from typing import Any

from timelit.utilities import early_signals, errors

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

# Subcommand -> (module, function), one module of timelit/commands per subcommand. Only the module of the command
# being run is imported: the merge and budget commands pull in torch and Lightning (several seconds), which
# `timelit sweep` and `timelit report` never need.
_FUNCTION_COMMANDS: dict[str, Any] = {
    "data": {
        "synth": ("timelit.commands.data", "synth_command"),
        "new": ("timelit.commands.data", "new_command"),
        "prepare": ("timelit.commands.data", "prepare_command"),
        "verify": ("timelit.commands.data", "verify_command"),
        "stream": ("timelit.commands.data", "stream_command"),
    },
    "merge": ("timelit.commands.merge", "merge_command"),
    "budget": ("timelit.commands.budget", "budget_command"),
    "sweep": ("timelit.commands.sweep", "sweep_command"),
    "report": ("timelit.commands.report", "report_command"),
}
# Subcommand -> its module's function that gathers the words a shell gives a list option (`timelit report RUN...`,
# `timelit merge --experts a b c`) into the one token jsonargparse reads for a list.
_GATHER_LISTS = {"report": "report_argv", "merge": "merge_argv"}


def run_lightning(args: list[str]) -> Any:
    """`timelit fit|validate|test ...` (also the entry point the tests call in-process); returns the
    `timelit.training.lightning_cli.TimeLightningCLI` that ran."""
    from timelit.training.lightning_cli import run_lightning as run

    return run(args)


def function_commands(only: str | None = None) -> dict[str, Any]:
    """The non-Lightning subcommands, as jsonargparse dispatches them: all of them, or only the one named `only`
    (when it is one)."""

    def load(tree: dict[str, Any]) -> dict[str, Any]:
        return {
            name: load(entry) if isinstance(entry, dict) else getattr(importlib.import_module(entry[0]), entry[1])
            for name, entry in tree.items()
        }

    if only in _FUNCTION_COMMANDS:
        return load({only: _FUNCTION_COMMANDS[only]})
    return load(_FUNCTION_COMMANDS)


def _summary(module: str, function: str) -> str:
    """The first line of a command's docstring, read from its source rather than imported (see _FUNCTION_COMMANDS)."""
    from timelit.utilities.resources import PACKAGE_DIR

    source = PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return (ast.get_docstring(node) or "").strip().split("\n")[0]
    raise LookupError(f"{function} is not defined in {source}")


def _print_overview() -> None:
    def lines(tree: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for name, entry in tree.items():
            if isinstance(entry, dict):
                out += lines(entry, f"{prefix}{name} ")
            else:
                out.append(f"  {prefix + name:<22}{_summary(*entry)}")
        return out

    print(
        "usage: timelit SUBCOMMAND [options]\n\n"
        "TIME (Temporal Integration of Model Expertise) on FoMo-in-Flux, with PyTorch Lightning.\n\n"
        "Training and evaluation (LightningCLI; `timelit fit --help` lists every option):\n"
        "  fit                   train over the whole stream of tasks (resumes from last.ckpt)\n"
        "  validate              evaluate a checkpoint on the full test splits\n"
        "  test                  same as validate, through Lightning's test loop\n\n"
        "Tools (`timelit data synth --help` etc.):\n" + "\n".join(lines(_FUNCTION_COMMANDS, ""))
    )


def configure_logging() -> None:
    """timelit's own messages at INFO (TIMELIT_LOG_LEVEL overrides); other libraries' (open_clip logs to the root
    logger) at WARNING. Lightning's, which it logs at INFO, pass through the same handler once
    (`timelit.training.lightning_cli.quiet_lightning` removes Lightning's own handler when Lightning is imported)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("timelit").setLevel(os.environ.get("TIMELIT_LOG_LEVEL", "INFO"))


def main(argv: list[str] | None = None) -> None:
    """`timelit ...`: a user error (see timelit.utilities.errors) ends in one line and exit status 2; anything else,
    or any error under `--debug` / TIMELIT_DEBUG=1, in its traceback."""
    debug, args = errors.debug_requested(list(sys.argv[1:] if argv is None else argv))
    if args and args[0] == "fit":
        early_signals.hold()  # a requeue signal during the seconds of imports and set-up must not end the job
    configure_logging()
    try:
        _run(args)
    except BrokenPipeError:
        # The reader of stdout went away (`timelit --help | head`): not an error of the command. Point stdout at
        # /dev/null so that the interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except Exception as error:
        user_error = errors.find_user_error(error)
        if debug or user_error is None:
            raise
        command = " ".join(args[:2] if args[:1] == ["data"] else args[:1])
        print(f"timelit {command}: error: {errors.describe(user_error)}", file=sys.stderr, flush=True)
        raise SystemExit(errors.EXIT_CODE) from None


def _run(args: list[str]) -> None:
    if args and args[0] in LIGHTNING_SUBCOMMANDS:
        try:
            run_lightning(args)
        except BaseException:
            early_signals.release(deliver=False)  # the run failed: its error, not a held signal, ends the process
            raise
        early_signals.release()  # a no-op once Preemption took them
        return
    if not args or args[0] in ("-h", "--help"):
        _print_overview()
        return
    if args[0] not in _FUNCTION_COMMANDS:
        raise errors.UsageError(
            f"no command {args[0]!r}{errors.did_you_mean(args[0], [*LIGHTNING_SUBCOMMANDS, *_FUNCTION_COMMANDS])}; "
            "`timelit --help` lists them"
        )
    commands = function_commands(args[0])
    from jsonargparse import CLI, ArgumentParser

    class Parser(errors.OneLineParserErrors, ArgumentParser):
        pass

    if args[0] in _GATHER_LISTS:
        module = importlib.import_module(_FUNCTION_COMMANDS[args[0]][0])
        args = [args[0], *getattr(module, _GATHER_LISTS[args[0]])(args[1:])]
    CLI(commands, args=args, as_positional=False, parser_class=Parser)
