"""timelit/utilities/errors.py: jsonargparse's errors as one line with the nearest valid name, and user errors as the
user reads them. The messages are jsonargparse's own (4.x), as `timelit fit` produced them."""

from __future__ import annotations

import errno
import io
import pickle
import zipfile

import pytest
import torch
import yaml

from timelit.utilities.disk_space import WriteError
from timelit.utilities.errors import (
    CHECKPOINT_LOAD_ERRORS,
    UnreadableFileError,
    UserError,
    describe,
    did_you_mean,
    find_user_error,
    is_user_error,
    parse_error_message,
    unreadable_checkpoint,
    yaml_problem,
)

TECHNIQUES = "'average', 'interpolation', 'slerp', 'task_arithmetic', 'ties', 'dare'"

MESSAGES = [
    (
        f'Parser key "protocol.technique":\n  Expected a typing.Literal[{TECHNIQUES}]. Got value: tiez',
        "protocol.technique: 'tiez' is not valid (did you mean 'ties'?)",
    ),
    (
        f'Parser key "method":\n  Expected a typing.Literal[{TECHNIQUES}]. Got value: zzz',
        "method: 'zzz' is not valid; choose one of average, interpolation, slerp, task_arithmetic, ties, dare",
    ),
    (
        'Parser key "data":\n  Does not validate against any of the Union subtypes\n  Subtypes: [<class '
        "'timelit.data.datamodule.TimeDataModule'>, <class 'NoneType'>]\n  Errors:\n    - Problem with given "
        "class_path 'timelit.data.datamodule.TimeDataModule':\n        Parser key \"mixture.pretraining\":\n        "
        "  Expected a <class 'float'>. Got value: x\n    - Expected a <class 'NoneType'>\n  Given value type: <class "
        "'jsonargparse._util.NestedArg'>\n  Given value: NestedArg(key='mixture.pretraining', val='x')",
        "data.mixture.pretraining: expected float, got 'x'",
    ),
    (
        'Parser key "protocol.hparams":\n  Does not validate against any of the Union subtypes\n  Subtypes: '
        "[dict[str, typing.Any], <class 'NoneType'>]\n  Errors:\n    - Expected a <class 'dict'>\n    - Expected a "
        "<class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: {kk:",
        "protocol.hparams: expected dict, got '{kk:'",
    ),
    (
        'Parser key "model":\n\n  - Expected a path but timelit.training.model.Nope either not accessible '
        "or invalid\n  - Does not validate against any of the Union subtypes\n  Subtypes: [<class "
        "'timelit.training.model.CLIPFineTuner'>, <class 'NoneType'>]\n  Errors:\n    - Problem with given "
        "class_path 'timelit.training.model.Nope':\n        module 'timelit.training.model' has no "
        "attribute 'Nope'\n    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given "
        "value: timelit.training.model.Nope",
        "model: module 'timelit.training.model' has no attribute 'Nope'",
    ),
    ("unrecognized arguments: --protocol.tehcnique ties", "(did you mean '--protocol.technique'?)"),
    ("unrecognized arguments: --bogus 3", "unrecognized arguments: --bogus 3"),
    (
        "Subcommand 'fit' does not accept option 'protocl.init'",
        "Subcommand 'fit' does not accept option 'protocl.init' (did you mean 'protocol.init'?)",
    ),
    ("the following arguments are required: merge.base", "the following arguments are required: merge.base"),
]


@pytest.mark.parametrize(("message", "expected"), MESSAGES)
def test_jsonargparse_errors_become_one_line_with_the_nearest_name(message, expected):
    line = parse_error_message(message, ["--protocol.technique", "--protocol.init", "--config"])
    assert "\n" not in line
    assert line == expected if not expected.startswith("(") else line.endswith(expected)


def test_a_long_listing_is_cut_and_keeps_its_last_line():
    error = FileNotFoundError(
        "data_root d lacks 40 prepared split(s):\n" + "\n".join(f"  D{i}/train" for i in range(40)) + "\nPrepare them"
    )
    lines = describe(error).splitlines()
    assert len(lines) == 12 and lines[0].startswith("data_root d lacks") and lines[-1] == "Prepare them"
    assert "31 more line(s) (--debug prints them all)" in lines[-2]  # 42 lines: 10 shown, the last kept


