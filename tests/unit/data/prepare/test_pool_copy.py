"""A pool that timelit copies (URL sources always, a local folder with `--pool_copy true`) is written in key order
with normalised tar headers: two downloads of one URL list, whose members lie in other orders and whose headers carry
other times and owners, prepare to byte-identical shards and index files."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.records import LayoutError
from timelit.data.prepare.run import PrepareError, prepare
from timelit.data.prepare.verify import verify
from timelit.data.shards import ShardIndex

SHARDS, PER_SHARD = 2, 5
BAD_KEY = "000010003"


def _jpeg(key: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 12), (int(key[-2:]) * 40, int(key[:5]) * 90, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _sample(key: str, bad: bool) -> dict[str, bytes]:
    """One img2dataset pair: what a download of its URL holds, the same in every download."""
    meta = {"url": f"https://example.invalid/{key}.jpg", "key": key, "status": "success", "caption": f"pair {key}"}
    image = b"\xff\xd8 cut short" if bad else _jpeg(key)
    return {"jpg": image, "txt": f"pair {key}".encode(), "json": json.dumps(meta).encode()}


def _download(folder: Path, order: str, bad_key: str | None = None) -> Path:
    """The shards of one img2dataset download: samples in the order their downloads finished ('reversed' or
    'shuffled'), each sample's members in the order its writer chose, every header stamped with this download's time,
    owner and mode; the same samples whatever `order` is."""
    folder.mkdir(parents=True)
    rng = random.Random(order)
    stamp = {"mtime": 1_700_000_000 + len(order), "uid": len(order), "uname": order, "mode": 0o600 + len(order)}
    for shard in range(SHARDS):
        keys = [f"{shard:05d}{i:04d}" for i in range(PER_SHARD)]
        keys = keys[::-1] if order == "reversed" else rng.sample(keys, len(keys))
        with tarfile.open(folder / f"{shard:05d}.tar", "w", format=tarfile.GNU_FORMAT) as archive:
            for key in keys:
                members = list(_sample(key, key == bad_key).items())
                rng.shuffle(members)
                for extension, data in members:
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(data)
                    for field, value in stamp.items():
                        setattr(info, field, value)
                    archive.addfile(info, io.BytesIO(data))
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"order": order}))
    return folder


@pytest.fixture
def pools(tmp_path: Path) -> dict[str, Path]:
    """A manifest set with the pool POOL, and two downloads of its URL list with members in other orders."""
    manifests = tmp_path / "manifests"
    (manifests / "pools").mkdir(parents=True)
    (manifests / "datasets").mkdir()
    (manifests / "pools" / "POOL.yaml").write_text(yaml.safe_dump({"name": "POOL", "num_samples": None}))
    (manifests / "classnames").mkdir()
    (manifests / "classnames" / "DIGITS.json").write_text(json.dumps(["0", "1"]))
    digits = {
        "name": "DIGITS",
        "role": "adapt",
        "task": "classification",
        "classnames": "../classnames/DIGITS.json",
        "num_classes": 2,
        "prompt_templates": ["a photo of the digit {}."],
        "splits": {"train": {"num_samples": None}, "test": {"num_samples": None}},
        "source": {},
        "license": "test data",
    }
    (manifests / "datasets" / "DIGITS.yaml").write_text(yaml.safe_dump(digits))  # a set needs one dataset
    return {
        "manifests": manifests,
        "reversed": _download(tmp_path / "download_reversed", "reversed"),
        "shuffled": _download(tmp_path / "download_shuffled", "shuffled"),
        "root": tmp_path,
    }


def _source(folder: Path, form: str) -> str:
    """The shards of `folder` as `--source`: the folder, a brace pattern, a file:// URL, or a pipe (a stream that
    cannot seek, as an https:// download is)."""
    pattern = str(folder / f"{{00000..{SHARDS - 1:05d}}}.tar")
    return {"folder": str(folder), "brace": pattern, "file_url": f"file://{pattern}", "pipe": f"pipe:cat {pattern}"}[
        form
    ]


def _prepare(pools: dict[str, Path], source: str, data_root: Path, **options: object) -> list:
    return prepare(
        PrepareOptions(
            source,
            str(data_root),
            layout="pool",
            datasets="POOL",
            manifests=str(pools["manifests"]),
            workers=0,
            **options,
        ),
        progress=False,
    )


def _prepared_files(data_root: Path) -> dict[str, bytes]:
    """The shards and index of the pool, by name: what a run reads."""
    folder = data_root / "POOL"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith((".tar", ".index.safetensors"))}


def _prepare_both(pools: dict[str, Path], form: str, **options: object) -> tuple[dict[str, bytes], dict[str, bytes]]:
    prepared = []
    for order in ("reversed", "shuffled"):
        data_root = pools["root"] / f"data_{form}_{order}"
        _prepare(pools, _source(pools[order], form), data_root, pool_copy=form == "folder", **options)
        prepared.append(_prepared_files(data_root))
    return prepared[0], prepared[1]


