"""`timelit data prepare` decodes every image once: a bad file is named by its source path (or, with
`--skip_bad true`, left out and listed), and an img2dataset pool reads the same whatever order its members have."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from webdataset import TarWriter

from timelit.commands.data import prepare_command
from timelit.data.manifest import ManifestError
from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.records import LayoutError
from timelit.data.prepare.run import PrepareError, prepare
from timelit.data.prepare.verify import verify
from timelit.data.shards import ShardIndex

CLASSES = ["0", "1", "2"]
TRUNCATED = "2/2_1.png"  # train image whose file is cut short


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (32, 32), value).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> dict[str, Path]:
    """An image folder of three classes (train 3, test 2 images each) with one truncated PNG, and its manifest set
    stating the counts of images found (9 train, 6 test)."""
    manifests, source = tmp_path / "manifests", tmp_path / "digits"
    (manifests / "datasets").mkdir(parents=True)
    (manifests / "classnames").mkdir()
    (manifests / "pools").mkdir()
    for split, per_class in (("train", 3), ("test", 2)):
        for label in CLASSES:
            for i in range(per_class):
                path = source / split / label / f"{label}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_png(40 * int(label) + i))
    bad = source / "train" / TRUNCATED
    bad.write_bytes(bad.read_bytes()[:60])
    manifest = {
        "name": "DIGITS",
        "role": "adapt",
        "task": "classification",
        "classnames": "../classnames/DIGITS.json",
        "num_classes": 3,
        "prompt_templates": ["a photo of the digit {}."],
        "splits": {"train": {"num_samples": 9}, "test": {"num_samples": 6}},
        "source": {},
        "license": "test data",
    }
    (manifests / "datasets" / "DIGITS.yaml").write_text(yaml.safe_dump(manifest))
    (manifests / "classnames" / "DIGITS.json").write_text(json.dumps(CLASSES))
    (manifests / "pools" / "POOL.yaml").write_text(yaml.safe_dump({"name": "POOL", "num_samples": None}))
    return {"manifests": manifests, "source": source, "data": tmp_path / "data", "root": tmp_path}


def _prepare(folder: dict[str, Path], **kwargs):
    return prepare(
        PrepareOptions(
            str(folder["source"]),
            folder["data"],
            layout="imagefolder",
            datasets=["DIGITS"],
            manifests=folder["manifests"],
            samples_per_shard=4,
            **{"workers": 0, **kwargs},
        ),
        progress=False,
    )


def test_a_truncated_image_stops_prepare_naming_its_source_file(folder):
    with pytest.raises(PrepareError) as error:
        _prepare(folder, workers=2)  # decoded in the worker processes
    message = str(error.value)
    assert f"DIGITS/train: bad image {folder['source'] / 'train' / TRUNCATED}: OSError" in message
    assert "--skip_bad true" in message
    assert not (folder["data"] / "DIGITS" / "train.index.safetensors").exists()  # the split reads as not prepared


def test_skip_bad_leaves_it_out_and_lists_it_in_a_report_and_the_summary(folder, capsys):
    with pytest.raises(PrepareError):
        _prepare(folder)
    prepare_command(
        source=str(folder["source"]),
        data_root=str(folder["data"]),
        layout="imagefolder",
        datasets="DIGITS",  # one name, no brackets
        manifests=str(folder["manifests"]),
        samples_per_shard=4,
        workers=0,
        skip_bad=True,
    )
    out = capsys.readouterr().out
    source = folder["source"] / "train" / TRUNCATED
    assert f"DIGITS/train: skipped 1 bad image(s): {source}" in out  # the summary line
    report = folder["data"] / "DIGITS" / "train.skipped.tsv"
    assert report.read_text().startswith(f"{source}\tOSError: ")
    assert "resumed" in out  # the shards written before the error are kept
    assert len(ShardIndex.load(folder["data"] / "DIGITS", "train")) == 8  # 9 images found, 8 stored; count holds
    checks = {c.split: c for c in verify(folder["data"], folder["manifests"], datasets=["DIGITS"], decode=True)}
    assert checks["train"].problems == [] and "1 bad image(s) left out at prepare" in checks["train"].warnings[0]
    again = _prepare(folder, skip_bad=True)
    assert [r.status for r in again] == ["up to date", "up to date"]
    assert any("1 bad image(s) skipped" in note for r in again for note in r.notes)


def test_a_rerun_without_skip_bad_names_the_image_left_out_before(folder):
    _prepare(folder, skip_bad=True)
    (folder["data"] / "DIGITS" / "train.index.safetensors").unlink()  # as if interrupted before the index
    with pytest.raises(PrepareError, match=r"bad image .*2_1.png: OSError"):
        _prepare(folder)


def test_a_class_folder_the_manifest_lacks_is_counted_in_images(folder):
    for i in range(4):
        (folder["source"] / "train" / "7" / f"{i}.png").parent.mkdir(exist_ok=True)
        (folder["source"] / "train" / "7" / f"{i}.png").write_bytes(_png(i))
    with pytest.raises(PrepareError, match=r"'7': 4 image\(s\)"):
        _prepare(folder, skip_bad=True)


def test_layouts_of_one_dataset_take_a_name_without_brackets_and_say_so(folder):
    with pytest.raises(LayoutError, match=r"pass --datasets NAME"):
        prepare(
            PrepareOptions(str(folder["source"]), folder["data"], layout="imagefolder", manifests=folder["manifests"])
        )


def test_a_forgotten_manifests_option_is_one_error_naming_the_fix(folder):
    _prepare(folder, skip_bad=True)
    with pytest.raises(ManifestError, match=r"^unknown dataset 'DIGITS' in .*\(the shipped FoMo-in-Flux set\)\. Pass "):
        prepare(
            PrepareOptions(str(folder["source"]), folder["data"], layout="imagefolder", datasets="DIGITS"),
            progress=False,
        )
    # verify against the shipped set: one line instead of a "not prepared" row for each of its 104 splits
    with pytest.raises(ManifestError, match=r"holds none of the 63 datasets .*\(it holds DIGITS\); pass --manifests"):
        verify(folder["data"])


# --------------------------------------------------------------------------- pools


def _pool(folder: Path, order_seed: int | None, bad_key: str | None = None) -> None:
    """Two img2dataset shards of one URL list; members in the order downloads finished (`order_seed` shuffles it,
    None keeps key order), as two downloads of the same list write them."""
    folder.mkdir(parents=True)
    for shard in range(2):
        keys = [f"{shard:05d}{i:04d}" for i in range(5)]
        if order_seed is not None:
            random.Random(order_seed + shard).shuffle(keys)
        with TarWriter(str(folder / f"{shard:05d}.tar"), mtime=0.0) as writer:
            for key in keys:
                image = b"\x89PNG cut" if key == bad_key else _png(int(key[-2:]) * 10 + shard)
                meta = {"url": f"https://example.invalid/{key}.png", "key": key, "status": "success"}
                writer.write({"__key__": key, "png": image, "txt": f"pair {key}", "json": meta})


def _pool_samples(data: Path) -> list[tuple[str, bytes, bytes]]:
    index = ShardIndex.load(data / "POOL", "train")
    try:
        return [(raw["__key__"], raw["png"], raw["txt"]) for raw in (index.read(i) for i in range(len(index)))]
    finally:
        index.close()


def test_a_pool_reads_in_key_order_whatever_the_order_of_its_members(folder):
    runs = {}
    for seed in (None, 1, 2):
        source, data = folder["root"] / f"pool_{seed}", folder["root"] / f"data_{seed}"
        _pool(source, seed)
        prepare(
            PrepareOptions(str(source), data, layout="pool", datasets="POOL", manifests=folder["manifests"]),
            progress=False,
        )
        runs[seed] = _pool_samples(data)
    assert [key for key, _, _ in runs[None]] == sorted(key for key, _, _ in runs[None])
    assert runs[1] == runs[None] and runs[2] == runs[None]  # the same samples, bytes and order
    index = ShardIndex.load(folder["root"] / "data_1" / "POOL", "train")
    assert not np.array_equal(index.offset, ShardIndex.load(folder["root"] / "data_None" / "POOL", "train").offset)


def test_a_bad_pool_image_is_named_by_its_url_or_left_out_of_the_index(folder):
    source = folder["root"] / "pool"
    _pool(source, 3, bad_key="000010003")
    with pytest.raises(PrepareError, match=r"POOL/train: bad image https://example.invalid/000010003.png: image does"):
        prepare(
            PrepareOptions(str(source), folder["data"], layout="pool", datasets=["POOL"], manifests=folder["manifests"])
        )
    results = prepare(
        PrepareOptions(
            str(source), folder["data"], layout="pool", datasets=["POOL"], manifests=folder["manifests"], skip_bad=True
        )
    )
    assert results[0].samples == 9 and results[0].skipped[0][0] == "https://example.invalid/000010003.png"
    assert "000010003" not in [key for key, _, _ in _pool_samples(folder["data"])]
    assert len(list(source.iterdir())) == 2  # the user's shards are left as they are
