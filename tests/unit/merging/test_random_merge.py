"""The random merge: per entry one expert's task vector, drawn uniformly and reproducibly (MERGING.md ``random``)."""

from __future__ import annotations

import pytest
import torch

from timelit.merging import merge, validate
from timelit.merging.seeded import BLOCK

N_ENTRIES = 3 * BLOCK + 4321  # several of the draw's blocks, the last one partial


def _labelled(n: int, length: int = N_ENTRIES) -> tuple[dict, list[dict]]:
    """theta_0 = 0 and tau_i = i + 1 everywhere, so a merged entry names the expert that was drawn for it."""
    base = {"w": torch.zeros(length)}
    return base, [{"w": torch.full((length,), float(i + 1))} for i in range(n)]


def test_each_entry_is_one_experts_task_vector_drawn_uniformly():
    base, experts = _labelled(4)
    out = merge(base, experts, "random")["w"]
    counts = torch.bincount(out.long() - 1, minlength=5)
    assert counts[4] == 0 and int(counts.sum()) == N_ENTRIES  # every entry is one of the four task vectors
    expected, sigma = N_ENTRIES / 4, (N_ENTRIES * 0.25 * 0.75) ** 0.5
    assert all(abs(int(count) - expected) < 5 * sigma for count in counts[:4])
    # Neighbouring entries are drawn independently: the same expert twice in a row about 1 time in 4.
    repeats = float((out[1:] == out[:-1]).double().mean())
    assert abs(repeats - 0.25) < 0.01


def test_lam_scales_the_chosen_task_vector(clip_base, perturbed):
    experts = perturbed(clip_base, 3)
    full, half = merge(clip_base, experts, "random"), merge(clip_base, experts, "random", lam=0.5)
    for key, theta_0 in clip_base.items():
        torch.testing.assert_close(half[key] - theta_0, (full[key] - theta_0) / 2, rtol=0, atol=1e-6)
        chosen = torch.stack([expert[key] for expert in experts])
        assert ((full[key] - chosen).abs() < 1e-6).any(0).all()  # every entry is one of the experts


@pytest.mark.parametrize(("chunk_size", "length"), [(7, 1000), (1000, N_ENTRIES), (BLOCK + 1, N_ENTRIES)])
def test_the_same_weights_for_every_chunk_size_and_recomputation(chunk_size, length):
    base, experts = _labelled(3, length)
    reference = merge(base, experts, "random", seed=5)["w"]
    assert torch.equal(merge(base, experts, "random", seed=5, chunk_size=chunk_size)["w"], reference)


def test_files_and_a_restart_give_the_same_weights(clip_base, perturbed, write):
    experts = perturbed(clip_base, 3)
    in_memory = merge(clip_base, experts, "random", seed=2, chunk_size=100)
    paths = [write(f"e{i}", expert) for i, expert in enumerate(experts)]
    streamed = merge(write("base", clip_base), paths, "random", seed=2)
    assert all(torch.equal(in_memory[key], streamed[key]) for key in clip_base)


def test_choices_depend_on_the_seed_and_the_tensor_not_on_the_other_tensors():
    base, experts = _labelled(3, length=1000)
    two = ({"a": base["w"], "b": base["w"]}, [{"a": e["w"], "b": e["w"]} for e in experts])
    out = merge(*two, "random", seed=0)
    assert not torch.equal(out["a"], out["b"])  # the tensor name is part of the draw
    alone = merge({"b": base["w"]}, [{"b": e["w"]} for e in experts], "random", seed=0)["b"]
    assert torch.equal(alone, out["b"])  # merging "a" first changed nothing
    assert not torch.equal(merge(*two, "random", seed=1)["a"], out["a"])


def test_bad_values_are_rejected():
    with pytest.raises(ValueError, match=r"seed must be an integer, got 1\.5"):
        validate("random", {"seed": 1.5})
    with pytest.raises(ValueError, match="lam must be a finite number"):
        validate("random", {"lam": float("inf")})
    with pytest.raises(ValueError, match="the pipeline's scaling_factor is `lam`"):
        validate("random", {"scaling_factor": 1.0})
