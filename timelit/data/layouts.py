"""Readers of downloaded dataset folders: what `timelit data prepare` turns into shards.

    timelit data prepare --source /data/fomo_in_flux --data_root /data/timelit          (release layout)
    timelit data prepare --layout imagefolder --source /data/pets --datasets [OXFORDPETS] --data_root /data/timelit

Each reader lists the samples of one split of one dataset as `Record`s, in a deterministic order (the order of the
metadata file, or sorted paths): `prepare` cuts that list into shards, so the same folder always gives the same
shards and a killed prepare can resume shard by shard. A record's label is its index in the manifest's class list,
looked up by class name; names the manifest does not know are collected and reported together.

Layouts:

* **release** — the FoMo-in-Flux release (FIF_REFERENCE.md §5): images under `<release>/<FOLDER>/...` (or in the
  archive `<release>/<FOLDER>.tar`, read in place) and, per split,
  a metadata JSON `<FOLDER>_<split>.json` (kept in the pipeline's `data_lib/00_info/`) mapping each image path
  (relative to FOLDER) to `{classname, default_caption, primer_caption, synthetic_caption, synthetic_merged_caption,
  target}`; or the resized variant `<FOLDER>/<FOLDER>_<split>_224/...` with `<FOLDER>_<split>_224.json`. The training
  caption is `default_caption`, else `synthetic_merged_caption`, as the pipeline trains (a list keeps every caption).
* **imagefolder** — `<root>/<split>/<class>/<image>`, captioned with a template (default: the dataset's prompt).
* **csv** — rows `path,caption[,label]` (an optional header row starting with `path`); several rows with the same
  path give one image with several captions, as retrieval sets have.
"""

from __future__ import annotations

import csv
import difflib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from timelit.data.manifest import DatasetManifest
from timelit.errors import UserError

Variant = Literal["auto", "original", "224"]
RESIZED_SIZE = 224
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".ppm", ".gif", ".tif", ".tiff")
METADATA_SUBDIRS = ("00_info", "data_lib/00_info", ".")


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


def _caption_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def release_captions(entry: dict[str, Any], template: str) -> list[str]:
    """The pipeline's training text: `default_caption`, else `synthetic_merged_caption` (FIF_REFERENCE.md §5).

    Where both are empty, timelit falls back to `primer_caption` and then to the prompt template, so that every
    sample has a caption (the pipeline would use the class prompt there as well).
    """
    for key in ("default_caption", "synthetic_merged_caption", "primer_caption"):
        captions = _caption_list(entry.get(key))
        if captions:
            return captions
    classname = entry.get("classname")
    return [template.format(classname)] if classname else []


class ReleaseImages:
    """Where a release keeps one dataset's images: the folder `<release>/<FOLDER>/`, or the archive
    `<release>/<FOLDER>.tar` that the pipeline reads with `dataset.tar=True` (members `<FOLDER>/<path>`).

    An archive is read in place: its member headers are scanned once, and each image is later read by byte range,
    so the release need not be extracted.
    """

    def __init__(self, release: Path, folder: str):
        self.folder = folder
        self.directory = release / folder
        self.archive = release / f"{folder}.tar"
        self._members: dict[str, tuple[int, int]] | None = None

    @property
    def exists(self) -> bool:
        return self.directory.is_dir() or self.archive.is_file()

    @property
    def where(self) -> Path:
        return self.directory if self.directory.is_dir() else self.archive

    def members(self) -> dict[str, tuple[int, int]]:
        if self._members is None:
            self._members = {}
            with tarfile.open(self.archive, "r:") as archive:
                for member in archive:
                    if member.isfile():
                        name = member.name.removeprefix("./")
                        name = name.removeprefix(f"{self.folder}/")
                        self._members[name] = (member.offset_data, member.size)
        return self._members

    def has_folder(self, name: str) -> bool:
        if self.directory.is_dir():
            return (self.directory / name).is_dir()
        if not self.archive.is_file():
            return False
        return any(member.startswith(f"{name}/") for member in self.members())

    def locate(self, ref: str) -> tuple[str, int, int] | None:
        """(path, offset, size) of an image, offset -1 for a plain file; None when it is missing."""
        if self.directory.is_dir():
            path = self.directory / ref
            return (str(path), -1, -1) if path.is_file() else None
        found = self.members().get(ref) if self.archive.is_file() else None
        return (str(self.archive), found[0], found[1]) if found else None


def release_folder(manifest: DatasetManifest) -> str:
    return str(manifest.source.get("release_folder") or manifest.name)


