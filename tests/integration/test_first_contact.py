"""What a new user sees (issue 19, item 7): a first `timelit fit` prints each line once, no warning or tip, one model
summary and a final summary; a command given a bad input ends in one line naming the culprit, with exit status 2 and
no traceback (unless asked for with --debug or TIMELIT_DEBUG=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

TIMELIT = Path(sys.executable).parent / "timelit"
LEVELS = ("DEBUG ", "INFO ", "WARNING ", "ERROR ", "CRITICAL ")


def timelit(*args: str, cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    """`timelit ARGS` in a folder of the test's own (a config's relative `runs/` lands there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TIMELIT_DEBUG"))}
    env.update(TIMELIT_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1", **({"TIMELIT_DEBUG": "1"} if debug else {}))
    return subprocess.run([str(TIMELIT), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow  # a fit in a subprocess: about 20 s
def test_a_first_fit_prints_each_line_once_no_warning_and_a_final_summary(tiny_benchmark, tmp_path, quick_fit_args):
    args = quick_fit_args(tiny_benchmark, tmp_path, tasks=2, steps=2)
    # The model summary on, as in quickstart.yaml; tasks of 2 steps log every step (Lightning warns of a logging
    # interval longer than a task, which a real quickstart task of 100 steps is not).
    result = timelit(*args, "--trainer.enable_model_summary", "true", "--trainer.log_every_n_steps", "1", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]

    logged = [line for line in output.splitlines() if line.startswith(LEVELS)]
    assert logged, output
    assert [line for line, n in Counter(logged).items() if n > 1] == [], output
    for sign in ("Warning", "WARNING", "warn(", "Tip", "litlogger", "HINT", "deprecated", "Total Flops", "| FLOPs"):
        assert sign not in output, f"{sign!r} in a first run's output:\n{output}"
    assert output.count("Trainable params") == 1 and "GFLOPs per training step" in output

    summary = result.stdout[result.stdout.index("timelit fit: 2 of 2 task(s) done") :]
    run_dir = tmp_path / "run"
    assert "A_KA" in summary and "A_ZS" in summary and "GM" in summary and "(zero-shot -> after task 2)" in summary
    assert f"run folder: {run_dir}" in summary and "results.json" in summary
    assert f"tensorboard --logdir {tmp_path}" in summary


@pytest.fixture(scope="module")
def empty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("empty")


# (command line, what the one line must name); {bench} is the tiny benchmark, {empty} an empty folder.
BASE = "{bench}/base_model.safetensors"
MICRO = ["--model.init_args.model_name", "timelit-micro-ViT", "--model.init_args.pretrained", BASE]
BAD_INPUTS = {
    "merge: missing expert file": (
        ["merge", "--base", BASE, "--experts", "{empty}/expert_0000.safetensors", "--method", "ties",
         "--out", "{empty}/merged.safetensors"],
        "{empty}/expert_0000.safetensors",
    ),
    "merge: empty experts folder": (
        ["merge", "--base", BASE, "--experts", "{empty}", "--method", "ties", "--out", "{empty}/m.safetensors"],
        "{empty}: no expert_NNNN.safetensors files in this folder",
    ),
    "merge: misspelt hyperparameter": (
        ["merge", "--base", BASE, "--experts", BASE, "--method", "ties", "--hparams", '{{"kk": 0.3}}',
         "--out", "{empty}/m.safetensors"],
        "--hparams: unknown hyperparameter 'kk' for 'ties'; did you mean 'k'?",
    ),
    "merge: misspelt method": (
        ["merge", "--base", BASE, "--experts", BASE, "--method", "tiez", "--out", "{empty}/m.safetensors"],
        "method: 'tiez' is not valid (did you mean 'ties'?)",
    ),
    "fit: missing config": (["fit", "--config", "best_in_tme.yaml"], "did you mean protocols/best_in_time.yaml"),
    "fit: misspelt key": (
        ["fit", "--config", "quickstart.yaml", "--protocol.tehcnique", "ties"], "(did you mean '--protocol.technique'?)"
    ),
    "fit: unknown model": (
        ["fit", "--config", "quickstart.yaml", "--model.init_args.model_name", "ViT-B-61"],
        "model_name 'ViT-B-61' is not an open_clip architecture. Did you mean 'ViT-B-16'",
    ),
    "fit: unknown method": (["fit", "--config", "quickstart.yaml", "--protocol.technique", "tiez"], "'ties'"),
    "fit: unknown dataset": (
        ["fit", "--config", "quickstart.yaml", *MICRO, "--data.init_args.data_root", "{bench}",
         "--data.init_args.manifests", "{bench}", "--data.init_args.pretraining_pool", "SYNTH_POOLL"],
        "unknown pretraining pool 'SYNTH_POOLL' (not in {bench}/pools). Did you mean 'SYNTH_POOL'?",
    ),
    "validate: missing checkpoint": (
        ["validate", "--config", "quickstart.yaml", *MICRO, "--data.init_args.data_root", "{bench}",
         "--data.init_args.manifests", "{bench}", "--ckpt_path", "{empty}/last.ckpt"],
        "{empty}/last.ckpt",
    ),
    "report: empty folder": (["report", "{empty}"], "no results.json under {empty}"),
    "data verify: empty folder": (["data", "verify", "--data_root", "{empty}"], "{empty}"),
    "budget: missing config": (["budget", "--fit_config", "nope.yaml"], "config 'nope.yaml'"),
    "budget: unknown model": (["budget", "--model_name", "ViT-B-61"], "'ViT-B-61' is not an open_clip architecture"),
    "sweep: unknown grid": (["sweep", "--grid", "compte"], "'compte' is neither a file nor a shipped grid (did you"),
    "unknown command": (["fitt"], "did you mean 'fit'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_ends_in_one_line_that_names_it_and_exit_status_2(case, tiny_benchmark, empty, tmp_path):
    args, culprit = BAD_INPUTS[case]
    fill = {"bench": str(tiny_benchmark), "empty": str(empty)}
    result = timelit(*(arg.format(**fill) for arg in args), cwd=tmp_path)
    command = "data verify" if args[0] == "data" else args[0]
    errors = [line for line in result.stderr.splitlines() if not line.startswith(LEVELS)]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"timelit {command}: error: "), result.stderr
    assert culprit.format(**fill) in errors[0]
    assert len(errors[0]) < 300


def test_debug_shows_the_traceback_of_a_user_error(empty, tmp_path):
    result = timelit("report", str(empty), debug=True, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr and "no results.json under" in result.stderr
    result = timelit("--debug", "report", str(empty), cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr
