"""The shipped FoMo-in-Flux manifest set: 63 datasets in the right roles, streams that resolve, and a schema check
that rejects broken manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from timelit.data.manifest import ManifestError, load_manifests
from timelit.data.streams import load_stream
from timelit.utilities.resources import manifests_dir

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


def test_the_only_names_equal_after_lowercasing_are_quilts_two_pairs(shipped):
    # open_clip's tokenizer lowercases, so such a pair shares one prompt and one head row (README: "Class names").
    pairs = {}
    for manifest in shipped.datasets.values():
        first: dict[str, int] = {}
        for label, name in enumerate(manifest.classnames):
            if name.lower() in first:
                pairs.setdefault(manifest.name, []).append((first[name.lower()], label))
            first.setdefault(name.lower(), label)
    assert pairs == {"QUILT": [(69, 70), (130, 131)]}
    quilt = shipped.dataset("QUILT").classnames
    assert quilt[69:71] == ("Dermatopathology and Infectious Disease", "Dermatopathology and Infectious disease")
    assert quilt[130].startswith("Hematopathology") and quilt[130].lower() == quilt[131].lower()


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
        "source": {"test": "tests/unit/data/test_manifests_shipped.py"},
        "license": "test data",
    }
    manifest.update(changes)
    return {k: v for k, v in manifest.items() if v is not ...}


def test_a_valid_small_set_loads(tmp_path):
    root = _write_set(tmp_path / "set", {"A": _manifest("A")}, {"A": ["x", "y"]})
    assert load_manifests(root).dataset("A").classnames == ("x", "y")


def test_a_retrieval_set_without_classes_states_null_for_both_class_keys(tmp_path):
    manifest = _manifest("R", role="eval", task="retrieval", classnames=None, num_classes=None,
                         prompt_templates=["{}"], splits={"test": {"num_samples": 3}})  # fmt: skip
    loaded = load_manifests(_write_set(tmp_path / "set", {"R": manifest}, {})).dataset("R")
    assert loaded.classnames == () and loaded.splits["test"].num_samples == 3


def test_class_names_equal_only_after_lowercasing_are_two_classes(tmp_path):
    # QUILT ships such a pair; they are distinct classes of the release (README: "Class names").
    names = ["Infectious Disease", "Infectious disease"]
    root = _write_set(tmp_path / "set", {"A": _manifest("A")}, {"A": names})
    assert load_manifests(root).dataset("A").labels_of("Infectious disease") == [1]


@pytest.mark.parametrize(
    "field", ["role", "task", "prompt_templates", "splits", "name", "classnames", "num_classes", "source", "license"]
)
def test_schema_rejects_a_missing_field(tmp_path, field):
    root = _write_set(tmp_path / "set", {"A": _manifest("A", **{field: ...})}, {"A": ["x", "y"]})
    with pytest.raises(ManifestError, match=rf"A\.yaml.*missing key '{field}'"):
        load_manifests(root)


RETRIEVAL = {"task": "retrieval", "prompt_templates": ["{}"]}


@pytest.mark.parametrize(
    ("changes", "classes", "message"),
    [
        pytest.param({"num_classes": 3}, ["x", "y"], r"key 'num_classes' is 3 but the class list has 2", id="count"),
        pytest.param({"num_classes": None}, ["x", "y"], r"key 'num_classes' is null but the class list has 2",
                     id="count-null"),
        pytest.param({"num_classes": True}, ["x"], r"key 'num_classes' must be an integer or null", id="count-bool"),
        pytest.param({"classnames": None, "num_classes": None}, [], r"key 'classnames' is null, but a classification",
                     id="classification-without-list"),
        pytest.param({**RETRIEVAL, "classnames": ..., "num_classes": ...}, [], r"missing key 'classnames'",
                     id="retrieval-without-keys"),
        pytest.param({**RETRIEVAL, "classnames": None}, [], r"key 'num_classes' is 2 but key 'classnames' is null",
                     id="retrieval-count-without-list"),
        pytest.param({"classnames": 3}, [], r"key 'classnames' must be a path to a JSON class list or null",
                     id="list-not-a-path"),
        pytest.param({"num_classes": 0}, [], r"key 'classnames' points to an empty class list", id="empty-list"),
        pytest.param({**RETRIEVAL, "num_classes": 0}, [], r"key 'classnames' points to an empty class list",
                     id="retrieval-empty-list"),
        pytest.param({"num_classes": 3}, ["x", "y", "x"],
                     r"key 'classnames' \(.*\) of dataset 'A' lists the class name 'x' twice \(labels 0 and 2\)",
                     id="duplicate-name"),
        pytest.param({"splits": {"train": 5, "test": {}}}, ["x", "y"], r"key 'splits\.train' must be a mapping",
                     id="split-not-a-mapping"),
        pytest.param({"splits": {"train": {}, "test": None}}, ["x", "y"], r"key 'splits\.test' must be a mapping",
                     id="split-null"),
        pytest.param({"splits": {"train": {"num_sample": 3}, "test": {}}}, ["x", "y"],
                     r"key 'splits\.train' has unknown keys \['num_sample'\]", id="split-unknown-key"),
        pytest.param({"splits": {"train": {"num_samples": -1}, "test": {}}}, ["x", "y"],
                     r"key 'splits\.train\.num_samples' must be a non-negative integer", id="split-negative-count"),
        pytest.param({"prompt_templates": ["a photo"]}, ["x", "y"], r"key 'prompt_templates\[0\]' is 'a photo'",
                     id="template-without-field"),
        pytest.param({"prompt_templates": ["{}", "a {} of a {}."]}, ["x", "y"],
                     r"key 'prompt_templates\[1\]' .*exactly one '\{\}'", id="template-two-fields"),
        pytest.param({"prompt_templates": ["a photo of a {name}."]}, ["x", "y"],
                     r"key 'prompt_templates\[0\]' .*exactly one '\{\}'", id="template-named-field"),
        pytest.param({"prompt_templates": ["a {} {"]}, ["x", "y"], r"key 'prompt_templates\[0\]' .*not a format",
                     id="template-lone-brace"),
        pytest.param({"prompt_templates": [3]}, ["x", "y"], r"key 'prompt_templates\[0\]' must be a string",
                     id="template-not-a-string"),
        pytest.param({"prompt_templates": []}, ["x", "y"], r"key 'prompt_templates' must be a non-empty list",
                     id="no-template"),
        pytest.param({"source": "FoMo-in-Flux"}, ["x", "y"], r"key 'source' must be dict", id="source-not-a-mapping"),
        pytest.param({"license": " "}, ["x", "y"], r"key 'license' is empty", id="empty-license"),
    ],
)  # fmt: skip
def test_schema_rejects_a_broken_manifest_naming_file_and_key(tmp_path, changes, classes, message):
    root = _write_set(tmp_path / "set", {"A": _manifest("A", **changes)}, {"A": classes})
    with pytest.raises(ManifestError, match=rf"datasets/A\.yaml: .*{message}"):
        load_manifests(root)


def test_schema_rejects_a_class_list_that_is_not_json(tmp_path):
    root = _write_set(tmp_path / "set", {"A": _manifest("A")}, {})
    (root / "classnames" / "A.json").write_text("['x', 'y']")
    with pytest.raises(ManifestError, match=r"A\.yaml: key 'classnames' \(.*A\.json\): not valid JSON"):
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