@pytest.mark.parametrize("form", ["folder", "brace", "file_url", "pipe"])
def test_two_downloads_in_other_orders_copy_to_byte_identical_shards_and_index(pools, form):
    assert (pools["reversed"] / "00000.tar").read_bytes() != (pools["shuffled"] / "00000.tar").read_bytes()
    first, second = _prepare_both(pools, form)
    assert sorted(first) == ["train-000000.tar", "train-000001.tar", "train.index.safetensors"]
    assert first == second
    index = ShardIndex.load(pools["root"] / f"data_{form}_reversed" / "POOL", "train")
    samples = [index.read(position) for position in range(len(index))]
    keys = [f"{shard:05d}{i:04d}" for shard in range(SHARDS) for i in range(PER_SHARD)]
    assert [sample["__key__"] for sample in samples] == keys  # key order, every sample there
    assert all(
        {k: sample[k] for k in ("jpg", "txt", "json")} == _sample(key, False) for key, sample in zip(keys, samples)
    )
    leftovers = [p.name for p in (pools["root"] / f"data_{form}_reversed" / "POOL").iterdir() if p.suffix == ".tmp"]
    assert leftovers == []  # no spooled download or half-written shard stays behind


def test_a_folder_copied_and_the_same_shards_by_url_prepare_to_the_same_files(pools):
    by_folder, _ = _prepare_both(pools, "folder")
    by_url, _ = _prepare_both(pools, "brace")
    assert by_folder == by_url


def test_copied_members_have_normalised_headers(pools):
    _prepare(pools, str(pools["shuffled"]), pools["root"] / "data", pool_copy=True)
    with tarfile.open(pools["root"] / "data" / "POOL" / "train-000000.tar") as archive:
        members = archive.getmembers()
    assert [m.name for m in members[:3]] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "bigdata", "bigdata", 0o444)
    }


def test_bad_images_of_a_copied_pool_are_named_or_left_out_in_the_same_way(pools):
    for order in ("reversed", "shuffled"):
        bad = _download(pools["root"] / f"bad_{order}", order, bad_key=BAD_KEY)
        with pytest.raises(PrepareError, match=rf"POOL/train: bad image https://example.invalid/{BAD_KEY}.jpg"):
            _prepare(pools, str(bad), pools["root"] / f"data_bad_{order}", pool_copy=True)
        results = _prepare(pools, str(bad), pools["root"] / f"data_bad_{order}", pool_copy=True, skip_bad=True)
        assert results[0].samples == SHARDS * PER_SHARD - 1 and results[0].skipped[0][0].endswith(f"{BAD_KEY}.jpg")
    index = ShardIndex.load(pools["root"] / "data_bad_reversed" / "POOL", "train")
    assert BAD_KEY not in [index.read(position)["__key__"] for position in range(len(index))]
    assert _prepared_files(pools["root"] / "data_bad_reversed") == _prepared_files(pools["root"] / "data_bad_shuffled")
    checks = verify(pools["root"] / "data_bad_reversed", pools["manifests"], datasets=[], pools=["POOL"], decode=True)
    assert [check.problems for check in checks] == [[]]


def test_the_default_indexes_a_folder_in_place_and_a_rerun_with_copy_is_another_source(pools):
    data_root = pools["root"] / "data"
    results = _prepare(pools, str(pools["reversed"]), data_root)
    assert results[0].notes == [f"indexed in place at {pools['reversed']}"] and not list(
        (data_root / "POOL").glob("*.tar")
    )
    with pytest.raises(PrepareError, match=r"prepared from a different source or with other settings; --overwrite"):
        _prepare(pools, str(pools["reversed"]), data_root, pool_copy=True)
    copied = _prepare(pools, str(pools["reversed"]), data_root, pool_copy=True, overwrite=True)
    assert copied[0].status == "prepared" and copied[0].notes == ["copied in key order"]
    assert _prepare(pools, str(pools["reversed"]), data_root, pool_copy=True)[0].status == "up to date"


def test_pool_copy_is_refused_where_it_cannot_apply(pools):
    (pools["root"] / "POOL").symlink_to(pools["reversed"])  # DATA_ROOT/POOL is the source folder itself
    with pytest.raises(LayoutError, match=r"into that folder itself"):
        _prepare(pools, str(pools["reversed"]), pools["root"], pool_copy=True)
    with pytest.raises(LayoutError, match=r"applies to --layout pool only"):
        prepare(
            PrepareOptions(
                str(pools["reversed"]),
                str(pools["root"] / "data"),
                layout="imagefolder",
                datasets="POOL",
                manifests=str(pools["manifests"]),
                pool_copy=True,
            )
        )


def test_a_member_twice_in_one_sample_is_an_error_naming_it(pools):
    folder = pools["root"] / "twice"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as archive:
        for caption in (b"one", b"two"):
            info = tarfile.TarInfo("000000000.txt")
            info.size = len(caption)
            archive.addfile(info, io.BytesIO(caption))
    with pytest.raises(PrepareError, match=r"member 000000000.txt appears twice"):
        _prepare(pools, str(folder), pools["root"] / "data", pool_copy=True, decode=False)
