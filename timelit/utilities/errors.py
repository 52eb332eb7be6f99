"""User errors: what `timelit` reports in one line with exit code 2, the traceback only under a debug flag.

    timelit merge --base base.safetensors --experts nope.safetensors --method ties --out m.safetensors
    timelit merge: error: no such file: nope.safetensors
    timelit --debug merge ...        (or TIMELIT_DEBUG=1) the same error with its traceback

A user error is a mistake in what was asked, not in timelit: a missing file or config, an unknown option, merge
method or dataset, an empty folder, a file that is not what it should be (`UnreadableFileError`: a truncated
checkpoint). Its message names the thing at fault and, where there is a list of valid names, the nearest one
(`did_you_mean`). `timelit.commands.cli.main` treats as one: `UserError` and the domain errors built on it
(ManifestError, LayoutError, GridError, ...), `FileNotFoundError`, `NotADirectoryError` and an OSError EISDIR (a
path that is not there, or a folder where a file was expected), and jsonargparse's parse errors, which the parsers
raise as `UsageError` (`OneLineParserErrors`) instead of printing their 75-line usage. Anything else is a bug or a
failure of the machine and keeps its traceback.

Standard library only: every `timelit` command imports this module before anything heavy.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import pickle
import re
from collections.abc import Iterable, Iterator
from typing import Any

EXIT_CODE = 2  # argparse's status for a usage error
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "TIMELIT_DEBUG"


class UserError(Exception):
    """A mistake in what the user asked for; its message names the file, key, name or folder at fault."""


class UsageError(UserError):
    """A command line or config that jsonargparse refused (unknown option, bad value, missing argument)."""


class UnreadableFileError(UserError, ValueError):
    """A weights file or checkpoint that exists but whose contents cannot be read (truncated, of another format, or
    holding objects a weights-only load refuses); the message names the file."""


CHECKPOINT_LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, OSError)
"""What `torch.load(weights_only=True)` raises on a file that is not a torch checkpoint or is cut short (a truncated
zip: RuntimeError, ValueError or OSError EINVAL; random bytes: UnpicklingError; an empty file: EOFError)."""


def unreadable_checkpoint(path: object, error: BaseException) -> UnreadableFileError | None:
    """`error`, raised by `torch.load(path, weights_only=True)`, as a user error that names the file and says in a few
    words what is wrong with it (torch's messages run to several lines of advice); None for an error of reading the
    file (EIO, EACCES) rather than of its contents. `reading_checkpoint` applies it around a load."""
    if not isinstance(error, CHECKPOINT_LOAD_ERRORS) or (
        isinstance(error, OSError) and error.errno not in (None, errno.EINVAL)
    ):
        return None
    text = " ".join(str(error).split())
    if isinstance(error, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split(" Please use ")[0].split(" Check the doc")[0].strip()
        if "Unsupported global" in text:  # a pickle of objects other than tensors and plain containers
            return UnreadableFileError(
                f"{path}: holds objects that timelit does not unpickle (it loads with weights_only=True): {text}"
            )
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text).split(". This is an internal")[0].strip()
    return UnreadableFileError(f"{path}: not a torch checkpoint, or a truncated one ({text or 'the file ends early'})")


@contextlib.contextmanager
def reading_checkpoint(path: object) -> Iterator[None]:
    """Around a `torch.load(path, weights_only=True)`: a file that is not a torch checkpoint or is cut short ends in
    `unreadable_checkpoint`'s one-line user error; errors of reading it (EIO, EACCES) and all others pass unchanged.

        with reading_checkpoint(path):
            checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    """
    try:
        yield
    except CHECKPOINT_LOAD_ERRORS as error:
        unreadable = unreadable_checkpoint(path, error)
        if unreadable is None:
            raise
        raise unreadable from error


def yaml_problem(error: BaseException) -> str:
    """A YAML parse error (PyYAML's `MarkedYAMLError`, whose str() is five lines with a caret) as `line 4: expected
    ',' or ']', but got '<stream end>' (while parsing a flow sequence)`; any other error as its message on one line."""
    problem, mark = getattr(error, "problem", None), getattr(error, "problem_mark", None)
    if not problem:
        return " ".join(str(error).split())
    context = getattr(error, "context", None)
    return f"{f'line {mark.line + 1}: ' if mark is not None else ''}{problem}{f' ({context})' if context else ''}"


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, (UserError, FileNotFoundError, NotADirectoryError)) or (
        isinstance(error, OSError) and error.errno == errno.EISDIR  # IsADirectoryError, or a WriteError of one
    )


def find_user_error(error: BaseException) -> BaseException | None:
    """`error` if it is a user error, else the first user error it was raised from (`raise ... from`): jsonargparse
    wraps what a class raises while it builds a config's objects (an unknown `model_name`) in errors of its own."""
    seen: BaseException | None = error
    while seen is not None:
        if is_user_error(seen):
            return seen
        seen = seen.__cause__
    return None


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """` (did you mean 'ties'?)` for the choices closest to `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=n)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def debug_requested(args: list[str]) -> tuple[bool, list[str]]:
    """Whether `--debug` is among `args` or TIMELIT_DEBUG is set, and `args` without the flag. The flag is also
    put into the environment, so that the processes a command starts (sweep points, DDP ranks) see it."""
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_VARIABLE, "").lower() in ("1", "true", "yes")
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"
    return debug, [arg for arg in args if arg != DEBUG_FLAG]


