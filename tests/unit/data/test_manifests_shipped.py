"""The shipped FoMo-in-Flux manifest set: 63 datasets in the right roles, streams that resolve, and a schema check
that rejects broken manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from timelit.data.manifest import ManifestError, load_manifests
from timelit.data.streams import load_stream
from timelit.resources import manifests_dir

ROOT = manifests_dir()
# DATASETS.md of FoMo-in-Flux: the pipeline's `evaluation.additional_datasets`.
HELD_OUT = {
    "CALTECH101", "CALTECH256", "CARS196", "CIFAR10", "DOMAINNET_QUICKDRAW", "EuroSAT", "FashionMNIST", "Food101",
    "GTSRB", "IMAGENET", "IMAGENET_A", "IMAGENET_D", "IMAGENET_R", "IMAGENET_S", "IMAGENET_V2", "MNIST", "MONKEYS10",
    "OXFORDPETS", "STL10", "SVHN", "MSCOCO", "FLICKR30K",
}  # fmt: skip
STREAMS = sorted(p.stem for p in (ROOT / "streams").glob("*.json"))
SMALL_STREAMS = {"random_sequence_1", "debug_seq_small", "debug_sequence", "random_sequence_1_short"}


@pytest.fixture(scope="module")
def shipped():
    return load_manifests("fomo_in_flux")


def test_the_benchmark_has_41_adaptation_and_22_held_out_datasets(shipped):
    adapt = {m.name for m in shipped.by_role("adapt")}
    held_out = {m.name for m in shipped.by_role("eval")}
    assert len(adapt) == 41 and len(held_out) == 22
    assert held_out == HELD_OUT
    retrieval = {m.name: m.role for m in shipped.datasets.values() if m.task == "retrieval"}
    assert retrieval == {"FSCOCO": "adapt", "MSCOCO": "eval", "FLICKR30K": "eval"}


def test_adaptation_datasets_are_exactly_those_the_streams_name(shipped):
    entries = json.loads((ROOT / "streams" / "random_sequence_1.json").read_text())
    streamed = {entry.split("+++")[0] for entry in entries}
    assert streamed == {m.name for m in shipped.by_role("adapt")}


def test_default_stream_in_20_tasks_covers_every_adaptation_dataset(shipped):
    stream = load_stream("random_sequence_1", shipped, 20)
    assert sum(stream.sizes) == 18381
    assert stream.sizes[0] == 920 and set(stream.sizes[1:]) == {919}  # the pipeline's chunking
    assert set(stream.datasets) == {m.name for m in shipped.by_role("adapt")}


@pytest.mark.parametrize(
    "name", [pytest.param(s, marks=() if s in SMALL_STREAMS else pytest.mark.slow) for s in STREAMS]
)
def test_every_shipped_stream_resolves_against_the_manifests(shipped, name):
    stream = load_stream(name, shipped, 1)
    resolved = sum(len(labels) for labels in stream.labels[0].values())
    assert resolved == len(stream.tasks[0])  # every concept found exactly one class


def test_class_counts_match_the_class_lists_and_names_are_unique():
    for path in sorted((ROOT / "datasets").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if raw["classnames"] is None:
            assert raw["task"] == "retrieval" and raw["num_classes"] is None, path
            continue
        names = json.loads((path.parent / raw["classnames"]).read_text())
        assert raw["num_classes"] == len(names), path
        assert len(set(names)) == len(names), f"{path}: duplicate class names"


def test_class_lists_carry_the_benchmark_sizes(shipped):
    # A few anchors from FoMo-in-Flux's DATASETS.md table.
    sizes = {"CIFAR100": 100, "IMAGENET": 1000, "IMAGENET_V2": 1000, "iNATURALIST2021": 2500, "FSCOCO": 115}
    assert {name: shipped.dataset(name).num_classes for name in sizes} == sizes
    assert sorted(shipped.dataset("IMAGENET_V2").classnames) == sorted(shipped.dataset("IMAGENET").classnames)


def test_retrieval_sets_without_classes_use_the_caption_itself(shipped):
    for name, count in (("MSCOCO", 5000), ("FLICKR30K", 1000)):
        manifest = shipped.dataset(name)
        assert manifest.classnames == () and manifest.prompt_templates == ("{}",)
        assert manifest.splits["test"].num_samples == count


def test_splits_follow_the_role_and_release_split_names_are_recorded(shipped):
    for manifest in shipped.datasets.values():
        assert set(manifest.splits) == ({"train", "test"} if manifest.role == "adapt" else {"test"}), manifest.name
        assert manifest.source["commit"] == "3e123d9" and "ExplainableML/fomo_in_flux" in manifest.source["repository"]
        assert manifest.license
    assert shipped.dataset("iNATURALIST2021").source["release_splits"] == {"train": "train_mini", "test": "val"}


def test_every_prompt_template_is_a_single_primer_and_open_choices_are_flagged(shipped):
    for manifest in shipped.datasets.values():
        assert len(manifest.prompt_templates) == 1 and "{}" in manifest.prompt_templates[0]
    for name in ("GTSRB", "MNIST", "MTSD", "SVHN"):
        notes = yaml.safe_load(shipped.dataset(name).path.read_text())["notes"]
        assert "timelit's choice" in notes


def test_pools_and_licence_ship_with_their_sources(shipped):
    assert set(shipped.pools) == {"LAION400M", "DATACOMP_SMALL"}
    assert shipped.pool("DATACOMP_SMALL").num_samples == 1251473
    assert shipped.pool("LAION400M").num_samples is None
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "3e123d9" in (ROOT / "README.md").read_text()


# --------------------------------------------------------------------------- the schema check on broken sets


def _write_set(root: Path, manifests: dict[str, dict], classnames: dict[str, list[str]]) -> Path:
    (root / "datasets").mkdir(parents=True)
    (root / "classnames").mkdir()
    for file_stem, manifest in manifests.items():
        (root / "datasets" / f"{file_stem}.yaml").write_text(yaml.safe_dump(manifest))
    for name, names in classnames.items():
        (root / "classnames" / f"{name}.json").write_text(json.dumps(names))
    return root


def _manifest(dataset: str, **changes) -> dict:
    manifest = {
        "name": dataset,
        "role": "adapt",
        "task": "classification",
        "classnames": f"../classnames/{dataset}.json",
        "num_classes": 2,
        "prompt_templates": ["a photo of a {}."],
        "splits": {"train": {"num_samples": None}, "test": {"num_samples": None}},
    }
    manifest.update(changes)
    return {k: v for k, v in manifest.items() if v is not ...}


def test_a_valid_small_set_loads(tmp_path):
    root = _write_set(tmp_path / "set", {"A": _manifest("A")}, {"A": ["x", "y"]})
    assert load_manifests(root).dataset("A").classnames == ("x", "y")


@pytest.mark.parametrize("field", ["role", "task", "prompt_templates", "splits", "name"])
def test_schema_rejects_a_missing_field(tmp_path, field):
    root = _write_set(tmp_path / "set", {"A": _manifest("A", **{field: ...})}, {"A": ["x", "y"]})
    with pytest.raises(ManifestError, match=rf"A\.yaml.*missing key '{field}'"):
        load_manifests(root)


def test_schema_rejects_a_class_count_that_does_not_match_the_list(tmp_path):
    root = _write_set(tmp_path / "set", {"A": _manifest("A", num_classes=3)}, {"A": ["x", "y"]})
    with pytest.raises(ManifestError, match=r"'num_classes' is 3 but the class list has 2 names"):
        load_manifests(root)


def test_schema_rejects_a_duplicate_dataset_name(tmp_path):
    root = _write_set(tmp_path / "set", {"A": _manifest("A"), "B": _manifest("A")}, {"A": ["x", "y"]})
    with pytest.raises(ManifestError, match=r"B\.yaml.*'name' is 'A'"):
        load_manifests(root)


def test_schema_rejects_a_pool_named_like_a_dataset(tmp_path):
    root = _write_set(tmp_path / "set", {"A": _manifest("A")}, {"A": ["x", "y"]})
    (root / "pools").mkdir()
    (root / "pools" / "A.yaml").write_text(yaml.safe_dump({"name": "A", "num_samples": None}))
    with pytest.raises(ManifestError, match=r"pool 'A' has the name of a dataset"):
        load_manifests(root)
