"""The settings of `timelit data prepare`: one dataclass, read by `prepare` and, field by field, by the command.

timelit data prepare --layout csv --source ~/coco/test.csv --datasets [MSCOCO] --splits [test] --data_root /data/tl
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Layout = Literal["release", "imagefolder", "csv", "pool"]
Variant = Literal["auto", "original", "224"]


@dataclass(frozen=True)
class PrepareOptions:
    """What to prepare, from where, and how (`timelit data prepare --help` lists these fields).

    Args:
        source: the downloaded data: the FoMo-in-Flux release folder, with <FOLDER>/ image folders or <FOLDER>.tar
            archives (release); a folder with <split>/<class>/ image folders (imagefolder); a CSV file or a folder of
            <split>.csv files (csv); a folder of img2dataset .tar shards, or shard URLs / brace patterns readable by
            webdataset (pool).
        data_root: where timelit's shards go (the data module's data_root).
        layout: how SOURCE is organised.
        datasets: manifest names to prepare, as NAME or [NAME,...] (release: default every dataset whose folder
            SOURCE holds; other layouts: exactly one, for pool a pool name such as LAION400M).
        splits: splits to prepare, as SPLIT or [SPLIT,...] (default: every split of the manifest that SOURCE holds).
        manifests: the manifest set: fomo_in_flux (shipped) or a folder (`timelit data new` writes one).
        metadata_dir: folder of the release's metadata JSONs (the pipeline's data_lib/00_info); default: SOURCE's
            00_info/, data_lib/00_info/ or SOURCE itself.
        variant: release images to read: the resized 224-pixel copy when present (auto), or force one.
        caption_template: imagefolder caption, '{}' = class name (default: the dataset's prompt template).
        image_root: csv: folder that relative image paths start from (default: the CSV's folder).
        resize: store images with their shorter side shrunk to this many pixels (re-encoded); default: as they are.
        samples_per_shard: images per shard.
        workers: parallel processes, one shard each at a time (default: every CPU core; 0 or 1: in-process).
        overwrite: replace shards prepared earlier from a different source or with other settings.
        skip_bad: leave images that do not decode out (listed in <split>.skipped.tsv and the summary) instead of
            stopping on them.
        decode: decode every image to check it (false: store the bytes unchecked, e.g. for a pool you trust).
        pool_copy: pool: copy a local folder of shards into DATA_ROOT/<NAME>/ with each shard's samples in key order
            and normalised tar headers, so that two downloads of one URL list (members in another order) give
            byte-identical shards and index; default false: index the folder in place, which gives both the same
            samples in the same order, but leaves their tar files (and so the index's offsets) as they are. URL
            sources are always copied this way.
    """

    source: str
    data_root: str
    layout: Layout = "release"
    datasets: list[str] | str | None = None
    splits: list[str] | str | None = None
    manifests: str = "fomo_in_flux"
    metadata_dir: str | None = None
    variant: Variant = "auto"
    caption_template: str | None = None
    image_root: str | None = None
    resize: int | None = None
    samples_per_shard: int = 1000
    workers: int | None = None
    overwrite: bool = False
    skip_bad: bool = False
    decode: bool = True
    pool_copy: bool = False

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1, got {self.samples_per_shard}")
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"resize must be a positive side length, got {self.resize}")
