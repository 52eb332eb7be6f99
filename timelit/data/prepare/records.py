"""What every source layout lists: `Record`s of one split, labelled through the manifest's class list.

A reader (release.py, imagefolder.py, csv_files.py) lists the records of a split in a deterministic order (the order
of the metadata file, or sorted paths): `prepare` cuts that list into shards, so the same folder always gives the
same shards and a killed prepare resumes shard by shard. Class names the manifest does not know are collected by
`ClassMapper` and reported together.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from timelit.data.manifest import DatasetManifest
from timelit.utilities.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".gif", ".tif", ".tiff")


class LayoutError(UserError, ValueError):
    """A source folder does not match its layout or its manifest; the message names the file and lists every case."""


@dataclass(frozen=True)
class Record:
    """One image of a split as the source describes it.

    Args:
        path: the image file.
        ref: the image as the source names it (metadata key, relative path or CSV cell), kept in the sample's JSON.
        label: index in the manifest's class list; for a retrieval set without classes, the image's own position.
        classname: the class name, None for a retrieval set without classes.
        captions: every caption of the image; the first is the `.txt` caption.
        offset: where the image's bytes start in `path` when `path` is a tar archive (-1: a plain image file).
        size: how many bytes the image has in the archive.
        name: the image's file name (its extension tells the format; `path` is the archive for archived images).
    """

    path: str
    ref: str
    label: int
    classname: str | None
    captions: tuple[str, ...]
    offset: int = -1
    size: int = -1
    name: str = ""

    @property
    def extension(self) -> str:
        return Path(self.name or self.path).suffix.lower().lstrip(".")

    def read_bytes(self) -> bytes:
        if self.offset < 0:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as handle:
            data = os.pread(handle.fileno(), self.size, self.offset)
        if len(data) != self.size:
            raise OSError(f"{self.path} ends inside member {self.name} (truncated archive?)")
        return data


@dataclass
class SplitListing:
    """The records of one split and how they were found (for the prepare summary and the resume fingerprint)."""

    records: list[Record]
    origin: str
    notes: list[str]


class ClassMapper:
    """Class name -> label of one manifest; unknown names are collected, not raised one at a time."""

    def __init__(self, manifest: DatasetManifest):
        self.manifest = manifest
        self.index = {name: label for label, name in reversed(list(enumerate(manifest.classnames)))}
        # Folder names cannot hold "/", so such classes are also found with "-" in its place (as the pipeline's
        # ImageNet-V2 module names its class folders).
        self.folder_index = {name.replace("/", "-"): label for name, label in self.index.items()}
        self.unknown: dict[str, int] = {}

    def label(self, name: str, allow_folder_form: bool = False, images: int = 1) -> int | None:
        """The label of `name`, or None, counting `images` images (a class folder's count) under the unknown name."""
        if name in self.index:
            return self.index[name]
        if allow_folder_form and name in self.folder_index:
            return self.folder_index[name]
        self.unknown[name] = self.unknown.get(name, 0) + images
        return None

    def check(self, where: str) -> None:
        if not self.unknown:
            return
        shown = []
        for name, count in sorted(self.unknown.items())[:20]:
            close = difflib.get_close_matches(name, list(self.index), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            shown.append(f"  {name!r}: {count} image(s){hint}")
        more = f"\n  ... and {len(self.unknown) - 20} more" if len(self.unknown) > 20 else ""
        raise LayoutError(
            f"{where}: {len(self.unknown)} class name(s) are not in the class list of {self.manifest.name} "
            f"({self.manifest.path}):\n" + "\n".join(shown) + more
        )


# A split to list: its manifest, its name and the reader that lists it (called by `prepare`, which collects the
# LayoutErrors of every split before writing anything).
Lister = tuple[DatasetManifest, str, Callable[[], SplitListing]]


@dataclass
class Found:
    """What a source holds, as `timelit data new` scans it: its layout, class names (None: a CSV without labels, a
    retrieval set) and the image count of every split."""

    layout: Literal["imagefolder", "csv"]
    classnames: list[str] | None
    counts: dict[str, int]
    notes: list[str] = field(default_factory=list)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders numbers by value: class folders 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def chosen_splits(manifest: DatasetManifest, splits: list[str] | None) -> list[str]:
    """The splits asked for (default: all of the manifest's), each checked against the manifest."""
    chosen = list(splits) if splits else list(manifest.splits)
    unknown = [s for s in chosen if s not in manifest.splits]
    if unknown:
        raise LayoutError(
            f"{manifest.name}: split(s) {unknown} are not in its manifest ({manifest.path}); its splits: "
            f"{sorted(manifest.splits)}"
        )
    return chosen


def one_dataset(datasets: list[str] | None, layout: str) -> str:
    if not datasets or len(datasets) != 1:
        raise LayoutError(f"--layout {layout} prepares one dataset: pass --datasets NAME (got {datasets})")
    return datasets[0]
