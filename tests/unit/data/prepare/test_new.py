"""`timelit data new`: a manifest set written from an image folder or CSV loads, streams and counts images as
`timelit data prepare` will read them; datasets added later extend the stream."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from timelit.data.manifest import ManifestError, load_manifests
from timelit.data.prepare.new import new_dataset
from timelit.data.prepare.records import LayoutError
from timelit.data.streams import load_stream


def _images(root: Path, split: str, classes: list[str], count: int) -> None:
    for name in classes:
        for i in range(count):
            path = root / split / name / "sub" / f"{i}.png"  # images may sit below the class folder
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i, 0, 0)).save(path)


def _csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows([["path", "caption", "label"], *rows])


def test_an_image_folder_becomes_a_set_that_loads_and_streams(tmp_path):
    source = tmp_path / "shapes"
    _images(source, "train", ["10", "2", "1"], 3)
    _images(source, "test", ["1", "2", "10"], 1)
    lines = new_dataset("SHAPES", tmp_path / "set", str(source), num_tasks=2, quickstart=str(tmp_path / "none"))
    manifests = load_manifests(tmp_path / "set")
    shapes = manifests.dataset("SHAPES")
    assert shapes.classnames == ("1", "2", "10")  # natural order
    assert {s: i.num_samples for s, i in shapes.splits.items()} == {"test": 3, "train": 9}
    assert load_stream("stream", manifests, 2).sizes == [2, 1]
    fit = yaml.safe_load((tmp_path / "set" / "fit.yaml").read_text())["data"]["init_args"]
    assert fit["num_tasks"] == 2 and fit["pretraining_pool"] is None and fit["mixture"]["pretraining"] == 0.0
    assert any("no held-out sets (the run reports A_KA alone)" in line for line in lines)


def test_csv_rows_of_one_image_count_once_and_labels_become_classes(tmp_path):
    rows = [["a.png", "first", "cat"], ["a.png", "second", "cat"], ["b.png", "x", "dog"]]
    _csv(tmp_path / "pets" / "train.csv", rows)
    _csv(tmp_path / "pets" / "test.csv", [["c.png", "y", "dog"]])
    new_dataset("PETS", tmp_path / "set", str(tmp_path / "pets"), quickstart=str(tmp_path / "none"))
    pets = load_manifests(tmp_path / "set").dataset("PETS")
    assert pets.classnames == ("cat", "dog") and pets.splits["train"].num_samples == 2
    with pytest.raises(LayoutError, match=r"one CSV, which holds one split.*--role eval"):
        new_dataset("ONE", tmp_path / "set", str(tmp_path / "pets" / "test.csv"), quickstart=str(tmp_path / "none"))
    new_dataset("ONE", tmp_path / "set", str(tmp_path / "pets" / "test.csv"), role="eval")
    assert load_manifests(tmp_path / "set").dataset("ONE").splits["test"].num_samples == 1


def test_a_fomo_in_flux_dataset_joins_the_stream_after_ones_own(tmp_path):
    source = tmp_path / "mine"
    _images(source, "train", ["x", "y"], 1)
    _images(source, "test", ["x", "y"], 1)
    new_dataset("MINE", tmp_path / "set", str(source), quickstart=str(tmp_path / "none"))
    lines = new_dataset("DTD", tmp_path / "set", quickstart=str(tmp_path / "none"))
    stream = json.loads((tmp_path / "set" / "streams" / "stream.json").read_text())
    assert stream[:2] == ["MINE+++x", "MINE+++y"] and len(stream) == 2 + 47 and stream[2].startswith("DTD+++")
    assert any("--datasets DTD --manifests" in line for line in lines)  # prepared from the release by the user
    _images(source, "train", ["z"], 1)
    _images(source, "test", ["z"], 1)
    new_dataset("MINE", tmp_path / "set", str(source), overwrite=True, quickstart=str(tmp_path / "none"))
    stream = json.loads((tmp_path / "set" / "streams" / "stream.json").read_text())
    assert stream[:3] == ["MINE+++x", "MINE+++y", "MINE+++z"] and len(stream) == 3 + 47  # in place, not appended
    with pytest.raises(ManifestError, match=r"no quickstart benchmark at .*timelit data synth"):
        new_dataset("MORE", tmp_path / "set", str(source), held_out=["quickstart"], quickstart=str(tmp_path / "none"))
