"""Incremental `all` merges: running state updated one expert at a time gives the full merge's bits, also after a
process killed in the middle of an update, and techniques that cannot be carried say so."""

from __future__ import annotations

import hashlib
import inspect
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from timelit.merging import TECHNIQUES, merge, validate
from timelit.merging.engine import state_members, update
from timelit.training.callbacks.time_merge import TimeMerge
from timelit.training.protocol import fold_all, merge_all

SMALL_CHUNK = 100  # several unaligned chunks per tensor of the tiny CLIP
EXPERTS = 6

INCREMENTAL = [
    "slerp",
    "task_arithmetic",
    "ties",
    "dare",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "magmax",
    "lines",
]
NOT_INCREMENTAL = {  # why each keeps the full recompute (docs/ARCHITECTURE.md, "The task boundary in O(1)")
    "average": "weights 1/t change with t, and each weighted product is rounded on its own",
    "interpolation": "two models only; `all` under interpolation is the average",
    "model_stock": "t/N weights every expert by a ratio that changes with t",
    "tall_masks": "every mask compares tau_i with the final sum",
    "consensus_ties": "every mask compares tau_i with the final sum",
    "random": "the expert chosen per entry, floor(u t), changes with t",
    "tsv": "SVD of every expert's matrix, ranks r/t",
    "iso_c": "SVD of the summed matrix: incremental sum, but the spectrum is flattened anew",
    "iso_cts": "per-task subspaces in the complement of the common one",
    "opcm": "sequential already (merge_step)",
}

# Each technique with settings that exercise its state: scopes (majority signs, per-tower thresholds), LiNeS with
# alpha="auto" (the extra sum field), seeded masks.
CASES = {
    "slerp": [{}],
    "task_arithmetic": [{"lam": 0.3}, {"lines": True, "lines_alpha": "auto", "scope": "tower"}],
    "ties": [{"k": 0.3, "scope": "tower"}, {"k": 0.2}, {"k": 0.5, "scope": "tensor", "lines": True}],
    "dare": [{"p": 0.5, "seed": 3}],
    "dare_ties": [{"p": 0.7, "scope": "tower"}, {"p": 0.5, "lines": True, "lines_alpha": "auto"}],
    "breadcrumbs": [{"top_drop": 0.05, "bottom_drop": 0.5}],
    "breadcrumbs_ties": [{"top_drop": 0.01, "bottom_drop": 0.7, "scope": "tower"}],
    "magmax": [{"lam": 0.7}],
    "lines": [{}, {"alpha": "auto", "scope": "tower"}],
}
PARAMS = [(method, hparams) for method, cases in CASES.items() for hparams in cases]


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_the_lists_above_cover_every_technique_and_match_the_flags():
    assert set(INCREMENTAL) | set(NOT_INCREMENTAL) == set(TECHNIQUES)
    assert {name for name, kind in TECHNIQUES.items() if kind.incremental} == set(INCREMENTAL)
    assert set(CASES) == set(INCREMENTAL)


def test_help_and_docs_name_the_incremental_techniques():
    """`timelit fit --help` shows TimeMerge's Args: its `technique` entry lists both groups, as the docs do."""
    doc = inspect.getdoc(TimeMerge) or ""
    help_text = " ".join(doc[doc.index("technique:") : doc.index("hparams:")].split())
    architecture = (Path(__file__).parents[3] / "docs" / "ARCHITECTURE.md").read_text()
    section = architecture[architecture.index("### The task boundary in O(1)") :]
    for name in TECHNIQUES:
        if name != "opcm":
            assert name in help_text, name
        assert f"`{name}`" in section, name


@pytest.mark.parametrize(
    ("method", "hparams"), PARAMS, ids=[f"{m}-{i}" for m, c in CASES.items() for i in range(len(c))]
)
def test_updates_one_expert_at_a_time_equal_the_full_merge_bitwise(
    clip_base, perturbed, write, tmp_path, method, hparams
):
    experts = perturbed(clip_base, EXPERTS, scale=0.02)
    paths = [write(f"expert{i}", expert) for i, expert in enumerate(experts)]
    base = write("base", clip_base)
    technique = validate(method, hparams)
    previous = None
    for n in range(1, EXPERTS + 1):
        state = tmp_path / f"state_{n}.safetensors"
        merged = update(technique, base, [paths[n - 1]], previous, state, chunk_size=SMALL_CHUNK)
        previous = state
        assert state_members(state)[0] == n
        if n >= 2:
            assert _equal(merged, merge(base, paths[:n], method, chunk_size=SMALL_CHUNK, **hparams)), n
    # Several new members in one update (a rebuild) fold to the same state, byte for byte.
    rebuilt = tmp_path / "rebuilt.safetensors"
    update(technique, base, paths, None, rebuilt, chunk_size=SMALL_CHUNK)
    assert rebuilt.read_bytes() == previous.read_bytes()