def test_an_oserror_names_its_path_and_only_user_errors_count():
    assert (
        describe(FileNotFoundError(2, "No such file or directory", "/x/y.ckpt"))
        == "No such file or directory: /x/y.ckpt"
    )
    assert is_user_error(FileNotFoundError("x")) and is_user_error(NotADirectoryError("x"))
    assert not is_user_error(ValueError("x")) and not is_user_error(RuntimeError("x"))
    assert did_you_mean("tiez", ["ties", "dare"]) == " (did you mean 'ties'?)" and did_you_mean("q", ["ties"]) == ""


def test_a_user_error_is_found_behind_the_errors_raised_from_it():
    """jsonargparse raises its own ValueError from what a class raised while it was built (`timelit fit` with an
    unknown model_name): the one line names the user's mistake, not the wrapper."""
    cause = UserError("model_name 'ViT-B-61' is not an open_clip architecture")
    try:
        try:
            raise cause
        except UserError as error:
            raise ValueError("Does not validate against any of the Union subtypes") from error
    except ValueError as wrapper:
        assert find_user_error(wrapper) is cause
    bug = RuntimeError("a bug")
    bug.__context__ = FileNotFoundError("x")  # raised while handling one, not from it: still a bug
    assert find_user_error(bug) is None and find_user_error(ValueError("x")) is None


def test_a_folder_where_a_file_belongs_is_a_user_error_also_behind_a_write_error():
    assert is_user_error(IsADirectoryError(errno.EISDIR, "Is a directory", "out"))
    written = WriteError(errno.EISDIR, "Is a directory", "out.json", None)  # atomic_file renaming onto a folder
    assert find_user_error(written) is written and describe(written) == "Is a directory: out.json"
    assert not is_user_error(WriteError(errno.ENOSPC, "No space left on device", "out.json", 0))


def _zip_of_notes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not weights")
    return buffer.getvalue()


class _NotAWeight:
    pass


def _saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "x.ckpt: not a torch checkpoint, or a truncated one (the file ends early)"),
        (_saved({"w": torch.ones(64)})[:-100], "x.ckpt: not a torch checkpoint, or a truncated one (PytorchStream"),
        (b"\x80\x02garbage" * 64, "x.ckpt: not a torch checkpoint, or a truncated one ("),
        (_zip_of_notes(), "x.ckpt: not a torch checkpoint, or a truncated one (file in archive is not in a subdir"),
        (
            _saved({"a": _NotAWeight()}),
            "x.ckpt: holds objects that timelit does not unpickle (it loads with weights_only",
        ),
    ],
    ids=["empty", "truncated", "random", "zip of something else", "other objects"],
)
def test_what_torch_load_refuses_is_one_line_naming_the_file(data, expected):
    with pytest.raises(CHECKPOINT_LOAD_ERRORS) as raised:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    error = unreadable_checkpoint("x.ckpt", raised.value)
    assert isinstance(error, UnreadableFileError) and is_user_error(error)
    assert str(error).startswith(expected) and "\n" not in str(error) and len(str(error)) < 200


def test_an_error_of_reading_a_file_is_not_a_fault_of_its_contents():
    assert unreadable_checkpoint("x.ckpt", PermissionError(errno.EACCES, "Permission denied", "x.ckpt")) is None
    assert unreadable_checkpoint("x.ckpt", OSError(errno.EIO, "Input/output error")) is None
    assert unreadable_checkpoint("x.ckpt", KeyError("state_dict")) is None
    assert isinstance(unreadable_checkpoint("x.ckpt", pickle.UnpicklingError("bad")), UnreadableFileError)


def test_a_yaml_error_is_one_line_with_its_line_number():
    with pytest.raises(yaml.YAMLError) as raised:
        yaml.safe_load("name: x\naxes:\n  a: [1, 2\n")
    assert (
        yaml_problem(raised.value)
        == "line 4: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)"
    )
    with pytest.raises(yaml.YAMLError) as raised:
        yaml.safe_load("a: b: c\n")
    assert yaml_problem(raised.value) == "line 1: mapping values are not allowed here"
    assert yaml_problem(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")).startswith("'utf-8' codec")
