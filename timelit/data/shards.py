"""Webdataset shards on disk, and an index that reads any sample of them directly.

    python -c "from timelit.data.shards import ShardIndex; print(len(ShardIndex.load('DATA/CIFAR100', 'train')))"

Layout of one dataset split (`timelit data prepare` and `timelit data synth` write it):

    <root>/<DATASET>/<split>-000000.tar ...   webdataset shards; a sample is <key>.jpg|png + <key>.txt + <key>.json
    <root>/<DATASET>/<split>.index.safetensors per sample: shard number, byte offset and length, class label

Sample keys are `DATASET/split/00000042`; `.txt` holds the training caption, `.json` the metadata (dataset, label,
classname, and `captions` for retrieval sets).

Why an index beside the tar files: a FoMo-in-Flux task is a set of concepts scattered over 41 datasets, so a task's
loader must pick samples by class. webdataset's streaming reader (split by node, then by worker, then filter) would
read every shard to keep a few percent of it, could not give every rank the same number of samples, and could only
resume by re-reading what it skipped. The index gives each worker exactly its samples with one `pread` each, and a
resume is arithmetic. The tar files stay plain webdataset shards (written with webdataset's TarWriter through
`shard_tar_writer`, readable by any webdataset pipeline), and pools from img2dataset are indexed in place
(`index_shards`) or copied in key order (`timelit.data.prepare.pool_shards`).

Nothing here unpickles: a sample's members are decoded as image, UTF-8 text or JSON, and other members are ignored.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

from timelit.data.tar_members import tar_members
from timelit.utilities.atomic import replace_with, temporary_path

INDEX_SUFFIX = ".index.safetensors"
INDEX_FORMAT = "timelit-shard-index/1"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class CorruptSampleError(ValueError):
    """A sample could not be read or decoded; the message names the key and the shard.

    `shard_problem` is set when the whole shard is at fault (empty, or cut short before the sample): the same text
    for every sample it loses, so that a reader can report it once per shard instead of once per sample.
    """

    def __init__(self, message: str, shard_problem: str | None = None):
        super().__init__(message)
        self.shard_problem = shard_problem


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def index_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}{INDEX_SUFFIX}"


def sample_key(dataset: str, split: str, index: int) -> str:
    return f"{dataset}/{split}/{index:08d}"


def shard_tar_writer(path: str | Path, encode: bool = True) -> TarWriter:
    """webdataset's TarWriter as every shard timelit writes is written, so that a shard's bytes depend on its samples
    only: mtime 0 and fixed owner, group and mode in every header (uid and gid are tarfile's 0), each sample's
    members in name order (TarWriter sorts them). `encode=False` stores every member's bytes as given (a pool's copied
    samples: the default encoder would gzip a `.gz` member again, stamping the time of day in it)."""
    return TarWriter(str(path), user="bigdata", group="bigdata", mode=0o444, encoder=encode, mtime=0.0)


@dataclass
class TarEntry:
    key: str
    offset: int
    end: int
    label: int


def scan_tar(path: Path) -> list[TarEntry]:
    """One entry per sample (members grouped by webdataset's key rule), reading headers and the small JSON only."""
    entries: list[TarEntry] = []
    with tarfile.open(path, "r:") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, extension = base_plus_ext(member.name)
            if key is None:
                continue
            end = member.offset_data + ((member.size + 511) // 512) * 512
            if not entries or entries[-1].key != key:
                entries.append(TarEntry(key=key, offset=member.offset, end=end, label=-1))
            entries[-1].end = end
            if extension == "json":
                try:
                    meta = json.loads(archive.extractfile(member).read())  # type: ignore[union-attr]
                    entries[-1].label = int(meta.get("label", -1)) if isinstance(meta, dict) else -1
                except (ValueError, TypeError):
                    entries[-1].label = -1
    return entries


@dataclass
class ShardIndex:
    """Where every sample of one split lives; loads in milliseconds, memory-maps nothing, pickles nothing."""

    directory: Path
    split: str
    shards: list[str]
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    label: np.ndarray

    def __post_init__(self) -> None:
        self._handles: dict[int, int] = {}
        self._pid = os.getpid()
        self._ends: np.ndarray | None = None

    def shard_ends(self) -> np.ndarray:
        """Per shard, the byte where its last sample ends: the least size the shard file can have."""
        if self._ends is None:
            ends = np.zeros(len(self.shards), dtype=np.int64)
            np.maximum.at(ends, self.shard, self.offset + self.length)
            self._ends = ends
        return self._ends

    def shard_counts(self) -> np.ndarray:
        """Per shard, how many samples the index places in it."""
        return np.bincount(self.shard, minlength=len(self.shards))

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    @classmethod
    def load(cls, directory: str | Path, split: str) -> ShardIndex:
        directory = Path(directory)
        path = index_path(directory, split)
        if not path.is_file():
            raise FileNotFoundError(
                f"no shard index {path}: the split '{split}' of {directory.name} is not prepared. Run "
                f"`timelit data prepare` (real data) or `timelit data synth` (quickstart) for it."
            )
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not a timelit shard index (format {metadata.get('format')!r})")
        arrays = load_file(str(path))
        return cls(
            directory=directory,
            split=split,
            shards=json.loads(metadata["shards"]),
            shard=arrays["shard"],
            offset=arrays["offset"],
            length=arrays["length"],
            label=arrays["label"],
        )

    def save(self) -> Path:
        path = index_path(self.directory, self.split)
        tmp = temporary_path(path)
        arrays = {"shard": self.shard, "offset": self.offset, "length": self.length, "label": self.label}
        save_file(arrays, str(tmp), metadata={"format": INDEX_FORMAT, "shards": json.dumps(self.shards)})
        _sort_header(tmp)
        replace_with(tmp, path)
        return path

    def _handle(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked loader worker opens its own files
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            path = self.directory / self.shards[shard]
            try:
                self._handles[shard] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"shard {path} is listed in {index_path(self.directory, self.split)} "
                    f"but missing; prepare the dataset again"
                ) from None
        return self._handles[shard]

    def read(self, position: int) -> dict[str, bytes]:
        """The raw members of sample `position` by extension, plus `__key__` and `__shard__`."""
        shard = int(self.shard[position])
        length = int(self.length[position])
        data = os.pread(self._handle(shard), length, int(self.offset[position]))
        where = f"{self.directory / self.shards[shard]} at byte {int(self.offset[position])}"
        if len(data) != length:
            raise CorruptSampleError(f"sample {position} of {where}: the file ends early", self._shard_problem(shard))
        members = tar_members(data)  # the fast path; None sends anything unusual to tarfile
        if members is None:
            members = _members_with_tarfile(data, f"sample {position} of {where}")
        sample: dict[str, Any] = {"__shard__": where}
        for name, body in members.items():
            key, extension = base_plus_ext(name)
            sample["__key__"] = key
            sample[extension.lower()] = body
        return sample

    def _shard_problem(self, shard: int) -> str:
        """What a short read says of the whole shard: `shard X is empty` or `shard X ends at byte N of M`."""
        samples = int(np.count_nonzero(self.shard == shard))
        size = os.fstat(self._handle(shard)).st_size
        return describe_shard(self.directory / self.shards[shard], samples, int(self.shard_ends()[shard]), size)

    def close(self) -> None:
        for handle in self._handles.values():
            os.close(handle)
        self._handles = {}


def _sort_header(path: Path) -> None:
    """Sort the keys of a safetensors file's JSON header, in place. safetensors keeps the metadata in a hash map whose
    order changes from process to process, so two saves of one index could differ in bytes; sorted, the file depends
    on its contents only, and two identical pools give identical index files. Readers find tensors by their offsets,
    which do not change; the sorted header is as long as safetensors' (both write compact JSON escaping the same
    characters), padded with spaces as safetensors pads it, else the file is rewritten with the longer one."""
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:
            handle.seek(8)
            handle.write(text.ljust(size))
            return
        data = handle.read()
    text = text.ljust(-(-len(text) // 8) * 8)  # the data stays 8-byte aligned
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def describe_shard(path: Path, samples: int, needed: int, size: int | None) -> str:
    """One line on a shard that cannot hold the `samples` its index places in its first `needed` bytes."""
    if size is None:
        return f"shard {path} is missing ({samples} samples)"
    if size == 0:
        return f"shard {path} is empty (its index places {samples} samples in {needed} bytes)"
    return f"shard {path} ends at byte {size} of {needed} (its index places {samples} samples there)"


def _members_with_tarfile(data: bytes, what: str) -> dict[str, bytes]:
    members = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive:
                if member.isfile():
                    members[member.name] = archive.extractfile(member).read()  # type: ignore[union-attr]
    except tarfile.TarError as error:
        raise CorruptSampleError(f"{what}: broken tar member ({error})") from error
    return members


def index_shards(directory: str | Path, split: str, shards: list[str] | None = None) -> ShardIndex:
    """Build (and save) the index of existing shards, e.g. an img2dataset pool; `shards` defaults to
    every `<split>-*.tar`, else every `*.tar` of the folder, in name order."""
    directory = Path(directory)
    if shards is None:
        found = sorted(directory.glob(f"{split}-*.tar")) or sorted(directory.glob("*.tar"))
        shards = [p.name for p in found]
    if not shards:
        raise FileNotFoundError(f"{directory}: no .tar shards to index for split '{split}'")
    columns: dict[str, list[int]] = {"shard": [], "offset": [], "length": [], "label": []}
    for number, name in enumerate(shards):
        for entry in scan_tar(directory / name):
            columns["shard"].append(number)
            columns["offset"].append(entry.offset)
            columns["length"].append(entry.end - entry.offset)
            columns["label"].append(entry.label)
    index = ShardIndex(
        directory=directory,
        split=split,
        shards=shards,
        shard=np.asarray(columns["shard"], dtype=np.int32),
        offset=np.asarray(columns["offset"], dtype=np.int64),
        length=np.asarray(columns["length"], dtype=np.int64),
        label=np.asarray(columns["label"], dtype=np.int32),
    )
    index.save()
    return index


class ShardWriter:
    """Write one split of one dataset as webdataset shards, then its index.

    Each shard is written under a temporary name and renamed when complete, and the index is written last, so an
    interrupted write leaves no index and the split reads as "not prepared" instead of half there.
    """

    def __init__(self, directory: str | Path, split: str, samples_per_shard: int = 1000):
        self.directory = Path(directory)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self.directory.mkdir(parents=True, exist_ok=True)
        self._shards: list[str] = []
        self._writer: TarWriter | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _rotate(self) -> None:
        self._finish_shard()
        name = shard_name(self.split, len(self._shards))
        self._tmp = temporary_path(self.directory / name)
        self._writer = shard_tar_writer(self._tmp)
        self._shards.append(name)

    def _finish_shard(self) -> None:
        if self._writer is not None and self._tmp is not None:
            self._writer.close()
            replace_with(self._tmp, self.directory / self._shards[-1])
            self._writer = None

    def add(self, key: str, image: bytes, image_format: str, caption: str, meta: dict[str, Any]) -> None:
        if image_format not in IMAGE_EXTENSIONS:
            raise ValueError(f"image format must be one of {IMAGE_EXTENSIONS}, got '{image_format}'")
        if self._writer is None or self._count % self.samples_per_shard == 0:
            self._rotate()
        assert self._writer is not None
        self._writer.write({"__key__": key, image_format: image, "txt": caption, "json": meta})
        self._count += 1

    def close(self) -> ShardIndex:
        self._finish_shard()
        return index_shards(self.directory, self.split, self._shards)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            self.close()
        elif self._writer is not None:
            self._writer.close()


def iter_split(directory: str | Path, split: str) -> Iterator[dict[str, bytes]]:
    """Every raw sample of a split in shard order (for `data verify` and tests)."""
    index = ShardIndex.load(directory, split)
    try:
        for position in range(len(index)):
            yield index.read(position)
    finally:
        index.close()
