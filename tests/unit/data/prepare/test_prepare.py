"""`timelit data prepare`: every layout becomes shards whose labels, captions and image bytes are the source's."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from webdataset import TarWriter

from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.records import LayoutError
from timelit.data.prepare.run import PrepareError, prepare
from timelit.data.samples import decode
from timelit.data.shards import ShardIndex

CLASSES = ["cat", "dog", "water / carbon"]
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "water / carbon": (30, 30, 200)}


def _image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 16), fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)


def _dataset(root: Path, name: str, role: str, task: str, classes: list[str] | None, splits: dict, **extra) -> None:
    manifest = {
        "name": name,
        "role": role,
        "task": task,
        "classnames": f"../classnames/{name}.json" if classes else None,
        "num_classes": len(classes) if classes else None,
        "prompt_templates": ["a photo of a {}." if classes else "{}"],
        "splits": splits,
        "source": {"test": "tests/unit/data/prepare/test_prepare.py"},
        "license": "test data",
        **extra,
    }
    (root / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(manifest))
    if classes:
        (root / "classnames" / f"{name}.json").write_text(json.dumps(classes))


def _entry(classname: str | None, default, merged=None, target: int = 0) -> dict:
    return {
        "classname": classname,
        "default_caption": default,
        "primer_caption": f"A photo of a {classname}." if classname else None,
        "synthetic_caption": None,
        "synthetic_merged_caption": merged,
        "target": target,
    }


@pytest.fixture
def bench(tmp_path: Path) -> dict[str, Path]:
    """A manifest set and a FoMo-in-Flux-style release: a classification set (test split called `val` in the
    release), a retrieval set with classes and a held-out retrieval set with five captions per image."""
    manifests, release = tmp_path / "manifests", tmp_path / "release"
    for sub in ("datasets", "classnames", "streams"):
        (manifests / sub).mkdir(parents=True)
    info = release / "00_info"
    info.mkdir(parents=True)
    both = {"train": {"num_samples": None}, "test": {"num_samples": None}}
    _dataset(manifests, "FAKECLS", "adapt", "classification", CLASSES, both, source={"release_splits": {"test": "val"}})
    _dataset(manifests, "FAKERET", "adapt", "retrieval", ["sky", "sea"], both)
    _dataset(manifests, "FAKECOCO", "eval", "retrieval", None, {"test": {"num_samples": 3}})
    for split, release_split, per_class in (("train", "train", 3), ("test", "val", 2)):
        meta = {}
        for target, name in enumerate(CLASSES):
            for i in range(per_class):
                ref = f"images/{release_split}/{target}_{i}.png"
                _image(release / "FAKECLS" / ref, COLOURS[name])
                # odd images have no default caption: the pipeline then trains on the merged synthetic caption
                meta[ref] = _entry(name, None if i % 2 else f"{name} photo {i}", f"synthetic {name} {i}", target)
        (info / f"FAKECLS_{release_split}.json").write_text(json.dumps(meta))
        meta = {}
        for target, name in enumerate(["sky", "sea"]):
            for i in range(2):
                ref = f"sketches/{split}/{name}{i}.jpg"
                _image(release / "FAKERET" / ref, (100 + 50 * target, 90, 40 * i), fmt="JPEG")
                meta[ref] = _entry(name, f"A sketch of the {name} {i}", target=target)
        (info / f"FAKERET_{split}.json").write_text(json.dumps(meta))
    meta = {}
    for i in range(3):
        ref = f"coco/{i}.jpg"
        _image(release / "FAKECOCO" / ref, (10, 60 * i, 10), fmt="JPEG")
        meta[ref] = _entry(None, [f"caption {k} of image {i}" for k in range(5)], target=i)
    (info / "FAKECOCO_test.json").write_text(json.dumps(meta))
    stream = [f"FAKECLS+++{c}" for c in CLASSES] + ["FAKERET+++sky", "FAKERET+++sea"]
    (manifests / "streams" / "s.json").write_text(json.dumps(stream))
    return {"manifests": manifests, "release": release, "data": tmp_path / "data", "root": tmp_path}


def _samples(directory: Path, split: str) -> list[tuple[dict, object]]:
    index = ShardIndex.load(directory, split)
    try:
        return [(raw, decode(raw)) for raw in (index.read(i) for i in range(len(index)))]
    finally:
        index.close()


def test_release_layout_keeps_labels_captions_and_image_bytes(bench):
    results = prepare(
        PrepareOptions(
            str(bench["release"]), bench["data"], manifests=bench["manifests"], samples_per_shard=4, workers=0
        )
    )
    assert {(r.dataset, r.split, r.samples) for r in results} == {
        ("FAKECLS", "train", 9),
        ("FAKECLS", "test", 6),
        ("FAKERET", "train", 4),
        ("FAKERET", "test", 4),
        ("FAKECOCO", "test", 3),
    }
    metadata = json.loads((bench["release"] / "00_info" / "FAKECLS_train.json").read_text())
    samples = _samples(bench["data"] / "FAKECLS", "train")
    assert len(ShardIndex.load(bench["data"] / "FAKECLS", "train").shards) == 3  # 9 samples, 4 per shard
    for number, (raw, sample) in enumerate(samples):
        ref = sample.meta["source_path"]
        entry = metadata[ref]
        assert sample.key == f"FAKECLS/train/{number:08d}"
        assert CLASSES[sample.meta["label"]] == entry["classname"] == sample.meta["classname"]
        assert sample.caption == (entry["default_caption"] or entry["synthetic_merged_caption"])
        assert raw["png"] == (bench["release"] / "FAKECLS" / ref).read_bytes()  # stored as is, not re-encoded
    assert list(ShardIndex.load(bench["data"] / "FAKECLS", "train").label) == [s.meta["label"] for _, s in samples]


def test_release_split_names_map_to_timelit_splits(bench):
    prepare(
        PrepareOptions(
            str(bench["release"]), bench["data"], manifests=bench["manifests"], datasets=["FAKECLS"], workers=0
        )
    )
    refs = [s.meta["source_path"] for _, s in _samples(bench["data"] / "FAKECLS", "test")]
    assert refs and all(ref.startswith("images/val/") for ref in refs)


def test_retrieval_sets_keep_every_caption_and_own_labels(bench):
    prepare(
        PrepareOptions(
            str(bench["release"]),
            bench["data"],
            manifests=bench["manifests"],
            datasets=["FAKECOCO", "FAKERET"],
            workers=0,
        )
    )
    samples = [s for _, s in _samples(bench["data"] / "FAKECOCO", "test")]
    assert [s.meta["label"] for s in samples] == [0, 1, 2]
    assert samples[1].captions == [f"caption {k} of image 1" for k in range(5)]
    assert samples[1].caption == "caption 0 of image 1"
    with_classes = [s for _, s in _samples(bench["data"] / "FAKERET", "train")]
    assert [s.meta["classname"] for s in with_classes] == ["sky", "sky", "sea", "sea"]
    assert [s.meta["label"] for s in with_classes] == [0, 0, 1, 1]


def test_auto_variant_reads_the_resized_copy_when_it_exists(bench):
    release = bench["release"]
    original = json.loads((release / "00_info" / "FAKECLS_val.json").read_text())
    resized = {}
    for ref, entry in original.items():
        _image(release / "FAKECLS" / "FAKECLS_val_224" / ref, (1, 2, 3), size=(8, 8))
        resized[f"FAKECLS_val_224/{ref}"] = entry
    (release / "00_info" / "FAKECLS_val_224.json").write_text(json.dumps(resized))
    prepare(
        PrepareOptions(
            str(release), bench["data"], manifests=bench["manifests"], datasets=["FAKECLS"], splits=["test"], workers=0
        )
    )
    samples = [s for _, s in _samples(bench["data"] / "FAKECLS", "test")]
    assert all(s.meta["source_path"].startswith("FAKECLS_val_224/") and s.image.size == (8, 8) for s in samples)
    forced = bench["root"] / "forced"
    prepare(
        PrepareOptions(
            str(release),
            forced,
            manifests=bench["manifests"],
            datasets=["FAKECLS"],
            splits=["test"],
            variant="original",
        )
    )
    assert all(s.image.size == (24, 16) for _, s in _samples(forced / "FAKECLS", "test"))


def test_release_archives_are_read_in_place_and_give_the_same_shards(bench):
    from_folders = bench["root"] / "from_folders"
    prepare(
        PrepareOptions(
            str(bench["release"]), from_folders, manifests=bench["manifests"], datasets=["FAKECLS"], workers=0
        )
    )
    with tarfile.open(bench["release"] / "FAKECLS.tar", "w") as archive:  # as the pipeline's dataset.tar=True reads
        archive.add(bench["release"] / "FAKECLS", arcname="FAKECLS")
    shutil.rmtree(bench["release"] / "FAKECLS")
    results = prepare(PrepareOptions(str(bench["release"]), bench["data"], manifests=bench["manifests"], workers=0))
    assert {r.dataset for r in results} == {"FAKECLS", "FAKERET", "FAKECOCO"}
    assert all("from FAKECLS.tar" in r.notes[0] for r in results if r.dataset == "FAKECLS")
    for split in ("train", "test"):
        name = f"{split}-000000.tar"
        assert (bench["data"] / "FAKECLS" / name).read_bytes() == (from_folders / "FAKECLS" / name).read_bytes()


def test_metadata_may_live_outside_the_release(bench):
    moved = bench["root"] / "data_lib" / "00_info"
    moved.parent.mkdir()
    (bench["release"] / "00_info").rename(moved)
    with pytest.raises(PrepareError, match=r"no metadata file FAKECLS_train\.json.*pass --metadata_dir"):
        prepare(PrepareOptions(str(bench["release"]), bench["data"], manifests=bench["manifests"], workers=0))
    results = prepare(
        PrepareOptions(
            str(bench["release"]), bench["data"], manifests=bench["manifests"], metadata_dir=str(moved), workers=0
        )
    )
    assert len(results) == 5


def test_unknown_class_names_are_listed_together_and_nothing_is_written(bench):
    path = bench["release"] / "00_info" / "FAKECLS_train.json"
    metadata = json.loads(path.read_text())
    refs = list(metadata)
    metadata[refs[0]]["classname"] = "kat"
    metadata[refs[1]]["classname"] = "wolf"
    path.write_text(json.dumps(metadata))
    (bench["release"] / "FAKERET" / "sketches" / "test" / "sea1.jpg").unlink()
    with pytest.raises(PrepareError) as caught:
        prepare(PrepareOptions(str(bench["release"]), bench["data"], manifests=bench["manifests"], workers=0))
    message = str(caught.value)
    assert "'kat'" in message and "did you mean 'cat'" in message and "'wolf'" in message
    assert "sea1.jpg" in message  # the missing image of another dataset, reported in the same error
    assert not bench["data"].exists()


def test_counts_that_differ_from_the_manifest_fail_after_writing(bench):
    manifest_path = bench["manifests"] / "datasets" / "FAKECOCO.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["splits"]["test"]["num_samples"] = 5
    manifest_path.write_text(yaml.safe_dump(manifest))
    with pytest.raises(PrepareError, match=r"FAKECOCO/test: 3 samples, the manifest states 5"):
        prepare(PrepareOptions(str(bench["release"]), bench["data"], manifests=bench["manifests"], workers=0))


def test_imagefolder_layout_maps_folder_names_to_the_class_list(bench):
    source = bench["root"] / "folder"
    for split, count in (("train", 2), ("test", 1)):
        for name in CLASSES:
            for i in range(count):
                _image(source / split / name.replace("/", "-") / "sub" / f"{i}.png", COLOURS[name])
    results = prepare(
        PrepareOptions(
            str(source), bench["data"], layout="imagefolder", datasets=["FAKECLS"], manifests=bench["manifests"]
        )
    )
    assert sorted((r.split, r.samples) for r in results) == [("test", 3), ("train", 6)]
    samples = [s for _, s in _samples(bench["data"] / "FAKECLS", "train")]
    assert [s.meta["label"] for s in samples] == [0, 0, 1, 1, 2, 2]
    assert samples[4].caption == "a photo of a water / carbon."
    assert samples[4].image.getpixel((0, 0)) == COLOURS["water / carbon"]


def test_imagefolder_rejects_unknown_class_folders(bench):
    source = bench["root"] / "folder"
    _image(source / "train" / "cat" / "0.png", (0, 0, 0))
    _image(source / "train" / "cow" / "0.png", (0, 0, 0))
    with pytest.raises(PrepareError, match=r"'cow'"):
        prepare(
            PrepareOptions(
                str(source), bench["data"], layout="imagefolder", datasets=["FAKECLS"], manifests=bench["manifests"]
            )
        )


def test_csv_layout_groups_captions_per_image_and_reads_labels(bench):
    source = bench["root"] / "csv"
    for i in range(3):
        _image(source / "img" / f"{i}.jpg", (i * 70, 0, 0), fmt="JPEG")
    with (source / "test.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        for i in (0, 1, 2, 0, 1):
            writer.writerow([f"img/{i}.jpg", f"a caption, number {i}"])
    prepare(
        PrepareOptions(
            str(source / "test.csv"), bench["data"], layout="csv", datasets=["FAKECOCO"], manifests=bench["manifests"]
        )
    )
    samples = [s for _, s in _samples(bench["data"] / "FAKECOCO", "test")]
    assert [s.meta["label"] for s in samples] == [0, 1, 2]
    assert samples[0].captions == ["a caption, number 0", "a caption, number 0"]
    assert samples[2].captions == ["a caption, number 2"]
    with (source / "train.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["img/0.jpg", "a cat", "cat"], ["img/1.jpg", "a dog", "1"], ["img/2.jpg", "x", "2"]]
        )
    prepare(
        PrepareOptions(
            str(source),
            bench["data"],
            layout="csv",
            datasets=["FAKECLS"],
            splits=["train"],
            manifests=bench["manifests"],
        )
    )
    assert [s.meta["label"] for _, s in _samples(bench["data"] / "FAKECLS", "train")] == [0, 1, 2]


def test_csv_layout_reports_every_bad_row(bench):
    source = bench["root"] / "csv"
    _image(source / "a.png", (0, 0, 0))
    (source / "train.csv").write_text("a.png,one,cat\na.png,two,dog\nmissing.png,three,cat\nb.png\n")
    with pytest.raises(PrepareError) as caught:
        prepare(
            PrepareOptions(str(source), bench["data"], layout="csv", datasets=["FAKECLS"], manifests=bench["manifests"])
        )
    message = str(caught.value)
    assert "label 1 here but 0" in message and "missing.png" in message and "line 4" in message


def test_resize_shrinks_large_images_and_keeps_small_ones(bench):
    source = bench["root"] / "folder"
    _image(source / "train" / "cat" / "big.jpg", COLOURS["cat"], size=(300, 200), fmt="JPEG")
    _image(source / "train" / "dog" / "small.png", COLOURS["dog"], size=(20, 10))
    prepare(
        PrepareOptions(
            str(source),
            bench["data"],
            layout="imagefolder",
            datasets=["FAKECLS"],
            manifests=bench["manifests"],
            resize=64,
        )
    )
    (big_raw, big), (small_raw, _) = _samples(bench["data"] / "FAKECLS", "train")
    assert big.image.size == (96, 64) and "jpg" in big_raw
    assert small_raw["png"] == (source / "train" / "dog" / "small.png").read_bytes()


def test_formats_outside_jpg_png_webp_are_stored_as_png(bench):
    source = bench["root"] / "folder"
    _image(source / "train" / "cat" / "0.bmp", COLOURS["cat"], fmt="BMP")
    prepare(
        PrepareOptions(
            str(source), bench["data"], layout="imagefolder", datasets=["FAKECLS"], manifests=bench["manifests"]
        )
    )
    ((raw, sample),) = _samples(bench["data"] / "FAKECLS", "train")
    assert "png" in raw and sample.image.getpixel((3, 3)) == COLOURS["cat"]


def test_worker_processes_write_the_same_shards_as_one_process(bench):
    serial, parallel = bench["root"] / "serial", bench["root"] / "parallel"
    prepare(PrepareOptions(str(bench["release"]), serial, manifests=bench["manifests"], samples_per_shard=2, workers=0))
    prepare(
        PrepareOptions(str(bench["release"]), parallel, manifests=bench["manifests"], samples_per_shard=2, workers=2)
    )
    files = sorted(p.relative_to(serial) for p in serial.rglob("*.tar"))
    assert len(files) == 14
    assert all((serial / f).read_bytes() == (parallel / f).read_bytes() for f in files)
    for name, split in (("FAKECLS", "train"), ("FAKECOCO", "test")):
        a, b = ShardIndex.load(serial / name, split), ShardIndex.load(parallel / name, split)
        assert a.shards == b.shards and np.array_equal(a.offset, b.offset) and np.array_equal(a.label, b.label)


def test_a_rerun_with_other_settings_needs_overwrite(bench):
    prepare(
        PrepareOptions(
            str(bench["release"]), bench["data"], manifests=bench["manifests"], datasets=["FAKECOCO"], workers=0
        )
    )
    with pytest.raises(PrepareError, match=r"FAKECOCO/test: .*different source or with other settings.*--overwrite"):
        prepare(
            PrepareOptions(
                str(bench["release"]),
                bench["data"],
                manifests=bench["manifests"],
                datasets=["FAKECOCO"],
                samples_per_shard=1,
            )
        )
    prepare(
        PrepareOptions(
            str(bench["release"]),
            bench["data"],
            manifests=bench["manifests"],
            datasets=["FAKECOCO"],
            samples_per_shard=1,
            overwrite=True,
        )
    )
    assert len(ShardIndex.load(bench["data"] / "FAKECOCO", "test").shards) == 3


def test_index_is_readable_like_the_shards(bench):
    prepare(
        PrepareOptions(
            str(bench["release"]), bench["data"], manifests=bench["manifests"], datasets=["FAKECOCO"], workers=0
        )
    )
    folder = bench["data"] / "FAKECOCO"
    shard_mode = (folder / "test-000000.tar").stat().st_mode & 0o777
    assert (folder / "test.index.safetensors").stat().st_mode & 0o777 == shard_mode


# --------------------------------------------------------------------------- pretraining pools


def _img2dataset_shards(folder: Path, shards: int, per_shard: int) -> list[str]:
    """Shards as img2dataset writes them: keys of nine digits, jpg + txt + json without a label."""
    folder.mkdir(parents=True)
    captions = []
    for shard in range(shards):
        with TarWriter(str(folder / f"{shard:05d}.tar")) as writer:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                buffer = io.BytesIO()
                Image.new("RGB", (12, 12), (i * 20, shard * 50, 0)).save(buffer, format="JPEG")
                caption = f"pool pair {key}"
                captions.append(caption)
                meta = {"url": f"http://example.invalid/{key}.jpg", "caption": caption, "status": "success"}
                writer.write({"__key__": key, "jpg": buffer.getvalue(), "txt": caption, "json": meta})
        (folder / f"{shard:05d}_stats.json").write_text("{}")
    return captions


def _with_pool(bench: dict[str, Path], count: int | None) -> None:
    (bench["manifests"] / "pools").mkdir(exist_ok=True)
    pool = {"name": "FAKEPOOL", "num_samples": count}
    (bench["manifests"] / "pools" / "FAKEPOOL.yaml").write_text(yaml.safe_dump(pool))


def test_img2dataset_pool_is_indexed_in_place(bench):
    _with_pool(bench, 6)
    source = bench["root"] / "laion" / "shards"
    captions = _img2dataset_shards(source, 2, 3)
    before = sorted(p.name for p in source.iterdir())
    results = prepare(
        PrepareOptions(str(source), bench["data"], layout="pool", datasets=["FAKEPOOL"], manifests=bench["manifests"])
    )
    assert results[0].samples == 6 and results[0].status == "prepared"
    assert sorted(p.name for p in source.iterdir()) == before  # the user's folder is left alone
    index = ShardIndex.load(bench["data"] / "FAKEPOOL", "train")
    assert [decode(index.read(i)).caption for i in range(len(index))] == captions
    again = prepare(
        PrepareOptions(str(source), bench["data"], layout="pool", datasets=["FAKEPOOL"], manifests=bench["manifests"])
    )
    assert again[0].status == "up to date"


def _members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


def test_pool_shard_patterns_are_copied_into_local_shards(bench):
    _with_pool(bench, None)
    source = bench["root"] / "remote"
    captions = _img2dataset_shards(source, 2, 2)
    pattern = str(source / "{00000..00001}.tar")
    prepare(
        PrepareOptions(
            pattern, bench["data"], layout="pool", datasets=["FAKEPOOL"], manifests=bench["manifests"], workers=0
        )
    )
    folder = bench["data"] / "FAKEPOOL"
    # the same members with the same bytes (the headers are timelit's: tests/unit/data/prepare/test_pool_copy.py)
    assert _members(folder / "train-000001.tar") == _members(source / "00001.tar")
    index = ShardIndex.load(folder, "train")
    assert index.shards == ["train-000000.tar", "train-000001.tar"]
    assert [decode(index.read(i)).caption for i in range(len(index))] == captions


def test_pool_count_differences_only_warn(bench):
    _with_pool(bench, 100)
    source = bench["root"] / "laion"
    _img2dataset_shards(source, 1, 2)
    results = prepare(
        PrepareOptions(str(source), bench["data"], layout="pool", datasets=["FAKEPOOL"], manifests=bench["manifests"])
    )
    assert results[0].samples == 2 and "the manifest states 100" in " ".join(results[0].notes)


def test_layouts_other_than_release_take_exactly_one_dataset(bench):
    with pytest.raises(LayoutError, match=r"prepares one dataset"):
        prepare(PrepareOptions(str(bench["root"]), bench["data"], layout="imagefolder", manifests=bench["manifests"]))
