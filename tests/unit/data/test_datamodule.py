"""TimeDataModule without a Trainer: what each rank and worker reads, and what a resume skips."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from timelit.data.datamodule import Preprocessing, TimeDataModule
from timelit.data.loaders import TaskLoader, eval_workers
from timelit.data.mixture import Mixture
from timelit.training.clip import build_clip

MICRO = "timelit-micro-ViT"


@pytest.fixture(scope="module")
def preprocessing() -> Preprocessing:
    bundle = build_clip(MICRO)
    return Preprocessing(bundle.train_transform, bundle.eval_transform, bundle.tokenizer)


class _FakeTrainer:
    def __init__(self, rank: int, world: int):
        self.global_rank, self.world_size = rank, world


def make(benchmark, preprocessing, rank=0, world=1, **overrides) -> TimeDataModule:
    settings = dict(
        data_root=str(benchmark), manifests=str(benchmark), stream="random", num_tasks=3, batch_size=16,
        pretraining_pool="SYNTH_POOL", steps_per_task=5, num_workers=0, eval_batch_size=8, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    dm = TimeDataModule(**settings)
    dm.set_preprocessing(preprocessing)
    dm.trainer = _FakeTrainer(rank, world)  # type: ignore[assignment]
    dm.setup("fit")
    return dm


def keys_of(batches) -> list[list[str]]:
    return [batch["keys"] for batch in batches]


def test_batches_follow_the_mixture_and_the_task(tiny_benchmark, preprocessing):
    dm = make(tiny_benchmark, preprocessing)
    batch = dm.task_batches(1).batch(0)
    assert batch["image"].shape == (16, 3, 16, 16) and batch["text"].shape == (16, 12)
    sources = Counter(batch["source"].tolist())
    assert sources == {0: 6, 1: 5, 2: 5}  # 5 / 5 / 5 truncated, then +1 to the pool first, as the pipeline does
    task1 = {str(c) for c in dm.stream.tasks[1]}
    current = [k for k, s in zip(batch["keys"], batch["source"].tolist()) if s == 1]
    concepts = {f"{k.split('/')[0]}+++" for k in current}
    assert all(any(t.startswith(c) for t in task1) for c in concepts)


def test_same_seed_same_batches_other_seed_other_batches(tiny_benchmark, preprocessing):
    first = make(tiny_benchmark, preprocessing).task_batches(2)
    again = make(tiny_benchmark, preprocessing).task_batches(2)
    other = make(tiny_benchmark, preprocessing, seed=1).task_batches(2)
    assert keys_of(first) == keys_of(again)
    assert torch.equal(first.batch(3)["image"], again.batch(3)["image"])  # augmentations are seeded too
    assert keys_of(first) != keys_of(other)


def test_two_ranks_split_the_single_process_batches_exactly(tiny_benchmark, preprocessing):
    """The union of what the ranks read is the one-process batch: DDP changes who reads, not what is read."""
    single = make(tiny_benchmark, preprocessing).task_batches(1)
    ranks = [make(tiny_benchmark, preprocessing, rank=r, world=2).task_batches(1) for r in range(2)]
    for i in range(single.steps):
        whole, parts = single.batch(i), [r.batch(i) for r in ranks]
        assert [len(p["keys"]) for p in parts] == [8, 8]
        assert sorted(parts[0]["keys"] + parts[1]["keys"]) == sorted(whole["keys"])
        assert not set(parts[0]["keys"]) & set(parts[1]["keys"]) or len(set(whole["keys"])) < 16
        joined = torch.cat([parts[0]["image"], parts[1]["image"]])
        order = [whole["keys"].index(k) for k in parts[0]["keys"] + parts[1]["keys"]]
        assert torch.allclose(joined, whole["image"][order])  # same crops whatever the world size


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_yields_exactly_the_remaining_batches(tiny_benchmark, preprocessing, workers):
    dm = make(tiny_benchmark, preprocessing, num_workers=workers)
    loader = TaskLoader(dm.task_batches(2), num_workers=workers)
    full = keys_of(loader)
    assert len(full) == len(loader) == 5
    assert loader.state_dict() == {"task": 2, "batches": 5}
    resumed = TaskLoader(dm.task_batches(2), num_workers=workers)
    resumed.load_state_dict({"task": 2, "batches": 3})
    assert keys_of(resumed) == full[3:] and len(resumed) == 5  # length is the whole task for Lightning
    stale = TaskLoader(dm.task_batches(2), num_workers=workers)
    stale.load_state_dict({"task": 1, "batches": 5})  # a checkpoint from the end of the previous task
    assert keys_of(stale) == full


def test_replay_draws_only_from_earlier_tasks(tiny_benchmark, preprocessing):
    dm = make(tiny_benchmark, preprocessing, mixture=Mixture(0.0, 0.5, 0.5), pretraining_pool=None)
    earlier = {tuple(sorted(dm._candidates(0).tolist()))}
    replay_ids = np.concatenate([p.sequence.candidates for p in dm.task_batches(1).parts if p.name == "replay"])
    assert set(replay_ids.tolist()) == set(next(iter(earlier)))


def test_missing_splits_are_listed_together(tiny_benchmark, preprocessing, tmp_path):
    import shutil

    root = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, root)
    shutil.rmtree(root / "DIGITS")
    (root / "SHAPES" / "test.index.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks 3 prepared split\(s\)(.|\n)*DIGITS/train(.|\n)*SHAPES/test"):
        make(root, preprocessing)


def test_steps_per_task_must_come_from_somewhere(tiny_benchmark, preprocessing):
    with pytest.raises(ValueError, match="ComputeBudget"):
        make(tiny_benchmark, preprocessing, steps_per_task=None).task_batches(0)


def test_evaluation_splits_every_sample_once_across_ranks(tiny_benchmark, preprocessing):
    specs = make(tiny_benchmark, preprocessing).eval_specs
    assert {s.role for s in specs} == {"adapt", "eval"} and len(specs) == 15
    for spec in specs:
        seen = []
        for rank in range(3):
            dm = make(tiny_benchmark, preprocessing, rank=rank, world=3)
            batches = dm.eval_batches(spec, "full")
            for batch in DataLoader(batches, batch_size=None, num_workers=0):
                seen += batch["position"].tolist()
        assert sorted(seen) == list(range(spec.num_samples)), spec.name


def test_evaluation_loaders_fork_no_worker_that_would_get_no_batch_or_the_only_one():
    assert [eval_workers(4, batches) for batches in (0, 1, 2, 3, 9)] == [0, 0, 2, 3, 4]
    assert eval_workers(0, 9) == 0


def test_evaluation_loaders_take_their_workers_from_the_larger_scope(tiny_benchmark, preprocessing):
    dm = make(tiny_benchmark, preprocessing, num_workers=3, eval_batch_size=12)  # 20-25 samples: 2 or 3 batches
    dm.trainer.state = SimpleNamespace(fn=None)  # no fit under way: the full split is evaluated
    loaders = dm.val_dataloader()
    for spec, loader in zip(dm.eval_specs, loaders, strict=True):
        batches = loader.dataset
        full, subset = (-(-len(batches.scoped_positions[s]) // 12) for s in ("full", "subset"))
        assert batches.most_batches == max(full, subset) >= subset
        assert loader.num_workers == eval_workers(3, max(full, subset)), spec.name
    assert len({loader.num_workers for loader in loaders}) > 1, "the fixture should hold sets of different sizes"
