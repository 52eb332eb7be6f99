"""A pool shard copied into the data root in key order, so that its bytes depend on its samples only.

img2dataset writes each shard's members in the order their downloads finished, so two downloads of one URL list give
shards that hold the same samples in different orders (and tar headers stamped with each download's times). A copy
that writes the samples sorted by key, each sample's members together in name order, through `shard_tar_writer`
(fixed mtime, owner and mode) gives the two downloads byte-identical shards, and so byte-identical indexes. The
member bytes are stored as read, never decoded or re-encoded here: decoding checks run on the copy afterwards
(`shard_jobs.run_shard_job`), and nothing is unpickled.

A source that cannot seek (an `https://` or `pipe:` stream from webdataset's `gopen`) is spooled to a local file
first, since sorting needs the whole shard; a local file is read where it lies.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path
from typing import IO

from webdataset.tariterators import base_plus_ext

from timelit.data.shards import shard_tar_writer

SPOOL_SUFFIX = ".download.tmp"  # ends in .tmp: prepare's cleanup of killed writers removes it too


def _seekable(stream: IO[bytes]) -> bool:
    """Whether tarfile can read `stream` at random (gopen's pipes have no `seekable`)."""
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError):
        return False


def sample_members(archive: tarfile.TarFile) -> dict[str, dict[str, tarfile.TarInfo]]:
    """{key: {extension: member}} of the regular files, grouped by webdataset's key rule (`base_plus_ext`) wherever
    they lie in the tar. Members without a key, and extensions that start with `_` (webdataset's metadata, which its
    writer does not store), are left out: no reader of the shard would see them."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in archive:
        if not member.isfile():
            continue
        key, extension = base_plus_ext(member.name)
        if key is None or extension.startswith("_"):
            continue
        members = samples.setdefault(key, {})
        if extension in members:  # which copy a reader gets would depend on the order of the members
            raise ValueError(f"member {member.name} appears twice")
        members[extension] = member
    return samples


def write_in_key_order(archive: tarfile.TarFile, target: Path) -> int:
    """Write `target` from `archive`: its samples sorted by key, each one's member bytes as they are; returns how
    many samples it holds."""
    samples = sample_members(archive)
    with shard_tar_writer(target, encode=False) as writer:
        for key in sorted(samples):
            sample: dict[str, str | bytes] = {"__key__": key}
            for extension, member in samples[key].items():
                sample[extension] = archive.extractfile(member).read()  # type: ignore[union-attr]
            writer.write(sample)
    return len(samples)


def copy_in_key_order(url: str, target: Path) -> int:
    """Copy the shard at `url` (a path, or anything webdataset's `gopen` opens) to `target` in key order; returns
    the number of samples. A stream that cannot seek is spooled beside `target` and removed afterwards."""
    from webdataset.gopen import gopen

    spool = target.with_name(target.name + SPOOL_SUFFIX)
    try:
        with gopen(url, "rb") as source:
            if _seekable(source):
                with tarfile.open(fileobj=source, mode="r:") as archive:
                    return write_in_key_order(archive, target)
            with open(spool, "wb") as copy:
                shutil.copyfileobj(source, copy, length=1 << 20)
        # closed first: a pipe's close is where a failed download (curl's exit status) is raised
        with tarfile.open(spool, mode="r:") as archive:
            return write_in_key_order(archive, target)
    finally:
        spool.unlink(missing_ok=True)
