"""A killed `timelit data prepare` resumes: finished shards are not rewritten and the result equals an uninterrupted
run, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import timelit.data.prepare.shard_jobs as shard_jobs
from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.run import prepare
from timelit.data.shards import ShardIndex, index_path

CLASSES = ["circle", "square", "star"]
PER_SHARD = 2


@pytest.fixture
def release(tmp_path: Path) -> dict[str, Path]:
    """One dataset of 12 training images (6 shards of 2) in the FoMo-in-Flux release layout."""
    manifests, source = tmp_path / "manifests", tmp_path / "release"
    (manifests / "datasets").mkdir(parents=True)
    (manifests / "classnames").mkdir()
    manifest = {
        "name": "SHAPES",
        "role": "adapt",
        "task": "classification",
        "classnames": "../classnames/SHAPES.json",
        "num_classes": len(CLASSES),
        "prompt_templates": ["a {} shape."],
        "splits": {"train": {"num_samples": 12}, "test": {"num_samples": 3}},
        "source": {"test": "tests/unit/data/prepare/test_prepare_resume.py"},
        "license": "test data",
    }
    (manifests / "datasets" / "SHAPES.yaml").write_text(yaml.safe_dump(manifest))
    (manifests / "classnames" / "SHAPES.json").write_text(json.dumps(CLASSES))
    (source / "00_info").mkdir(parents=True)
    for split, per_class in (("train", 4), ("test", 1)):
        meta = {}
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                ref = f"{split}/{name}_{i}.png"
                (source / "SHAPES" / split).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (10, 10), (label * 90, i * 50, 7)).save(source / "SHAPES" / ref)
                meta[ref] = {"classname": name, "default_caption": f"a {name}, image {i}", "target": label}
        (source / "00_info" / f"SHAPES_{split}.json").write_text(json.dumps(meta))
    return {"manifests": manifests, "release": source, "root": tmp_path}


def _run(release: dict[str, Path], data: Path, workers: int = 0) -> list:
    return prepare(
        PrepareOptions(
            str(release["release"]), data, manifests=release["manifests"], samples_per_shard=PER_SHARD, workers=workers
        )
    )


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def _assert_same_as_uninterrupted(release: dict[str, Path], data: Path) -> None:
    clean = release["root"] / "clean"
    _run(release, clean)
    for split in ("train", "test"):
        a, b = ShardIndex.load(data / "SHAPES", split), ShardIndex.load(clean / "SHAPES", split)
        assert a.shards == b.shards
        for column in ("shard", "offset", "length", "label"):
            assert np.array_equal(getattr(a, column), getattr(b, column)), column
        for name in a.shards:
            assert (data / "SHAPES" / name).read_bytes() == (clean / "SHAPES" / name).read_bytes(), name


def test_an_interrupted_prepare_resumes_without_rewriting_finished_shards(release, monkeypatch):
    data = release["root"] / "data"
    write = shard_jobs._write_dataset_shard
    calls = {"n": 0}

    def dies_on_the_fourth_shard(job):
        calls["n"] += 1
        if calls["n"] == 4:
            # a kill in the middle of a shard: a partial temporary file is all that remains of it
            Path(str(job.path) + ".tmp").write_bytes(b"partial tar bytes")
            raise KeyboardInterrupt("killed")
        return write(job)

    monkeypatch.setattr(shard_jobs, "_write_dataset_shard", dies_on_the_fourth_shard)
    with pytest.raises(KeyboardInterrupt):
        _run(release, data)
    folder = data / "SHAPES"
    finished = sorted(folder.glob("*.tar"))
    assert len(finished) == 3 and not index_path(folder, "train").exists()  # no index: the split reads as unprepared
    before = {path.name: _identity(path) for path in finished}

    monkeypatch.setattr(shard_jobs, "_write_dataset_shard", write)
    results = _run(release, data)
    status = {r.split: (r.status, r.samples, r.written) for r in results}
    train_done = sum(name.startswith("train") for name in before)
    assert status == {"test": ("up to date", 3, 0), "train": ("resumed", 12, 6 - train_done)}
    assert {name: _identity(folder / name) for name in before} == before  # same inode, same mtime: not rewritten
    assert not list(folder.glob("*.tmp"))
    _assert_same_as_uninterrupted(release, data)


def test_a_complete_prepare_is_left_alone(release):
    data = release["root"] / "data"
    _run(release, data)
    before = {path.name: _identity(path) for path in (data / "SHAPES").iterdir()}
    results = _run(release, data)
    assert {r.status for r in results} == {"up to date"}
    assert {path.name: _identity(path) for path in (data / "SHAPES").iterdir()} == before


def test_a_deleted_shard_is_written_again(release):
    data = release["root"] / "data"
    _run(release, data)
    (data / "SHAPES" / "train-000002.tar").unlink()
    results = _run(release, data)
    assert next(r for r in results if r.split == "train").written == 1
    _assert_same_as_uninterrupted(release, data)


_CHILD = """
import sys, time
import timelit.data.prepare.shard_jobs as jobs
from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.run import prepare
write = jobs._write_dataset_shard
def slow(job):
    write(job)
    time.sleep(0.4)
jobs._write_dataset_shard = slow
prepare(PrepareOptions(sys.argv[1], sys.argv[2], manifests=sys.argv[3], samples_per_shard=2, workers=2), progress=False)
"""


@pytest.mark.slow
def test_a_prepare_killed_by_sigkill_with_its_workers_resumes(release):
    data = release["root"] / "data"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(release["release"]), str(data), str(release["manifests"])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes the worker processes too
    )
    deadline = time.monotonic() + 120
    folder = data / "SHAPES"
    while not (folder / "train-000001.tar").exists():
        assert child.poll() is None, child.stderr.read().decode() if child.stderr else "child exited"
        assert time.monotonic() < deadline, "the child prepare made no progress"
        time.sleep(0.02)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    finished = sorted(folder.glob("*.tar"))
    assert 2 <= len(finished) < 8 and not index_path(folder, "train").exists()
    before = {path.name: _identity(path) for path in finished}
    _run(release, data, workers=2)
    assert {name: _identity(folder / name) for name in before} == before
    _assert_same_as_uninterrupted(release, data)
