"""Pretraining pools (`--layout pool`): img2dataset shards indexed where they are, or copied from URLs first.

    timelit data prepare --layout pool --source ./data/laion400m/shards --datasets [LAION400M] --data_root /data/tl

Local tar files are not rewritten: their samples are indexed in key order, not in the order of their members.
img2dataset writes each shard's members in the order its downloads finished, so two downloads of one URL list differ
in order only, and an index in key order gives both the same samples in the same order (and a run the same figures).
Shard URLs or brace patterns readable by webdataset's `gopen` (`https://.../{00000..00139}.tar`, `pipe:...`) are
copied into local shards first.
"""

from __future__ import annotations

from pathlib import Path

from timelit.data.manifest import PoolManifest
from timelit.data.prepare.plans import PLAN_FORMAT, SplitPlan, plan_fingerprint
from timelit.data.prepare.records import LayoutError
from timelit.data.prepare.shard_jobs import ShardJob
from timelit.data.shards import shard_name

POOL_SPLIT = "train"


def _is_remote(source: str) -> bool:
    return "{" in source or "://" in source or source.startswith("pipe:")


def pool_plan(pool: PoolManifest, source: str, data_root: Path) -> SplitPlan:
    """Index local img2dataset shards where they are, or copy shards named by URLs / brace patterns first."""
    directory = data_root / pool.name
    if _is_remote(source):
        from braceexpand import braceexpand

        urls = [url for part in source.split("::") for url in braceexpand(part)]
        jobs = [
            ShardJob(pool.name, POOL_SPLIT, str(directory), shard_name(POOL_SPLIT, number), url=url)
            for number, url in enumerate(urls)
        ]
        fingerprint = plan_fingerprint({"format": PLAN_FORMAT, "pool": pool.name, "urls": urls})
        return SplitPlan(
            pool.name, "pool", POOL_SPLIT, directory, jobs, pool.num_samples, fingerprint, source, ["copied"]
        )
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise LayoutError(f"pool {pool.name}: --source {folder} is neither a folder of .tar shards nor a URL pattern")
    shards = sorted(p for p in folder.glob("*.tar") if p.is_file())
    if not shards:
        raise LayoutError(f"pool {pool.name}: no .tar shards in {folder}")
    same = directory.exists() and directory.resolve() == folder.resolve()
    names = [p.name if same else str(p.resolve()) for p in shards]
    jobs = [ShardJob(pool.name, POOL_SPLIT, str(directory), name) for name in names]
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    # "order": the index lists samples by key (see plans._finish); an index made before that is remade.
    fingerprint = plan_fingerprint({"format": PLAN_FORMAT, "pool": pool.name, "shards": stats, "order": "key"})
    notes = ["indexed in place" if same else f"indexed in place at {folder}"]
    return SplitPlan(
        pool.name, "pool", POOL_SPLIT, directory, jobs, pool.num_samples, fingerprint, str(folder), notes, False
    )
