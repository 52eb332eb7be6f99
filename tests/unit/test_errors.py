"""timelit/utilities/errors.py: jsonargparse's errors as one line with the nearest valid name, and user errors as the
user reads them. The messages are jsonargparse's own (4.x), as `timelit fit` produced them."""

from __future__ import annotations

import pytest

from timelit.utilities.errors import (
    UserError,
    describe,
    did_you_mean,
    find_user_error,
    is_user_error,
    parse_error_message,
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
