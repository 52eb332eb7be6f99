"""timelit/commands/cli.py: the dispatcher that every `timelit` command imports stays free of torch and Lightning."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from timelit.commands import cli

HEAVY = ("torch", "lightning", "open_clip")


def modules_after(code: str) -> set[str]:
    """The heavy top-level modules imported by `code`, run in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint('loaded:', *sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(result.stdout.strip().splitlines()[-1].split()[1:])


def test_importing_the_dispatcher_imports_no_heavy_library():
    assert modules_after("import timelit.commands.cli") == set()


@pytest.mark.parametrize("argv", [["--help"], ["sweep", "--help"], ["report", "--help"]])
def test_help_and_the_light_tools_start_without_torch(argv):
    code = f"from timelit.commands.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass"
    assert modules_after(code) == set()


def test_only_the_named_tool_is_loaded():
    assert list(cli.function_commands("sweep")) == ["sweep"]
    assert list(cli.function_commands("data")["data"]) == ["synth", "new", "prepare", "verify", "stream"]
    assert set(cli.function_commands("no-such-tool")) == set(cli.function_commands())  # jsonargparse names the error


def test_the_overview_shows_each_tools_own_docstring(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    loaded = cli.function_commands()
    tools = [("data " + name, fn) for name, fn in loaded.pop("data").items()] + list(loaded.items())
    for name, function in tools:
        assert f"  {name:<22}{function.__doc__.strip().splitlines()[0]}\n" in out
    for lightning_command in cli.LIGHTNING_SUBCOMMANDS:
        assert f"\n  {lightning_command} " in out


def test_python_dash_m_timelit_is_the_timelit_command():
    def timelit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "timelit", *args], capture_output=True, text=True, timeout=120)

    result = timelit("--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: timelit SUBCOMMAND")
    result = timelit("sweep", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: timelit [options] sweep")
    result = timelit("fitt")
    assert result.returncode == 2 and "did you mean 'fit'" in result.stderr


def test_help_into_a_closed_pipe_ends_quietly():
    """`timelit --help | head -1`: the reader is gone before timelit writes; no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "timelit", "--help"], stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode()
