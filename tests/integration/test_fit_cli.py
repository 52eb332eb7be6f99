"""`timelit fit` as a user runs it: the quickstart end to end, configs that print and run again, errors that name
the culprit, and re-runs that resume instead of mixing experiments."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from timelit.commands.cli import main, run_lightning
from timelit.utilities.errors import UsageError
from timelit.utilities.resources import configs_dir


@pytest.mark.slow
def test_quickstart_runs_the_stream_and_writes_every_output(tiny_benchmark, tmp_path, quick_fit_args):
    run_lightning(quick_fit_args(tiny_benchmark, tmp_path, tasks=3, steps=3))
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["complete"] and [p["tasks_done"] for p in results["points"]] == [0, 1, 2, 3]
    assert {"A_KA", "A_ZS", "GM", "gflops"} <= results["points"][-1].keys()
    assert set(results["full"]) == {"start", "end"}
    assert results["run"]["protocol"]["init"] == "ema" and results["run"]["model"]["model_name"] == "timelit-micro-ViT"
    for path in ("config.yaml", "checkpoints/last.ckpt", "final_model.safetensors", "experts/expert_0002.safetensors"):
        assert (run / path).exists(), path
    assert list(run.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_printed_config_runs_again_unchanged(tiny_benchmark, tmp_path, quick_fit_args):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as exited:
        run_lightning([*quick_fit_args(tiny_benchmark, tmp_path / "a", tasks=1, steps=2), "--print_config"])
    assert exited.value.code == 0
    config = tmp_path / "printed.yaml"
    config.write_text(printed.getvalue())
    assert yaml.safe_load(config.read_text())["protocol"]["deploy"] == "ema"
    run_lightning(["fit", "--config", str(config)])
    assert json.loads((tmp_path / "a" / "run" / "results.json").read_text())["complete"]


@pytest.mark.slow
def test_rerun_resumes_but_refuses_another_experiment(tiny_benchmark, tmp_path, quick_fit_args):
    args = quick_fit_args(tiny_benchmark, tmp_path, tasks=1, steps=2)
    run_lightning(args)
    run_lightning([*args, "--data.init_args.num_workers", "1"])  # a setting that does not change results
    with pytest.raises(ValueError, match=r"another experiment(.|\n)*model.init_args.lr: 0.002 -> 0.01"):
        run_lightning([*args, "--model.init_args.lr", "0.01"])
    run_lightning([*args, "--model.init_args.lr", "0.01", "--ckpt_path", "null"])  # explicitly start over


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        (["--model.init_args.model_name", "ViT-B-61"], ValueError, "not an open_clip architecture.*ViT-B-16"),
        (["--data.init_args.stream", "no_such_stream"], ValueError, "stream 'no_such_stream'"),
        (["--protocol.technique", "tie"], UsageError, r"protocol.technique: 'tie' is not valid \(did you mean 'ties'"),
        (["--protocol.hparams", "{kk: 0.3}", "--protocol.technique", "ties"], ValueError, "did you mean 'k'"),
    ],
)
def test_bad_input_names_the_culprit(tiny_benchmark, tmp_path, quick_fit_args, override, error, message):
    with pytest.raises(error) as raised:
        run_lightning([*quick_fit_args(tiny_benchmark, tmp_path), *override])
    assert raised.match(message)


def test_missing_data_lists_every_missing_split(tiny_benchmark, tmp_path, quick_fit_args):
    root = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, root)
    shutil.rmtree(root / "LETTERS")
    args = quick_fit_args(tiny_benchmark, tmp_path)
    args[args.index("--data.init_args.data_root") + 1] = str(root)
    with pytest.raises(FileNotFoundError, match=r"LETTERS/train(.|\n)*LETTERS/test(.|\n)*timelit data prepare"):
        run_lightning(args)


def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "best_in_time", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["model_name"] == "ViT-B-16"
    assert printed["data"]["init_args"]["num_tasks"] == 20 and printed["budget"]["total_gflops"] == 1.8e9


CONFIGS = sorted(p.relative_to(configs_dir()) for p in configs_dir().rglob("*.yaml") if p.parts[-2] != "sweeps")


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_every_shipped_config_parses(config, capsys):
    """Run configs alone; fragments composed with the config they extend (as their comments show)."""
    base = [] if config.parent == Path(".") else ["--config", "best_in_time.yaml"]
    with pytest.raises(SystemExit) as exited:
        main(["fit", *base, "--config", str(config), "--print_config"])
    assert exited.value.code == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["class_path"] == "timelit.training.model.CLIPFineTuner"


FRAGMENTS = ["protocols/offline_merge.yaml", "data/multitask.yaml", "data/no_replay.yaml"]
# The merge techniques of issue 16 that need more than the element-wise engine: whole-matrix SVDs and OPCM's state.
FRAGMENTS += [f"protocols/{name}.yaml" for name in ("ema_ema_tsv", "ema_ema_opcm", "offline_merge_iso_c")]
FRAGMENTS += ["protocols/offline_merge_iso_cts.yaml"]


@pytest.mark.parametrize("fragment", FRAGMENTS)
@pytest.mark.slow
def test_fragments_have_quickstart_twins_that_run(tiny_benchmark, tmp_path, quick_fit_args, fragment):
    run_lightning([*quick_fit_args(tiny_benchmark, tmp_path, tasks=2, steps=2), "--config", fragment])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["complete"]
    if fragment == "data/multitask.yaml":  # the bound deploys the model it trained, not a merge with θ0
        assert results["run"]["data"]["num_tasks"] == 1
        assert (results["run"]["protocol"]["init"], results["run"]["protocol"]["deploy"]) == ("ft", "ft")
        final, expert = (tmp_path / "run" / p for p in ("final_model.safetensors", "experts/expert_0000.safetensors"))
        assert final.read_bytes() == expert.read_bytes()