def release_split(manifest: DatasetManifest, split: str) -> str:
    """The release's name of a timelit split (iNaturalist-2021 trains on `train_mini` and tests on `val`)."""
    return str((manifest.source.get("release_splits") or {}).get(split, split))


def find_metadata(release: Path, metadata_dir: Path | None, stem: str) -> Path | None:
    """`<stem>.json` in `metadata_dir`, else in the release's `00_info/`, `data_lib/00_info/` or top folder."""
    folders = [metadata_dir] if metadata_dir is not None else [release / sub for sub in METADATA_SUBDIRS]
    for folder in folders:
        candidate = folder / f"{stem}.json"
        if candidate.is_file():
            return candidate
    return None


def _metadata_candidates(release: Path, metadata_dir: Path | None, folder: str) -> list[str]:
    folders = [metadata_dir] if metadata_dir is not None else [release / sub for sub in METADATA_SUBDIRS]
    found = sorted({p.name for f in folders if f.is_dir() for p in f.glob(f"{folder}_*.json")})
    return [name for name in found if not name.endswith("_classnames.json")]


def release_records(
    release: str | Path,
    manifest: DatasetManifest,
    split: str,
    metadata_dir: str | Path | None = None,
    variant: Variant = "auto",
) -> SplitListing:
    """The records of one split of a FoMo-in-Flux release folder.

    `variant="auto"` reads the resized 224-pixel copy when both its metadata and its image folder exist (the
    pipeline's `create_resized_variant_if_possible`), else the original images.
    """
    release = Path(release).expanduser()
    meta_dir = Path(metadata_dir).expanduser() if metadata_dir is not None else None
    folder = release_folder(manifest)
    rsplit = release_split(manifest, split)
    original = find_metadata(release, meta_dir, f"{folder}_{rsplit}")
    resized_stem = f"{folder}_{rsplit}_{RESIZED_SIZE}"
    resized = find_metadata(release, meta_dir, resized_stem)
    images = ReleaseImages(release, folder)
    if not images.exists:
        raise LayoutError(f"{manifest.name}/{split}: no image folder {images.directory} nor archive {images.archive}")
    resized_ok = resized is not None and images.has_folder(resized_stem)
    if variant == "224" or (variant == "auto" and resized_ok):
        chosen, used = resized, "224"
    else:
        chosen, used = original, "original"
    if chosen is None:
        wanted = f"{resized_stem}.json" if used == "224" else f"{folder}_{rsplit}.json"
        where = meta_dir if meta_dir is not None else " or ".join(str(release / s) for s in METADATA_SUBDIRS)
        found = _metadata_candidates(release, meta_dir, folder)
        raise LayoutError(
            f"{manifest.name}/{split}: no metadata file {wanted} in {where} (the pipeline keeps them in "
            f"data_lib/00_info/; pass --metadata_dir). Found for {folder}: {found or 'nothing'}"
        )
    try:
        entries = json.loads(chosen.read_text())
    except json.JSONDecodeError as error:
        raise LayoutError(f"{chosen}: not valid JSON ({error})") from error
    if not isinstance(entries, dict):
        raise LayoutError(f"{chosen}: expected a JSON object mapping image paths to their metadata")
    template = manifest.prompt_templates[0]
    mapper = ClassMapper(manifest)
    records, missing, uncaptioned, target_mismatch = [], [], [], 0
    has_classes = bool(manifest.classnames)
    for position, (ref, entry) in enumerate(entries.items()):
        entry = entry if isinstance(entry, dict) else {}
        classname = entry.get("classname")
        target = entry.get("target")
        if has_classes:
            if classname is None and isinstance(target, int) and 0 <= target < manifest.num_classes:
                classname = manifest.classnames[target]
            label = mapper.label(str(classname)) if classname is not None else None
            if label is None:
                if classname is None:
                    key = f"<no classname, target {target!r}>"
                    mapper.unknown[key] = mapper.unknown.get(key, 0) + 1
                continue
            if isinstance(target, int) and target != label:
                target_mismatch += 1
        else:
            label, classname = position, None
        captions = release_captions(entry, template)
        if not captions:
            uncaptioned.append(ref)
            continue
        found = images.locate(ref)
        if found is None:
            missing.append(f"{images.where}/{ref}" if images.directory.is_dir() else f"{ref} (in {images.archive})")
            continue
        path, offset, size = found
        records.append(Record(path, ref, label, classname, tuple(captions), offset, size, Path(ref).name))
    mapper.check(str(chosen))
    problems = []
    if missing:
        problems.append(f"{len(missing)} image(s) listed in {chosen} are missing, e.g. " + ", ".join(missing[:5]))
    if uncaptioned:
        problems.append(f"{len(uncaptioned)} image(s) in {chosen} have no caption, e.g. " + ", ".join(uncaptioned[:5]))
    if problems:
        raise LayoutError(f"{manifest.name}/{split}: " + "; ".join(problems))
    notes = [f"{used} images" + ("" if images.directory.is_dir() else f" from {images.archive.name}")]
    if target_mismatch:
        notes.append(f"{target_mismatch} 'target' values differ from the manifest's class order (labels follow names)")
    return SplitListing(records, str(chosen), notes)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def imagefolder_records(
    root: str | Path, manifest: DatasetManifest, split: str, caption_template: str | None = None
) -> SplitListing:
    """`<root>/<split>/<class>/<image>` (images may sit in subfolders of the class folder), in sorted order."""
    if not manifest.classnames:
        raise LayoutError(f"{manifest.name}: the imagefolder layout needs a class list; use the csv layout instead")
    base = Path(root).expanduser() / split
    if not base.is_dir():
        raise LayoutError(f"{manifest.name}/{split}: no folder {base} (expected <source>/<split>/<class>/<image>)")
    template = caption_template or manifest.prompt_templates[0]
    if "{}" not in template:
        raise LayoutError(f"caption template {template!r} must contain '{{}}' for the class name")
    mapper = ClassMapper(manifest)
    records = []
    for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        images = sorted(p for p in class_dir.rglob("*") if _is_image(p))
        label = mapper.label(class_dir.name, allow_folder_form=True, images=len(images))
        if label is None:
            continue
        classname = manifest.classnames[label]
        for path in images:
            ref = str(path.relative_to(base))
            records.append(Record(str(path), ref, label, classname, (template.format(classname),)))
    mapper.check(str(base))
    if not records:
        raise LayoutError(f"{manifest.name}/{split}: no images ({', '.join(IMAGE_SUFFIXES)}) under {base}")
    return SplitListing(records, str(base), [f"captions from {template!r}"])


