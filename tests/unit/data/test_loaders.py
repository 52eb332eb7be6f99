"""Evaluation batches reject a classification sample whose label cannot index the class list, naming the sample;
a loader's workers, which ignore SIGTERM, can be stopped by whoever built the loader.

python -m pytest tests/unit/data/test_loaders.py -q
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from timelit.data.loaders import EvalBatches, StoppableLoader, loader_kwargs
from timelit.data.shards import ShardIndex, ShardWriter


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def eval_batches(root: Path, task: str, metas: list[dict[str, Any]]) -> EvalBatches:
    """One batch over a test split whose samples carry `metas` as their JSON member."""
    with ShardWriter(root / "DS", "test") as writer:
        for number, meta in enumerate(metas):
            writer.add(f"DS/test/{number:08d}", _png(), "png", f"caption {number}", meta)
    positions = np.arange(len(metas))
    return EvalBatches(
        "DS",
        task,  # type: ignore[arg-type]
        ShardIndex.load(root / "DS", "test"),
        {"subset": positions, "full": positions},
        batch_size=8,
        transform=lambda image: torch.zeros(3, 4, 4),
        tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long),
        on_corrupt="raise",
    )


@pytest.mark.parametrize(
    ("meta", "found"),
    [({}, "no label"), ({"label": -1}, "label -1"), ({"label": "cat"}, "label 'cat'"), ({"label": None}, "label None")],
)
def test_a_classification_sample_without_a_class_index_names_dataset_and_key(tmp_path, meta, found):
    batches = eval_batches(tmp_path, "classification", [{"label": 0}, meta, {"label": 1}])
    expected = rf"evaluation dataset 'DS': sample 'DS/test/00000001' has {found}; .*needs a label in 0\.\.C-1"
    with pytest.raises(ValueError, match=expected):
        next(iter(batches))


def test_labelled_classification_and_unlabelled_retrieval_samples_load(tmp_path):
    classification = next(iter(eval_batches(tmp_path / "c", "classification", [{"label": 2}, {"label": 0}])))
    assert classification["label"].tolist() == [2, 0] and classification["position"].tolist() == [0, 1]
    retrieval = next(iter(eval_batches(tmp_path / "r", "retrieval", [{"captions": ["a", "b"]}, {}])))
    assert retrieval["label"].tolist() == [-1, -1] and retrieval["caption_owner"].tolist() == [0, 0, 1]


class Numbers(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from range(1000)


def test_workers_left_running_by_an_unfinished_iteration_are_stopped_on_request():
    """What `TimeDataModule.on_exception` relies on: after an error the iterator is never finished nor collected,
    and Python's exit handler cannot end workers that ignore SIGTERM."""
    loader = StoppableLoader(Numbers(), batch_size=None, **loader_kwargs(2))
    iterator = iter(loader)
    next(iterator)
    workers = list(iterator._workers)
    assert len(workers) == 2 and all(worker.is_alive() for worker in workers)
    loader.shutdown_workers()
    assert not any(worker.is_alive() for worker in workers)
    loader.shutdown_workers()  # nothing left to stop: a no-op


def test_a_loader_does_not_keep_an_unfinished_iteration_alive():
    """Lightning stops evaluation loaders at their length; dropping the iterator must still stop its workers."""
    loader = StoppableLoader(Numbers(), batch_size=None, **loader_kwargs(2))
    iterator = iter(loader)
    next(iterator)
    workers = list(iterator._workers)
    del iterator
    assert not any(worker.is_alive() for worker in workers)