@pytest.mark.parametrize("include_base", [False, True])
def test_fold_all_is_merge_all_and_rebuilds_a_state_it_cannot_use(clip_base, perturbed, write, tmp_path, include_base):
    experts = [write(f"expert{i}", e) for i, e in enumerate(perturbed(clip_base, 5, scale=0.02))]
    prints = [f"sha{i}" for i in range(5)]
    hparams = {"k": 0.3, "scope": "tower"}
    previous = None
    for t in range(5):
        state = tmp_path / f"all_state_{t}.safetensors"
        got = fold_all(clip_base, experts[: t + 1], prints[: t + 1], "ties", hparams, previous, state, include_base)
        assert _equal(got, merge_all(clip_base, experts[: t + 1], "ties", hparams, include_base=include_base))
        previous = state
    members = json.loads(state_members(previous)[1]["timelit.members"])
    assert members == (["base"] if include_base else []) + prints
    # A state of other experts (a changed fingerprint), or none at all, is rebuilt from every member.
    for stale, fingerprints in ((tmp_path / "all_state_3.safetensors", ["x", *prints[1:]]), (None, prints)):
        again = tmp_path / "again.safetensors"
        got = fold_all(clip_base, experts, fingerprints, "ties", hparams, stale, again, include_base)
        assert _equal(got, merge_all(clip_base, experts, "ties", hparams, include_base=include_base))
        assert state_members(again)[0] == 5 + include_base


def test_a_state_of_other_hyperparameters_is_refused(clip_base, perturbed, tmp_path):
    experts = perturbed(clip_base, 2)
    update(validate("ties", {"k": 0.3}), clip_base, experts[:1], None, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="holds the state of ties"):
        update(validate("ties", {"k": 0.2}), clip_base, experts[1:], tmp_path / "a.safetensors", tmp_path / "b.st")


@pytest.mark.parametrize("method", sorted(NOT_INCREMENTAL))
def test_techniques_that_are_not_incremental_refuse_an_update(clip_base, perturbed, tmp_path, method):
    with pytest.raises(ValueError, match="not incremental"):
        update(validate(method, {}), clip_base, perturbed(clip_base, 2), None, tmp_path / "state.safetensors")
    assert not (tmp_path / "state.safetensors").exists()


_KILLED_UPDATE = textwrap.dedent(
    """
    import os, signal, sys
    from timelit.merging import running
    from timelit.training.protocol import fold_all
    base, state, previous, *experts = sys.argv[1:]
    write, calls = running.StateWriter.write, [0]
    def write_then_die(self, name, start, values):
        calls[0] += 1
        if calls[0] == 40:  # in the middle of the state: some chunks written, most not
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, name, start, values)
    running.StateWriter.write = write_then_die
    fold_all(base, experts, [str(i) for i in range(len(experts))], "{method}", {hparams}, previous, state)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "hparams"), [("ties", {"k": 0.3, "scope": "tower"}), ("dare_ties", {"p": 0.5, "lines": True})]
)
def test_a_kill_in_the_middle_of_an_update_leaves_the_old_state_and_resumes_to_the_same_bits(
    clip_base, perturbed, write, tmp_path, method, hparams
):
    """A SIGKILL while the state of expert 4 is being written leaves the state of experts 0-3 as it was and no state
    file of task 4, only a temporary one; running the boundary again gives the bits of an uninterrupted run."""
    base = write("base", clip_base)
    experts = [write(f"expert{i}", e) for i, e in enumerate(perturbed(clip_base, 5, scale=0.02))]
    prints = [str(i) for i in range(5)]
    previous = None
    for t in range(4):
        state = tmp_path / f"all_state_{t}.safetensors"
        fold_all(base, experts[: t + 1], prints[: t + 1], method, hparams, previous, state)
        previous = state
    before = hashlib.sha256(previous.read_bytes()).hexdigest()
    target = tmp_path / "all_state_4.safetensors"
    script = _KILLED_UPDATE.replace("{method}", method).replace("{hparams}", repr(hparams))
    args = [str(p) for p in (base, target, previous, *experts)]
    killed = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not target.exists()
    assert [p.name for p in tmp_path.glob(".all_state_4.safetensors.*.tmp")]  # what the kill left
    assert hashlib.sha256(previous.read_bytes()).hexdigest() == before

    resumed = fold_all(base, experts, prints, method, hparams, previous, target)
    assert _equal(resumed, merge(base, experts, method, **hparams))
    uninterrupted = tmp_path / "uninterrupted.safetensors"
    fold_all(base, experts, prints, method, hparams, previous, uninterrupted)
    assert target.read_bytes() == uninterrupted.read_bytes()