def csv_records(csv_path: str | Path, manifest: DatasetManifest, image_root: str | Path | None = None) -> SplitListing:
    """Rows `path,caption[,label]`; relative paths are taken from `image_root` (default: the CSV's folder).

    A label cell is a class name of the manifest, or else an integer index into its class list. Retrieval sets
    without classes need no label: every image is its own.
    """
    csv_path = Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise LayoutError(f"{manifest.name}: no CSV file {csv_path}")
    root = Path(image_root).expanduser() if image_root is not None else csv_path.parent
    mapper = ClassMapper(manifest)
    images: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    with csv_path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or (line == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                problems.append(f"line {line}: expected path,caption[,label], got {row!r}")
                continue
            ref, caption = row[0].strip(), row[1].strip()
            cell = row[2].strip() if len(row) > 2 else ""
            label = _csv_label(cell, manifest, mapper, problems, line)
            image = images.setdefault(ref, {"captions": [], "label": label, "line": line})
            image["captions"].append(caption)
            if label != image["label"]:
                problems.append(
                    f"line {line}: {ref} has label {label} here but {image['label']} on line {image['line']}"
                )
    mapper.check(str(csv_path))
    records = []
    for position, (ref, image) in enumerate(images.items()):
        path = Path(ref) if Path(ref).is_absolute() else root / ref
        if not path.is_file():
            problems.append(f"image {path} (line {image['line']}) does not exist")
            continue
        label = image["label"]
        if label is None:
            if manifest.classnames:
                problems.append(f"line {image['line']}: {ref} has no label, and {manifest.name} has classes")
                continue
            label = position
        classname = manifest.classnames[label] if manifest.classnames else None
        records.append(Record(str(path), ref, label, classname, tuple(image["captions"])))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise LayoutError(f"{csv_path}: {len(problems)} problem(s):\n  {shown}")
    if not records:
        raise LayoutError(f"{csv_path}: no rows")
    return SplitListing(records, str(csv_path), [f"{len(records)} images from CSV"])


def _csv_label(cell: str, manifest: DatasetManifest, mapper: ClassMapper, problems: list[str], line: int) -> int | None:
    if not cell:
        return None
    if not manifest.classnames:
        problems.append(f"line {line}: label {cell!r}, but {manifest.name} has no class list")
        return None
    if cell in mapper.index:
        return mapper.index[cell]
    if cell.lstrip("-").isdigit():
        value = int(cell)
        if 0 <= value < manifest.num_classes:
            return value
        problems.append(f"line {line}: label {value} is outside 0..{manifest.num_classes - 1}")
        return None
    return mapper.label(cell)
