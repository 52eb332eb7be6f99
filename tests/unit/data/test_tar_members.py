"""The header parser returns exactly what tarfile returns for the tar records timelit and img2dataset write, and
None (so that tarfile decides) for anything it does not handle."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from timelit.data.tar_members import BLOCK, tar_members


def with_tarfile(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}


def webdataset_bytes(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        for sample in samples:
            writer.write(sample)
    return buffer.getvalue()


def stdlib_bytes(members: dict[str, bytes], fmt: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "sample",
    [
        {"__key__": "CIFAR100/train/00000042", "png": b"\x89PNG" + bytes(700), "txt": "a fox", "json": b"{}"},
        {"__key__": "d/" + "x" * 150, "txt": "a name longer than the 100 bytes of a ustar name field"},
        {"__key__": "Ünïcödé/train/0", "txt": "ein Foto", "jpg": b""},
        {"__key__": "exact", "bin": bytes(BLOCK)},
    ],
    ids=["png+txt+json", "long-name", "unicode-empty", "exactly-one-block"],
)
def test_webdataset_records_parse_as_tarfile_reads_them(sample):
    data = webdataset_bytes([sample])
    assert tar_members(data) == with_tarfile(data) != {}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT])
def test_stdlib_archives_parse_as_tarfile_reads_them(fmt):
    members = {"k/0.txt": b"caption", "k/0.json": b'{"label": 3}', "deep/" * 30 + "k.txt": b"prefix or PAX"}
    if fmt == tarfile.USTAR_FORMAT:
        members.pop("deep/" * 30 + "k.txt")  # too long for plain ustar
    data = stdlib_bytes(members, fmt)
    assert tar_members(data) == with_tarfile(data) == members


def test_unknown_or_damaged_records_are_left_to_tarfile():
    data = webdataset_bytes([{"__key__": "k", "txt": "hello " * 400}])
    assert tar_members(stdlib_bytes({"g" * 120: b"x"}, tarfile.GNU_FORMAT)) is None  # GNU long-name record
    assert tar_members(b"not a tar header".ljust(BLOCK, b"!")) is None
    assert tar_members(data[: data.index(b"hello") + 100]) is None  # a member's data cut short
    broken_size = bytearray(data)
    header = data.index(b"ustar") - 257
    broken_size[header + 124 : header + 136] = b"9" * 12  # not octal
    assert tar_members(bytes(broken_size)) is None
