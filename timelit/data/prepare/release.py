"""The FoMo-in-Flux release layout (FIF_REFERENCE.md §5), what `timelit data prepare` reads by default.

    timelit data prepare --source /data/fomo_in_flux --metadata_dir fomo_in_flux/data_lib/00_info --data_root /data/tl

Images lie under `<release>/<FOLDER>/...` (or in the archive `<release>/<FOLDER>.tar`, read in place) and, per split,
a metadata JSON `<FOLDER>_<split>.json` (kept in the pipeline's `data_lib/00_info/`) maps each image path (relative
to FOLDER) to `{classname, default_caption, primer_caption, synthetic_caption, synthetic_merged_caption, target}`; or
the resized variant `<FOLDER>/<FOLDER>_<split>_224/...` with `<FOLDER>_<split>_224.json`. The training caption is
`default_caption`, else `synthetic_merged_caption`, as the pipeline trains (a list keeps every caption).
"""

from __future__ import annotations

import tarfile
from functools import partial
from pathlib import Path
from typing import Any

from timelit.data.manifest import DatasetManifest, ManifestSet, names, read_document
from timelit.data.prepare.options import PrepareOptions, Variant
from timelit.data.prepare.records import ClassMapper, LayoutError, Lister, Record, SplitListing, chosen_splits

RESIZED_SIZE = 224
METADATA_SUBDIRS = ("00_info", "data_lib/00_info", ".")


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
    problem = "expected a JSON object mapping image paths to their metadata"
    entries = read_document(chosen, dict, problem, error=LayoutError)
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


def listers(manifest_set: ManifestSet, root: Path, options: PrepareOptions) -> tuple[list[Lister], list[str]]:
    """The splits of every dataset asked for (default: every dataset whose folder the release holds), and the
    datasets of the manifest set that the release does not hold."""
    datasets = names(options.datasets)
    skipped: list[str] = []
    if datasets:
        chosen = [manifest_set.dataset(name) for name in datasets]
    else:
        chosen = [m for m in manifest_set.datasets.values() if ReleaseImages(root, release_folder(m)).exists]
        skipped = [m.name for m in manifest_set.datasets.values() if m not in chosen]
        if not chosen:
            folders = sorted(release_folder(m) for m in manifest_set.datasets.values())
            raise LayoutError(f"{root}: holds none of the release folders of the manifests ({', '.join(folders)})")
    found = [
        (manifest, split, partial(release_records, root, manifest, split, options.metadata_dir, options.variant))
        for manifest in chosen
        for split in chosen_splits(manifest, names(options.splits))
    ]
    return found, skipped
