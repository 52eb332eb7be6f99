"""TimeMerge on a 3-task quickstart: what each task started from and what was deployed, checked against the stored
experts with merges computed here independently of timelit.merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from timelit.training.callbacks.checkpoint import StreamCheckpoint
from timelit.training.callbacks.results import TaskResults
from timelit.training.callbacks.time_merge import TimeMerge

TASKS = 3


def copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


class Probe(Callback):
    """Copies of the weights at the first step of every task, during every evaluation after a task, and when the
    task's epoch ends (after its evaluation: the weights training goes on from)."""

    def __init__(self) -> None:
        self.start: dict[int, dict[str, torch.Tensor]] = {}
        self.evaluated: dict[int, dict[str, torch.Tensor]] = {}
        self.after_evaluation: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.start[trainer.current_epoch] = copy(pl_module.model)

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.evaluated[trainer.current_epoch] = copy(pl_module.model)

    def on_train_epoch_end(self, trainer, pl_module):
        self.after_evaluation[trainer.current_epoch] = copy(pl_module.model)


def run_protocol(stream_fit, benchmark: Path, run_dir: Path, **protocol) -> tuple[Probe, Path]:
    probe = Probe()
    callbacks = [TimeMerge(**protocol), TaskResults(), StreamCheckpoint(every_n_train_steps=100), probe]
    stream_fit(benchmark, run_dir, callbacks, tasks=TASKS, steps=3)
    return probe, run_dir / "run"


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)


def combine(weights: list[float], models: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: sum(w * m[k].float() for w, m in zip(weights, models)) for k in models[0]}


def expectations(run: Path, w: float = 0.5) -> dict[str, list[dict[str, torch.Tensor]]]:
    """What each quantity is after each task, from the files alone (interpolation with the newer model's weight w,
    uniform `all`)."""
    base = load_file(str(run / "experts" / "base.safetensors"))
    experts = [load_file(str(run / "experts" / f"expert_{t:04d}.safetensors")) for t in range(TASKS)]
    ema, emas = base, []
    for expert in experts:
        ema = combine([1 - w, w], [ema, expert])
        emas.append(ema)
    alls = [combine([1 / (t + 1)] * (t + 1), experts[: t + 1]) for t in range(TASKS)]
    return {
        "zs": [base] * TASKS,
        "ft": experts,
        "ema": emas,
        "all": alls,
        "ft_zs": [combine([1 - w, w], [base, e]) for e in experts],
        "base": [base],
    }


PAIRS = [(init, deploy, 0.5) for init in ("zs", "ft", "ema", "all") for deploy in ("ft", "ema", "all")]
# FT-Merge, and an EMA weight that tells the older model from the newer one.
PAIRS += [("ft_zs", "ft_zs", 0.5), ("ft_zs", "ema", 0.3), ("ema", "ema", 0.3)]


@pytest.mark.slow
@pytest.mark.parametrize(("init", "deploy", "w"), PAIRS, ids=[f"{i}-{d}-w{w}" for i, d, w in PAIRS])
def test_each_task_starts_and_deploys_what_the_protocol_says(tiny_benchmark, tmp_path, stream_fit, init, deploy, w):
    probe, run = run_protocol(stream_fit, tiny_benchmark, tmp_path, init=init, deploy=deploy, ema_weight=w)
    expected = expectations(run, w)
    assert close(probe.start[0], expected["base"][0])  # every protocol starts at θ0
    for task in range(1, TASKS):
        assert close(probe.start[task], expected[init][task - 1]), f"init of task {task}"
    for task in range(TASKS):
        assert close(probe.evaluated[task], expected[deploy][task]), f"deployed after task {task}"
        assert not close(probe.evaluated[task], expected["base"][0])  # training changed something
        # The expert is the weights trained in the task, and they are back in the model after the evaluation.
        assert torch_equal(probe.after_evaluation[task], expected["ft"][task]), f"live weights after task {task}"
    final = load_file(str(run / "final_model.safetensors"))
    assert close(final, expected[deploy][TASKS - 1])
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    live = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert torch_equal(live, expected["ft"][TASKS - 1])  # the checkpoint holds the training weights


