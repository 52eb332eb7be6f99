"""Stream generators: each ordering has the shape its name promises, is seeded, and passes the data module's check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from timelit.commands.data import stream_command
from timelit.data.manifest import ManifestError, load_manifests
from timelit.data.prepare.stream_files import check_stream, dataset_incremental_order, generate_stream, write_stream
from timelit.data.streams import chunk, load_stream

CLASSES = {
    "ALPHA": [f"a{i}" for i in range(8)],
    "BETA": [f"b{i}" for i in range(12)],
    "GAMMA": [f"g{i}" for i in range(4)],
}


@pytest.fixture
def manifests(tmp_path: Path):
    root = tmp_path / "set"
    for sub in ("datasets", "classnames", "streams"):
        (root / sub).mkdir(parents=True)
    for name, classes in {**CLASSES, "HELD": ["h0", "h1"]}.items():
        manifest = {
            "name": name,
            "role": "eval" if name == "HELD" else "adapt",
            "task": "classification",
            "classnames": f"../classnames/{name}.json",
            "num_classes": len(classes),
            "prompt_templates": ["a photo of a {}."],
            "splits": {"train": {}, "test": {}},
            "source": {"test": "tests/unit/data/prepare/test_stream_files.py"},
            "license": "test data",
        }
        (root / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(manifest))
        (root / "classnames" / f"{name}.json").write_text(json.dumps(classes))
    partial = ["ALPHA+++a0", "ALPHA+++a3", "BETA+++b5", "GAMMA+++g1", "GAMMA+++g2"]
    (root / "streams" / "partial.json").write_text(json.dumps(partial))
    return load_manifests(root)


def _datasets_in_order(entries: list[str]) -> list[str]:
    return list(dict.fromkeys(e.split("+++")[0] for e in entries))


def test_random_stream_is_a_seeded_permutation_of_every_adaptation_class(manifests):
    first = generate_stream("random", manifests, seed=1)
    assert sorted(first) == sorted(f"{d}+++{c}" for d, cs in CLASSES.items() for c in cs)
    assert generate_stream("random", manifests, seed=1) == first
    assert generate_stream("random", manifests, seed=2) != first


def test_dataset_incremental_keeps_datasets_contiguous_and_classes_in_list_order(manifests):
    entries = generate_stream("dataset_incremental", manifests, dataset_order=["GAMMA", "ALPHA", "BETA"])
    assert _datasets_in_order(entries) == ["GAMMA", "ALPHA", "BETA"]
    expected = [f"{d}+++{c}" for d in ("GAMMA", "ALPHA", "BETA") for c in CLASSES[d]]
    assert entries == expected


def test_dataset_incremental_without_an_order_shuffles_datasets_by_seed(manifests):
    orders = {tuple(_datasets_in_order(generate_stream("dataset_incremental", manifests, seed=s))) for s in range(8)}
    assert len(orders) > 1 and all(sorted(o) == sorted(CLASSES) for o in orders)


def test_dataset_incremental_can_shuffle_classes_within_each_dataset(manifests):
    entries = generate_stream("dataset_incremental", manifests, seed=3, shuffle_classes=True)
    per_dataset = {d: [e.split("+++")[1] for e in entries if e.startswith(d)] for d in CLASSES}
    assert all(sorted(per_dataset[d]) == sorted(CLASSES[d]) for d in CLASSES)
    assert any(per_dataset[d] != CLASSES[d] for d in CLASSES)


def test_a_given_dataset_order_with_shuffled_classes_is_reproducible(manifests):
    # The seed shuffles the classes even when dataset_order fixes the datasets (it was dropped: OS-seeded shuffles).
    def stream(seed: int) -> list[str]:
        return generate_stream(
            "dataset_incremental", manifests, seed=seed, dataset_order=["GAMMA", "ALPHA", "BETA"], shuffle_classes=True
        )

    first = stream(3)
    assert stream(3) == first
    assert _datasets_in_order(first) == ["GAMMA", "ALPHA", "BETA"]
    assert first != [f"{d}+++{c}" for d in ("GAMMA", "ALPHA", "BETA") for c in CLASSES[d]]  # classes were shuffled
    assert len({tuple(stream(seed)) for seed in range(4)}) > 1


def test_shuffled_classes_need_a_seed(manifests):
    with pytest.raises(ManifestError, match=r"shuffle_classes=True needs a seed"):
        dataset_incremental_order({"ALPHA": list(CLASSES["ALPHA"])}, seed=None, shuffle_classes=True)


@pytest.mark.parametrize("ordering", ["dataset_incremental", "class_incremental"])
@pytest.mark.parametrize(
    ("datasets", "dataset_order", "problem"),
    [
        (["ALPHA", "BETA", "GAMMA"], ["ALPHA", "BETA"], r"missing \['GAMMA'\]"),
        (["ALPHA", "BETA"], ["ALPHA", "BETA", "GAMMA"], r"not among the stream's datasets \['GAMMA'\]"),
        (None, ["ALPHA", "BETA", "ALPHA"], r"repeated \['ALPHA'\]"),
        (["ALPHA", "GAMMA"], ["BETA", "ALPHA"], r"missing \['GAMMA'\]; not among the stream's datasets \['BETA'\]"),
    ],
)
def test_a_dataset_order_must_name_exactly_the_streamed_datasets(manifests, ordering, datasets, dataset_order, problem):
    expected = rf"dataset_order \[.*\] must list each dataset of the stream \[.*\] exactly once: {problem}$"
    with pytest.raises(ManifestError, match=expected):
        generate_stream(ordering, manifests, seed=0, datasets=datasets, dataset_order=dataset_order)


def test_a_random_stream_refuses_a_dataset_order(manifests):
    with pytest.raises(ManifestError, match=r"a random stream has none"):
        generate_stream("random", manifests, dataset_order=["ALPHA", "BETA"])


def test_class_incremental_spreads_every_dataset_over_every_task(manifests):
    entries = generate_stream("class_incremental", manifests, seed=0)
    tasks = chunk(entries, 4)  # GAMMA has 4 classes: one per task
    for task in tasks:
        assert set(_datasets_in_order(task)) == set(CLASSES)
    counts = [[sum(e.startswith(d) for e in task) for task in tasks] for d in CLASSES]
    assert counts == [[2, 2, 2, 2], [3, 3, 3, 3], [1, 1, 1, 1]]


def test_universe_restricts_the_concepts_to_an_existing_stream(manifests):
    entries = generate_stream("random", manifests, seed=0, universe="partial")
    assert sorted(entries) == sorted(json.loads((manifests.root / "streams" / "partial.json").read_text()))


def test_held_out_datasets_cannot_be_streamed(manifests):
    with pytest.raises(ManifestError, match=r"HELD.*held out"):
        generate_stream("random", manifests, datasets=["ALPHA", "HELD"])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["ALPHA+++a0", "NOPE+++x"], r"unknown dataset 'NOPE'"),
        (["ALPHA+++a0", "ALPHA+++zz"], r"has no class 'zz'"),
        (["HELD+++h0"], r"held-out dataset 'HELD'"),
        (["ALPHA+++a0", "ALPHA+++a0"], r"appears twice"),
        (["ALPHA a0"], r"not of the form"),
    ],
)
def test_check_stream_rejects_what_the_manifests_lack(manifests, entries, message):
    with pytest.raises(ManifestError, match=message):
        check_stream(entries, manifests)


def test_a_written_stream_loads_into_tasks(manifests, tmp_path):
    path = write_stream(generate_stream("class_incremental", manifests, seed=5), tmp_path / "out" / "ci.json")
    stream = load_stream(str(path), manifests, 3)
    assert sum(stream.sizes) == 24 and set(stream.datasets) == set(CLASSES)


def test_stream_command_writes_the_file_and_describes_the_tasks(manifests, tmp_path, capsys):
    out = tmp_path / "di.json"
    stream_command(str(out), "dataset_incremental", str(manifests.root), dataset_order=["BETA", "GAMMA"], num_tasks=2)
    assert _datasets_in_order(json.loads(out.read_text())) == ["BETA", "GAMMA"]
    printed = capsys.readouterr().out
    assert "16 concepts from 2 datasets" in printed and "task   1:" in printed


@pytest.mark.slow
def test_shipped_random_reorder_keeps_the_benchmark_concepts():
    shipped = load_manifests("fomo_in_flux")
    entries = generate_stream("class_incremental", shipped, seed=0, universe="random_sequence_1")
    reference = json.loads((shipped.root / "streams" / "random_sequence_1.json").read_text())
    assert len(entries) == 18381 and set(entries) == set(reference)
    assert all(len(_datasets_in_order(task)) >= 35 for task in chunk(entries, 20))
