"""The shards of `timelit data prepare`, one job each, run in worker processes: write, copy or only scan a shard.

Shard k of a split always holds records [k*S, (k+1)*S), so each shard is an independent job: a worker writes it
under a temporary name and renames it when complete, then scans it for the index. Every image is decoded once here
(`--decode false` skips this): a bad one fails its shard, naming its source file, or with `--skip_bad true` is left
out and reported. Images are stored as they are (jpg/png/webp bytes) unless `--resize` asks for a smaller copy or the
format is one webdataset readers do not expect (bmp, ppm, gif, tiff: stored as lossless PNG). A pool's shard is
copied in key order (`pool_shards.py`), or, indexed in place, only scanned; its samples are decoded after the copy.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from timelit.data.prepare.pool_shards import copy_in_key_order
from timelit.data.prepare.records import Record
from timelit.data.samples import decode as decode_sample
from timelit.data.samples import decode_image, describe, image_error, source_of
from timelit.data.shards import (
    IMAGE_EXTENSIONS,
    CorruptSampleError,
    ShardIndex,
    TarEntry,
    sample_key,
    scan_tar,
    shard_tar_writer,
)
from timelit.utilities.atomic import replace_with


class PrepareError(RuntimeError):
    """What went wrong in a prepare, every dataset and split at fault listed at once."""


@dataclass(frozen=True)
class ShardJob:
    """One shard: write it from records (datasets), copy it in key order from a URL or path (pools), or only scan
    it (pools in place).

    `check` decodes every image once (the loaders would otherwise meet a broken file mid-run); a bad one fails the
    shard, naming the source file, or with `skip_bad` is left out and reported.
    """

    dataset: str
    split: str
    directory: str
    name: str
    first: int = 0
    records: tuple[Record, ...] = ()
    url: str | None = None
    resize: int | None = None
    check: bool = True
    skip_bad: bool = False

    @property
    def path(self) -> Path:
        return Path(self.directory) / self.name  # an absolute `name` (a pool indexed in place) wins


@dataclass
class ShardScan:
    """What a shard holds: one entry per sample in tar order, and the bad images left out of it (source, reason)."""

    number: int
    written: bool
    offset: np.ndarray
    length: np.ndarray
    label: np.ndarray
    keys: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)


class BadImages(PrepareError):
    """Images that do not decode, as (source file, reason): a shard is not written while it has any."""

    def __init__(self, bad: list[tuple[str, str]]):
        super().__init__(bad)
        self.bad = bad

    def __str__(self) -> str:
        return "; ".join(f"{source}: {reason}" for source, reason in self.bad)


def source_name(record: Record) -> str:
    """The record's image as the user can find it: its file, or the member of a release archive."""
    return record.path if record.offset < 0 else f"{record.name or record.ref} in {record.path}"


def _encode(data: bytes, extension: str, resize: int | None, check: bool = True) -> tuple[bytes, str]:
    """The stored image: the file's bytes, or a re-encoded copy when resizing or for formats outside jpg/png/webp.
    With `check` the image is decoded in full even when its bytes are stored as they are."""
    if extension in IMAGE_EXTENSIONS and resize is None:
        if check:
            decode_image(data)
        return data, extension
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    if resize is not None and min(image.size) > resize:
        # Shorter side to `resize`, bicubic, as the pipeline's resized `_224` variants (FIF_REFERENCE.md §5).
        scale = resize / min(image.size)
        size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
        image = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    elif extension in IMAGE_EXTENSIONS:
        return data, extension
    buffer = io.BytesIO()
    if extension in ("jpg", "jpeg"):
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
        return buffer.getvalue(), "jpg"
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        image = image.convert("RGB")
    image.save(buffer, format="PNG")
    return buffer.getvalue(), "png"


def stored_image(record: Record, resize: int | None, check: bool = True) -> tuple[bytes, str] | str:
    """The image bytes and extension to store for a record, or, when it cannot be read or decoded, why not."""
    try:
        data = record.read_bytes()
    except OSError as error:
        return f"cannot be read ({type(error).__name__}: {error})"
    try:
        return _encode(data, record.extension, resize, check)
    except Exception as error:  # PIL raises many types for broken files
        return image_error(error)