def torch_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_other_techniques_reach_the_merge_engine(tiny_benchmark, tmp_path, stream_fit):
    """TIES over all experts (the paper's all/all TIES row) and TA-EMA write what timelit.merging computes; `all`,
    carried as running state from boundary to boundary (protocol.fold_all), has the bits of the merge of every
    expert, and the state files of tasks older than the last two are gone."""
    from timelit.merging import merge

    probe, run = run_protocol(
        stream_fit, tiny_benchmark, tmp_path, init="all", deploy="all", technique="ties", hparams={"k": 0.3}
    )
    base = str(run / "experts" / "base.safetensors")
    experts = [str(run / "experts" / f"expert_{t:04d}.safetensors") for t in range(TASKS)]
    for task in range(TASKS):
        reference = merge(base, experts[: task + 1], "ties", k=0.3) if task else load_file(experts[0])
        assert torch_equal(probe.evaluated[task], reference)
    states = sorted(p.name for p in (run / "experts").glob("all_state_*.safetensors"))
    assert states == [f"all_state_{t:04d}.safetensors" for t in (TASKS - 2, TASKS - 1)]


@pytest.mark.slow
@pytest.mark.parametrize(("init", "deploy"), [("ema", "ema"), ("all", "ema"), ("ema", "all")])
def test_opcm_folds_each_new_expert_into_the_carried_merge(tiny_benchmark, tmp_path, stream_fit, init, deploy):
    """OPCM in `ema` and `all`: each boundary folds the newest expert into the previous merged file with the state
    carried in TimeMerge's checkpoint state, the same bits as OPCM over every expert so far (and `ema` = `all`)."""
    from timelit.merging import merge, read_metadata

    probe, run = run_protocol(stream_fit, tiny_benchmark, tmp_path, init=init, deploy=deploy, technique="opcm")
    base = str(run / "experts" / "base.safetensors")
    experts = [str(run / "experts" / f"expert_{t:04d}.safetensors") for t in range(TASKS)]
    for task in range(TASKS):
        reference = merge(base, experts[: task + 1], "opcm")
        assert torch_equal(probe.evaluated[task], reference), f"deployed after task {task}"
        if task:
            assert torch_equal(probe.start[task], merge(base, experts[:task], "opcm")), f"init of task {task}"
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["callbacks"]
    (merge_state,) = (value["merge_state"] for key, value in state.items() if key.startswith("TimeMerge"))
    assert merge_state["count"] == TASKS and merge_state["scale"] > 1
    last = run / "experts" / f"{deploy}_{TASKS - 1:04d}.safetensors"
    assert json.loads(read_metadata(last)["timelit.merge_state"]) == merge_state


@pytest.mark.slow
def test_validate_of_a_checkpoint_evaluates_what_the_run_deployed(tiny_benchmark, tmp_path, stream_fit, stream_parts):
    """`timelit validate --ckpt_path last.ckpt`: the checkpoint's state_dict is the expert being trained; what is
    evaluated is the deployed model of its last finished task (here the final EMA), and the live weights come back."""
    import lightning as L

    _, run = run_protocol(stream_fit, tiny_benchmark, tmp_path, init="ema", deploy="ema")
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run", version=""),
        callbacks=[TimeMerge(init="ema", deploy="ema"), probe],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model, data = stream_parts(tiny_benchmark, TASKS, 3)
    trainer.validate(model, data, ckpt_path=run / "checkpoints" / "last.ckpt")
    (evaluated,) = probe.evaluated.values()
    assert torch_equal(evaluated, load_file(str(run / "final_model.safetensors")))
    assert torch_equal(copy(model.model), load_file(str(run / "experts" / f"expert_{TASKS - 1:04d}.safetensors")))

    (run / "experts" / f"ema_{TASKS - 1:04d}.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"ema_0002.safetensors: the weights deployed \(ema\) after task 2"):
        trainer.validate(model, data, ckpt_path=run / "checkpoints" / "last.ckpt")
