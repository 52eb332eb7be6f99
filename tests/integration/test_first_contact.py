"""What a new user sees (issue 19, item 7): a first `timelit fit` prints each line once, no warning or tip, one model
summary and a final summary; a command given a bad input ends in one line naming the culprit, with exit status 2 and
no traceback (unless asked for with --debug or TIMELIT_DEBUG=1)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zipfile
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


@pytest.fixture(scope="module")
def bad(tiny_benchmark: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files that are not what their names say: weights cut short, random bytes, a zip of something else, a torch
    file without a state_dict, weights of another model, a YAML file that does not parse; a folder named like a
    checkpoint and a file where a folder belongs."""
    import torch

    from timelit.merging.safetensors_io import load_weights, save_weights

    folder = tmp_path_factory.mktemp("bad")
    base = tiny_benchmark / "base_model.safetensors"
    weights = load_weights(base)
    (folder / "truncated.safetensors").write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    save_weights(folder / "other_model.safetensors", dict(list(weights.items())[1:]))  # one key short
    torch.save({"state_dict": {f"model.{key}": value for key, value in weights.items()}}, folder / "weights_only.ckpt")
    checkpoint = (folder / "weights_only.ckpt").read_bytes()
    (folder / "truncated.ckpt").write_bytes(checkpoint[: len(checkpoint) // 2])
    (folder / "random.ckpt").write_bytes(random.Random(0).randbytes(4096))
    with zipfile.ZipFile(folder / "archive.ckpt", "w") as archive:
        archive.writestr("notes.txt", "not weights")
    torch.save({"epoch": 3}, folder / "no_state_dict.ckpt")
    (folder / "grid.yaml").write_text("name: x\naxes:\n  a: [1, 2\n")
    (folder / "a_folder.ckpt").mkdir()
    (folder / "a_file").write_text("")
    (folder / "binary.yaml").write_bytes(bytes([0xF4, 0x00, 0xFF]) * 100)
    return folder


# (command line, what the one line must name); {bench} is the tiny benchmark, {empty} an empty folder, {bad} the
# files of the `bad` fixture.
BASE = "{bench}/base_model.safetensors"
MICRO = ["--model.init_args.model_name", "timelit-micro-ViT", "--model.init_args.pretrained", BASE]
DATA = ["--data.init_args.data_root", "{bench}", "--data.init_args.manifests", "{bench}"]


def merge(*args: str) -> list[str]:
    """`timelit merge` of the benchmark's base model with ties, `args` replacing or adding options."""
    options = {"--base": BASE, "--experts": BASE, "--method": "ties", "--out": "{empty}/m.safetensors"}
    options.update(zip(args[::2], args[1::2]))
    return ["merge", *(word for pair in options.items() for word in pair)]


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
    # Files that are not what they claim to be: the one line names the file and what is wrong with it.
    "merge: truncated checkpoint": (
        merge("--experts", "{bad}/truncated.ckpt"), "{bad}/truncated.ckpt: not a torch checkpoint, or a truncated one"
    ),
    "merge: random bytes as a checkpoint": (
        merge("--experts", "{bad}/random.ckpt"), "{bad}/random.ckpt: not a torch checkpoint, or a truncated one"
    ),
    "merge: a zip that is no checkpoint": (
        merge("--base", "{bad}/archive.ckpt"),
        "{bad}/archive.ckpt: not a torch checkpoint, or a truncated one (file in archive is not in a subdirectory",
    ),
    "merge: checkpoint without state_dict": (
        merge("--experts", "{bad}/no_state_dict.ckpt"),
        "{bad}/no_state_dict.ckpt: not a Lightning checkpoint (no 'state_dict')",
    ),
    "merge: truncated safetensors": (
        merge("--experts", "{bad}/truncated.safetensors"),
        "{bad}/truncated.safetensors: the file is truncated: tensor '",
    ),
    "merge: expert of another model": (
        merge("--experts", "{bad}/other_model.safetensors"),
        f"{{bad}}/other_model.safetensors: keys differ from the base {BASE}: missing [",
    ),
    "merge: misspelt skip pattern": (
        merge("--hparams", '{{"skip": ["logit_scal"]}}'),
        f"skip pattern 'logit_scal' matches no key of the base {BASE}; did you mean 'logit_scale'?",
    ),
    "merge: --out a folder": (merge("--out", "{bad}/a_folder.ckpt"), "--out {bad}/a_folder.ckpt is a folder"),
    "merge: chunk_size 0": (merge("--chunk_size", "0"), "--chunk_size must be a positive integer, got 0"),
    # The protocol's technique settings fail when the config is built, before any data is read.
    "fit: misspelt technique hyperparameter": (
        ["fit", "--config", "quickstart.yaml", "--protocol.technique", "ties", "--protocol.hparams", "{{kk: 0.2}}"],
        "protocol.hparams: unknown hyperparameter 'kk' for 'ties'; did you mean 'k'?; valid: ",
    ),
    "fit: technique hyperparameter out of range": (
        ["fit", "--config", "quickstart.yaml", "--protocol.technique", "ties", "--protocol.hparams", "{{k: 2}}"],
        "protocol.hparams of 'ties': k=2 is outside [0.0, 1.0]",
    ),
    "fit: ema_weight out of range": (
        ["fit", "--config", "quickstart.yaml", "--protocol.ema_weight", "2"], "protocol.ema_weight must lie in [0, 1]"
    ),
    "fit: budget of 0 GFLOPs": (
        ["fit", "--config", "quickstart.yaml", "--budget.total_gflops", "0"],
        "budget.total_gflops must be a positive number of GFLOPs, got 0.0",
    ),
    # ... or once the model is built, still before the first step.
    "fit: misspelt skip pattern": (
        ["fit", "--config", "quickstart.yaml", *MICRO, *DATA, "--protocol.technique", "ties",
         "--protocol.hparams", "{{skip: [logit_scal]}}"],
        "protocol.hparams.skip: skip pattern 'logit_scal' matches no key of the base model; did you mean 'logit_sc",
    ),
    "fit: truncated pretrained weights": (
        ["fit", "--config", "quickstart.yaml", *MICRO, *DATA, "--model.init_args.pretrained",
         "{bad}/truncated.safetensors"],
        "{bad}/truncated.safetensors: not a safetensors file, or a truncated one",
    ),
    "validate: truncated checkpoint": (
        ["validate", "--config", "quickstart.yaml", *MICRO, *DATA, "--ckpt_path", "{bad}/truncated.ckpt"],
        "{bad}/truncated.ckpt: not a torch checkpoint, or a truncated one",
    ),
    "validate: weights, not a Lightning checkpoint": (
        ["validate", "--config", "quickstart.yaml", *MICRO, *DATA, "--ckpt_path", "{bad}/weights_only.ckpt"],
        "{bad}/weights_only.ckpt: not a Lightning checkpoint (no 'pytorch-lightning_version')",
    ),
    "validate: a folder as checkpoint": (
        ["validate", "--config", "quickstart.yaml", *MICRO, *DATA, "--ckpt_path", "{bad}/a_folder.ckpt"],
        "Is a directory: {bad}/a_folder.ckpt",
    ),
    "report: --out a file": (["report", "{bench}", "--out", "{bad}/a_file"], "--out {bad}/a_file is a file"),
    "sweep: grid that is not YAML": (
        ["sweep", "--grid", "{bad}/grid.yaml", "--dry_run", "true"],
        "{bad}/grid.yaml: not valid YAML: line 4: expected ',' or ']', but got '<stream end>'",
    ),
    "budget: config that is not YAML": (
        ["budget", "--fit_config", "{bad}/grid.yaml"], "config '{bad}/grid.yaml' is not valid YAML: line 4: expected"
    ),
    "budget: batch size 0": (
        ["budget", "--model_name", "timelit-micro-ViT", "--batch_size", "0", "--num_tasks", "2"],
        "batch_size must be at least 1, got 0",
    ),
    "fit: a binary file as config": (
        ["fit", "--config", "{bad}/binary.yaml"],
        "config {bad}/binary.yaml is not a YAML text file (byte 0 is not UTF-8)",
    ),
    "data synth: negative scale": (
        ["data", "synth", "--out", "{empty}/synth", "--scale", "-1"], "--scale must be a positive number"
    ),
    "data stream: --out a folder": (
        ["data", "stream", "--out", "{bad}/a_folder.ckpt", "--manifests", "{bench}"],
        "Is a directory: {bad}/a_folder.ckpt",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_ends_in_one_line_that_names_it_and_exit_status_2(case, tiny_benchmark, empty, bad, tmp_path):
    args, culprit = BAD_INPUTS[case]
    fill = {"bench": str(tiny_benchmark), "empty": str(empty), "bad": str(bad)}
    result = timelit(*(arg.format(**fill) for arg in args), cwd=tmp_path)
    command = " ".join(args[:2]) if args[0] == "data" else args[0]
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


def test_a_fit_into_a_folder_another_fit_holds_ends_in_one_line_naming_the_holder(
    tiny_benchmark, tmp_path, quick_fit_args
):
    from timelit.utilities.folder_lock import lock_run_folder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = lock_run_folder(run_dir)  # this process stands for the first fit
    try:
        result = timelit(*quick_fit_args(tiny_benchmark, tmp_path, tasks=1, steps=1), cwd=tmp_path)
    finally:
        held.release()
    errors = [line for line in result.stderr.splitlines() if not line.startswith(LEVELS)]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"timelit fit: error: {run_dir} is in use"), result.stderr
    assert f"pid {os.getpid()}" in errors[0]
