"""model.compile on CPU, with a backend that only counts graphs (inductor's C++ build would take minutes here): the
towers compile during the first task and its evaluation, and TimeMerge's weight swaps at later task boundaries do not
recompile them."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from timelit.training.callbacks.results import TaskResults
from timelit.training.callbacks.time_merge import TimeMerge


@pytest.mark.slow
def test_compiled_towers_survive_task_boundaries_without_recompiling(tiny_benchmark, tmp_path, stream_fit, monkeypatch):
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):
        graphs.append(1)
        return gm.forward

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **k: original(self, backend=counting_backend))
    torch._dynamo.reset()

    counts: list[int] = []  # graphs compiled by the end of each task's training

    class CountAtTaskEnd(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            counts.append(len(graphs))

    callbacks = [TimeMerge(init="ema", deploy="ema"), TaskResults(), CountAtTaskEnd()]
    stream_fit(tiny_benchmark, tmp_path, callbacks, tasks=3, steps=2, compile=True)
    assert counts[0] > 0, "the towers never went through torch.compile"
    assert counts[1] == counts[2] == len(graphs), f"graphs compiled by each task's end: {counts}, in all {len(graphs)}"
