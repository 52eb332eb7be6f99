"""Shards and their index: written atomically, read back exactly, foreign shards indexed in place."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from webdataset import TarWriter

from timelit.data.samples import decode
from timelit.data.shards import CorruptSampleError, ShardIndex, ShardWriter, index_shards, iter_split


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_written_samples_read_back_by_position(tmp_path):
    with ShardWriter(tmp_path / "DS", "train", samples_per_shard=3) as writer:
        for i in range(7):
            writer.add(f"DS/train/{i:08d}", _png((i, 0, 0)), "png", f"caption {i}", {"label": i % 2})
    index = ShardIndex.load(tmp_path / "DS", "train")
    assert len(index) == 7 and index.shards == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert index.label.tolist() == [0, 1, 0, 1, 0, 1, 0]
    sample = decode(index.read(5))
    assert sample.key == "DS/train/00000005" and sample.caption == "caption 5"
    assert sample.image.getpixel((0, 0)) == (5, 0, 0)


def test_an_interrupted_writer_leaves_no_index(tmp_path):
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "DS", "train") as writer:
        writer.add("DS/train/00000000", _png((1, 1, 1)), "png", "x", {"label": 0})
        raise RuntimeError("killed")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        ShardIndex.load(tmp_path / "DS", "train")


def test_an_index_file_depends_on_its_contents_only(tmp_path):
    """safetensors orders its header's metadata by a hash map seeded per process; the index sorts every key, so two
    identical pools give byte-identical index files (docs/own_data.md, `--pool_copy`)."""
    with ShardWriter(tmp_path / "DS", "train", samples_per_shard=2) as writer:
        for i in range(3):
            writer.add(f"DS/train/{i:08d}", _png((i, 0, 0)), "png", f"caption {i}", {"label": i})
    data = (tmp_path / "DS" / "train.index.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == ["format", "shards"]
    assert size % 8 == 0 and ShardIndex.load(tmp_path / "DS", "train").label.tolist() == [0, 1, 2]


def test_img2dataset_style_shards_are_indexed_in_place(tmp_path):
    pool = tmp_path / "POOL"
    pool.mkdir()
    for shard in range(2):
        with TarWriter(str(pool / f"{shard:05d}.tar")) as sink:
            for i in range(3):
                key = f"{shard:05d}{i:04d}"
                sink.write({"__key__": key, "jpg": _png((9, 9, 9)), "txt": f"pair {key}", "json": {"url": "x"}})
    index = index_shards(pool, "train")
    assert len(index) == 6 and set(index.label.tolist()) == {-1}
    assert [decode(s).caption for s in iter_split(pool, "train")][-1] == "pair 000010002"


def test_unsafe_members_are_never_decoded(tmp_path):
    with TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        sink.write({"__key__": "k", "png": _png((0, 0, 0)), "txt": "ok", "pyd": b"not unpickled", "json": {}})
    raw = index_shards(tmp_path, "train").read(0)
    sample = decode(raw)
    assert "pyd" in raw and sample.caption == "ok"  # the pickle member is carried as bytes, never loaded


def test_a_corrupt_image_names_the_sample_and_shard(tmp_path):
    with TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        sink.write({"__key__": "DS/train/00000000", "jpg": b"not an image", "txt": "x", "json": json.dumps({})})
    with pytest.raises(CorruptSampleError, match=r"DS/train/00000000.*train-000000.tar"):
        decode(index_shards(tmp_path, "train").read(0))


def test_a_corrupt_image_names_the_source_file_it_was_prepared_from(tmp_path):
    # `timelit data prepare` records the source path in the JSON; an img2dataset pool records the URL
    with TarWriter(str(tmp_path / "train-000000.tar")) as sink:
        sink.write({"__key__": "DS/train/00000000", "png": b"cut", "txt": "x", "json": {"source_path": "7/img3.png"}})
        sink.write({"__key__": "000000001", "jpg": b"cut", "txt": "x", "json": {"url": "https://host/a.jpg"}})
    index = index_shards(tmp_path, "train")
    with pytest.raises(CorruptSampleError, match=r"^source '7/img3.png', sample 'DS/train/00000000' \(.*does not"):
        decode(index.read(0))
    with pytest.raises(CorruptSampleError, match=r"^source 'https://host/a.jpg', sample '000000001'"):
        decode(index.read(1))


def test_truncated_shard_is_reported(tmp_path):
    with ShardWriter(tmp_path, "train") as writer:
        writer.add("DS/train/00000000", _png((1, 2, 3)), "png", "x", {"label": 0})
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:600])
    with pytest.raises(CorruptSampleError, match="file ends early"):
        ShardIndex.load(tmp_path, "train").read(0)
