"""Pretraining pools (`--layout pool`): img2dataset shards indexed where they are, or copied in key order.

    timelit data prepare --layout pool --source ./data/laion400m/shards --datasets [LAION400M] --data_root /data/tl
    timelit data prepare --layout pool --source ./my_pool --datasets [MYPOOL] --data_root /data/tl --pool_copy true

img2dataset writes each shard's members in the order its downloads finished, so two downloads of one URL list hold
the same samples in different orders. Either way of preparing a pool gives both the same samples in the same order
(and a run the same figures); what else is identical depends on the way:

* a local folder of .tar shards is indexed in place (the default: pools can be terabytes). Its tar files are not
  rewritten; the index lists their samples in key order, not in the order of their members, but it stores byte
  offsets, so the two downloads' index files differ, as their tar files do;
* shard URLs or brace patterns readable by webdataset's `gopen` (`https://.../{00000..00139}.tar`, `pipe:...`) are
  always copied, and a local folder is copied with `--pool_copy true`: each shard is written into the data root as
  `train-NNNNNN.tar` with its samples in key order and normalised tar headers (`pool_shards.py`), so the two
  downloads give byte-identical shards and byte-identical index files.
"""

from __future__ import annotations

from pathlib import Path

from timelit.data.manifest import PoolManifest
from timelit.data.prepare.plans import PLAN_FORMAT, SplitPlan, plan_fingerprint
from timelit.data.prepare.records import LayoutError
from timelit.data.prepare.shard_jobs import ShardJob
from timelit.data.shards import shard_name

POOL_SPLIT = "train"
# In the fingerprint of every pool plan: the index lists samples by key (plans._key_order) and copied shards hold
# them in key order. A pool indexed before that is indexed again; one copied before that has other shards, which a
# rerun refuses to mix with sorted ones until --overwrite.
ORDER = "key"


def _is_remote(source: str) -> bool:
    return "{" in source or "://" in source or source.startswith("pipe:")


def _local_shards(pool: PoolManifest, source: str) -> tuple[Path, list[Path]]:
    """The folder `source` and its .tar shards in name order; a user error when there are none."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise LayoutError(f"pool {pool.name}: --source {folder} is neither a folder of .tar shards nor a URL pattern")
    shards = sorted(p for p in folder.glob("*.tar") if p.is_file())
    if not shards:
        raise LayoutError(f"pool {pool.name}: no .tar shards in {folder}")
    return folder, shards


def _copy_plan(pool: PoolManifest, directory: Path, urls: list[str], identity: dict, origin: str) -> SplitPlan:
    """Copy shard k of `urls` in key order to `train-k.tar` of `directory`; `identity` names the source in the
    fingerprint, so that a rerun with another one is refused rather than mixed in."""
    jobs = [
        ShardJob(pool.name, POOL_SPLIT, str(directory), shard_name(POOL_SPLIT, number), url=url)
        for number, url in enumerate(urls)
    ]
    fingerprint = plan_fingerprint({"format": PLAN_FORMAT, "pool": pool.name, "order": ORDER, **identity})
    notes = ["copied in key order"]
    return SplitPlan(pool.name, "pool", POOL_SPLIT, directory, jobs, pool.num_samples, fingerprint, origin, notes)


def _in_place_plan(pool: PoolManifest, directory: Path, folder: Path, shards: list[Path]) -> SplitPlan:
    """Index the shards of `folder` where they lie; the plan owns none of them, so nothing of the user's is removed."""
    same = directory.exists() and directory.resolve() == folder.resolve()
    names = [p.name if same else str(p.resolve()) for p in shards]
    jobs = [ShardJob(pool.name, POOL_SPLIT, str(directory), name) for name in names]
    fingerprint = plan_fingerprint(
        {"format": PLAN_FORMAT, "pool": pool.name, "shards": _shard_stats(shards), "order": ORDER}
    )
    notes = ["indexed in place" if same else f"indexed in place at {folder}"]
    return SplitPlan(
        pool.name, "pool", POOL_SPLIT, directory, jobs, pool.num_samples, fingerprint, str(folder), notes, False
    )


def _shard_stats(shards: list[Path]) -> list[tuple[str, int, int]]:
    """Path, size and mtime of each shard: a folder whose shards changed is a different source."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]


def pool_plan(pool: PoolManifest, source: str, data_root: Path, copy: bool = False) -> SplitPlan:
    """Copy shards named by URLs / brace patterns in key order; index a local folder of shards in place, or with
    `copy` copy it in key order too (byte-identical shards and index for two downloads of one URL list)."""
    directory = data_root / pool.name
    if _is_remote(source):
        from braceexpand import braceexpand

        urls = [url for part in source.split("::") for url in braceexpand(part)]
        return _copy_plan(pool, directory, urls, {"urls": urls}, source)
    folder, shards = _local_shards(pool, source)
    if not copy:
        return _in_place_plan(pool, directory, folder, shards)
    if directory.resolve() == folder.resolve():
        raise LayoutError(
            f"pool {pool.name}: --pool_copy true would copy the shards of {folder} into that folder itself; pass "
            f"another --data_root, or leave --pool_copy false to index them in place"
        )
    paths = [str(p.resolve()) for p in shards]
    # "copied_shards", not the in-place plan's "shards": a switch between the two is another plan, never a resume
    return _copy_plan(pool, directory, paths, {"copied_shards": _shard_stats(shards)}, str(folder))
