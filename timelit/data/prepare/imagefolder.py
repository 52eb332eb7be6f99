"""The imagefolder layout: `<root>/<split>/<class>/<image>`, captioned with a template (default: the dataset's prompt).

timelit data prepare --layout imagefolder --source ~/pets --datasets [OXFORDPETS] --data_root /data/tl
timelit data new --name PETS --source ~/pets --out my_set          (scan_imagefolder)
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from timelit.data.manifest import DatasetManifest, names
from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.records import (
    IMAGE_SUFFIXES,
    ClassMapper,
    Found,
    LayoutError,
    Record,
    SplitListing,
    is_image,
    natural_key,
)


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
        images = sorted(p for p in class_dir.rglob("*") if is_image(p))
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


def split_readers(
    manifest: DatasetManifest, root: Path, options: PrepareOptions
) -> dict[str, Callable[[], SplitListing]]:
    """The reader of every split asked for: those named, else every split of the manifest that has a folder."""
    wanted = names(options.splits) or [s for s in manifest.splits if (root / s).is_dir()]
    if not wanted:
        raise LayoutError(f"{root}: no split folder of {manifest.name} ({sorted(manifest.splits)}) in it")
    return {split: partial(imagefolder_records, root, manifest, split, options.caption_template) for split in wanted}


def scan_imagefolder(root: Path) -> Found:
    """`<root>/<split>/<class>/<image>`: the classes of every split together, and the images per split (counted as
    `timelit data prepare --layout imagefolder` reads them: image files anywhere under a class folder)."""
    splits = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    counts: dict[str, int] = {}
    classes: set[str] = set()
    loose = sorted(p.name for p in root.iterdir() if is_image(p))
    for split in splits:
        class_dirs = [p for p in split.iterdir() if p.is_dir() and not p.name.startswith(".")]
        images = {c.name: sum(1 for p in c.rglob("*") if is_image(p)) for c in class_dirs}
        if not any(images.values()):
            continue
        counts[split.name] = sum(images.values())
        classes.update(name for name, count in images.items() if count)
    if not counts:
        hint = f" (it holds {len(loose)} images directly: put them in <split>/<class>/ folders)" if loose else ""
        raise LayoutError(
            f"{root}: no images in <split>/<class>/ folders{hint}; an image folder is "
            f"<source>/train/<class>/<image> and <source>/test/<class>/<image>"
        )
    return Found("imagefolder", sorted(classes, key=natural_key), counts)