MAX_LINES = 12


def describe(error: BaseException) -> str:
    """The message of a user error as the user reads it: one line, or a short listing (the splits a data root
    lacks) cut to MAX_LINES lines, its last line (what to do) kept. An OSError raised with an errno names its path."""
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()] or [type(error).__name__]
    if len(lines) > MAX_LINES:
        cut = len(lines) - MAX_LINES + 1
        lines = [*lines[: MAX_LINES - 2], f"  ... {cut} more line(s) ({DEBUG_FLAG} prints them all)", lines[-1]]
    return "\n".join(lines)


_LITERAL = re.compile(r"Expected a typing\.Literal\[(?P<choices>.*)\]\. Got value: (?P<value>.*)$")
_EXPECTED = re.compile(r"^Expected a (?:<class '(?P<cls>[^']+)'>|(?P<type>\S+?))\.?(?: Got value: (?P<value>.*))?$")
_KEY = re.compile(r'^(?:Parser key|Key) "(?P<key>[^"]+)"')
_NOT_ACCEPTED = re.compile(r"does not accept option '(?P<key>[^']+)'")
_UNRECOGNIZED = "unrecognized arguments: "
_GIVEN = "Given value: "
# Lines of jsonargparse's union errors that say how it tried, not what is wrong.
_NOISE = re.compile(
    r"^(Subtypes:|Errors:|Given value type:|Does not validate against any of the Union subtypes|"
    r"Expected a <class 'NoneType'>|Expected a path but .* either not accessible or invalid|"
    r"Problem with given class_path)"
)


def parse_error_message(message: str, options: Iterable[str] = ()) -> str:
    """jsonargparse's (often nested, multi-line) error as one line, with the nearest valid name where one is close.

    `options` are the command's option strings (`--protocol.technique`), for the suggestion after an unknown one."""
    lines = [line.strip().removeprefix("- ").strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid arguments"
    if lines[0].startswith(_UNRECOGNIZED):
        flags = [arg.split("=", 1)[0] for arg in lines[0][len(_UNRECOGNIZED) :].split() if arg.startswith("-")]
        return lines[0] + (did_you_mean(flags[0], options, n=1) if flags else "")
    if unknown := _NOT_ACCEPTED.search(lines[0]):  # a key of a config file
        return lines[0] + did_you_mean(unknown["key"], [o.lstrip("-") for o in options], n=1)
    key = ".".join(k for line in lines if (m := _KEY.match(line)) for k in [m["key"]] if k != "init_args")
    given = next((line[len(_GIVEN) :] for line in lines if line.startswith(_GIVEN)), None)
    details = [line for line in lines if not (_KEY.match(line) or _NOISE.match(line) or line.startswith(_GIVEN))]
    for line in details:
        if literal := _LITERAL.search(line):
            choices = [c.strip().strip("'\"") for c in literal["choices"].split(",")]
            value = literal["value"].strip()
            hint = did_you_mean(value, choices, n=1) or f"; choose one of {', '.join(choices)}"
            return f"{key or 'value'}: {value!r} is not valid{hint}"
        if expected := _EXPECTED.match(line):
            value = expected["value"] if expected["value"] is not None else given
            got = f", got {value.strip()!r}" if value is not None else ""
            return f"{key or 'value'}: expected {expected['cls'] or expected['type']}{got}"
    detail = " ".join(dict.fromkeys(details)) or (f"not valid: {given!r}" if given is not None else lines[-1])
    return f"{key}: {detail}" if key else detail


class OneLineParserErrors:
    """Mixin for jsonargparse parsers (`class P(OneLineParserErrors, ArgumentParser)`): a parse error becomes a
    `UsageError` with a one-line message instead of the usage text and exit 2 that argparse prints.

    Parsers that jsonargparse builds internally with `exit_on_error=False` (to try the members of a union, say) keep
    raising its ArgumentError, which jsonargparse catches."""

    exit_on_error: bool

    def error(self, message: str, ex: Exception | None = None) -> Any:
        if not self.exit_on_error:
            return super().error(message, ex)  # type: ignore[misc]
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [o for action in getattr(parser, "_actions", ()) for o in action.option_strings]
        raise UsageError(parse_error_message(message, options)) from ex
