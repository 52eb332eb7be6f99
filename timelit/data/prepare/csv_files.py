"""The csv layout: rows `path,caption[,label]` (an optional header row starting with `path`), one CSV per split.

    timelit data prepare --layout csv --source ~/coco/test.csv --datasets [MSCOCO] --splits [test] --data_root /data/tl
    timelit data new --name COCO --source ~/coco --out my_set            (scan_csv)

Several rows with the same path give one image with several captions, as retrieval sets have.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from timelit.data.manifest import DatasetManifest, names
from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.records import ClassMapper, Found, LayoutError, Record, SplitListing, natural_key


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


def split_readers(
    manifest: DatasetManifest, root: Path, options: PrepareOptions
) -> dict[str, Callable[[], SplitListing]]:
    """The reader of every split asked for: ROOT as the CSV of one split, or ROOT's <split>.csv files."""
    splits = names(options.splits)
    if root.is_file():
        chosen = splits or (list(manifest.splits) if len(manifest.splits) == 1 else None)
        if not chosen or len(chosen) != 1:
            raise LayoutError(f"{root} is one CSV: name its split with --splits [SPLIT] ({sorted(manifest.splits)})")
        files = {chosen[0]: root}
    else:
        found = splits or [s for s in manifest.splits if (root / f"{s}.csv").is_file()]
        if not found:
            raise LayoutError(f"{root}: no <split>.csv for the splits of {manifest.name} ({sorted(manifest.splits)})")
        files = {s: root / f"{s}.csv" for s in found}
    return {split: partial(csv_records, path, manifest, options.image_root) for split, path in files.items()}


def _csv_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line, image path, label cell) of every row `path,caption[,label]`; an optional header row starts `path`."""
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row or (line == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise LayoutError(f"{path}: line {line}: expected path,caption[,label], got {row!r}")
            rows.append((line, row[0].strip(), row[2].strip() if len(row) > 2 else ""))
    if not rows:
        raise LayoutError(f"{path}: no rows (expected path,caption[,label])")
    return rows


def scan_csv(files: dict[str, Path]) -> Found:
    """CSV files per split: the label column's names as classes (all rows labelled, or none: a retrieval set whose
    images are their own labels), and the distinct images per split (rows of one path are one image's captions)."""
    counts: dict[str, int] = {}
    labels: set[str] = set()
    unlabelled: list[str] = []
    for split, path in files.items():
        rows = _csv_rows(path)
        counts[split] = len({ref for _, ref, _ in rows})
        labels.update(cell for _, _, cell in rows if cell)
        unlabelled += [f"{path.name} line {line}" for line, _, cell in rows if not cell]
    if labels and unlabelled:
        raise LayoutError(
            f"{len(unlabelled)} row(s) have no label while others do (e.g. {unlabelled[0]}); label every row "
            f"path,caption,label, or none for a retrieval set"
        )
    classes = sorted(labels, key=natural_key) if labels else None
    return Found("csv", classes, counts)