def _temporary(path: Path) -> Path:
    """A name of this process's own: after a kill, an orphaned worker may still be finishing the same shard."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_dataset_shard(job: ShardJob) -> list[tuple[str, str]]:
    """Write the shard of `job.records`, leaving out (with `skip_bad`) the images that do not decode; returns those."""
    tmp = _temporary(job.path)
    bad: list[tuple[str, str]] = []
    with shard_tar_writer(tmp) as writer:  # the same records always give the same bytes
        for offset, record in enumerate(job.records):
            stored = stored_image(record, job.resize, job.check)
            if isinstance(stored, str):
                bad.append((source_name(record), stored))
                continue
            image, extension = stored
            meta = {"dataset": job.dataset, "split": job.split, "label": record.label, "source_path": record.ref}
            if record.classname is not None:
                meta["classname"] = record.classname
            if len(record.captions) > 1:
                meta["captions"] = list(record.captions)
            key = sample_key(job.dataset, job.split, job.first + offset)
            writer.write({"__key__": key, extension: image, "txt": record.captions[0], "json": meta})
    if bad and not job.skip_bad:
        tmp.unlink(missing_ok=True)
        raise BadImages(bad)
    replace_with(tmp, job.path)
    return bad


def _copy_shard(job: ShardJob) -> None:
    """Copy a pool shard in key order (`pool_shards`): two downloads that differ in member order give the same
    bytes."""
    assert job.url is not None
    tmp = _temporary(job.path)
    try:
        copy_in_key_order(job.url, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    replace_with(tmp, job.path)


def _left_out(job: ShardJob, keys: list[str]) -> list[tuple[str, str]]:
    """The records of a dataset shard written by an earlier prepare that it lacks (left out there with
    `--skip_bad true`), with the reason they fail now; a record that now decodes means the shard is stale."""
    present = set(keys)
    bad, stale = [], []
    for offset, record in enumerate(job.records):
        if sample_key(job.dataset, job.split, job.first + offset) in present:
            continue
        stored = stored_image(record, job.resize, job.check)
        if isinstance(stored, str):
            bad.append((source_name(record), stored))
        else:
            stale.append(source_name(record))
    if stale:
        raise PrepareError(
            f"{job.path} lacks {len(stale)} image(s) that decode now (e.g. {stale[0]}), left out by an earlier "
            f"prepare: delete the shard and run prepare again"
        )
    return bad


def _check_pool_samples(path: Path, entries: list[TarEntry]) -> tuple[list[bool], list[tuple[str, str]]]:
    """Decode every sample of a pool shard as the loaders will; returns which are good and the bad ones."""
    index = ShardIndex(
        directory=path.parent,
        split="check",
        shards=[path.name],
        shard=np.zeros(len(entries), dtype=np.int32),
        offset=np.array([e.offset for e in entries], dtype=np.int64),
        length=np.array([e.end - e.offset for e in entries], dtype=np.int64),
        label=np.array([e.label for e in entries], dtype=np.int32),
    )
    good, bad = [], []
    try:
        for position, entry in enumerate(entries):
            raw: dict = {}
            try:
                raw = index.read(position)
                decode_sample(raw)
                good.append(True)
            except (CorruptSampleError, OSError) as error:
                good.append(False)
                source = source_of(raw) or f"sample '{entry.key}' in {path}"
                bad.append((source, str(error).removeprefix(describe(raw)).lstrip(": ") if raw else str(error)))
    finally:
        index.close()
    return good, bad


def run_shard_job(number: int, job: ShardJob) -> ShardScan:
    """Write (or copy) the shard unless it is complete already, then scan it; errors name the shard, bad images
    their source file."""
    written = False
    bad: list[tuple[str, str]] = []
    try:
        if not job.path.is_file():
            if job.url is not None:
                _copy_shard(job)
            elif job.records:
                bad = _write_dataset_shard(job)
            else:
                raise FileNotFoundError(f"{job.path} does not exist")
            written = True
        entries = scan_tar(job.path)
        if job.records and not written:
            bad = _left_out(job, [e.key for e in entries])
        elif not job.records and job.check:
            good, bad = _check_pool_samples(job.path, entries)
            if job.skip_bad:  # a pool's tar files may be the user's own: its bad samples leave the index only
                entries = [e for e, ok in zip(entries, good) if ok]
    except BadImages:
        raise
    except Exception as error:
        raise PrepareError(f"{job.dataset}/{job.split} shard {job.path}: {error}") from error
    if bad and not job.skip_bad:
        raise BadImages(bad)
    return ShardScan(
        number,
        written,
        np.array([e.offset for e in entries], dtype=np.int64),
        np.array([e.end - e.offset for e in entries], dtype=np.int64),
        np.array([e.label for e in entries], dtype=np.int32),
        [e.key for e in entries],
        bad,
    )
