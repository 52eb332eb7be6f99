"""Samples per second and memory of timelit's training data pipeline, against what the model consumes.

    python bench/data_pipeline.py                      # quickstart (32 px), 10x shards, 224-px JPEGs (~15 min)
    python bench/data_pipeline.py --quick --data-root /tmp/bench

What is measured. `TimeDataModule.task_batches(task)` through `TaskLoader` with timelit's loader settings
(`loader_kwargs`): read each sample by the shard index, decode, the model's train transform, the batch mixture
(current task / replay / pretraining pool), tokenise and collate. Each configuration runs in a fresh subprocess that
reports samples per second (after the first batch, which includes starting the workers) and the peak memory of the
process tree: the sum of PSS over the main process and its workers, sampled every 0.1 s (pages the workers share with
the parent after fork are counted once). The configurations alternate and repeat; the table gives medians.

1. Throughput with 0, 1, 2, 4 workers on the quickstart, against the samples per second the quickstart's model
   consumes (plain training steps, the same torch threads), and side by side with timelit's pipeline as it was
   before its two fixes, monkeypatched back in by `_fit.BeforeFixes`: `torch.manual_seed` for every sample's
   augmentation seed (now `timelit.training.seeding.seed_torch_cpu`), and tarfile opening every sample in
   ShardIndex.read (now `timelit.data.tar_members`); also with only the tar fix undone, to split the gain between the
   two.
2. Memory as shards and tasks grow: a copy of the quickstart with every split written 10 times (10x samples and
   shards, by ShardWriter), streams cut into 4 and 40 tasks; the last task replays all earlier ones. A second
   check iterates every task of the 40 in one process and records memory after each.
3. ViT-B/16's input: a copy of the quickstart's training data re-encoded as 224-px JPEGs (upsampled, with noise so
   that files are the size of real 224-px photos), read with ViT-B-16's transforms and tokenizer: the per-sample CPU
   cost, and from it the workers one GPU needs at a ViT-B/16 training rate (measured by bench/gpu_throughput.py
   where a GPU was available, else an estimate from an assumed MFU, labelled so).

4. Side by side (issue 17): a naive loop (tarfile + PIL + open_clip's train transform + tokenizer), timelit's
   pipeline as the shipped configs run it (`data.images: host`) and with `data.images: device` (the worker half;
   the device half timed apart), over the same 320x240 JPEGs, one process, one core, rounds alternated; ms per
   sample, the ratio to the naive loop, the workers one GPU needs at 3,000-6,000 samples/s, the readers (timelit's
   index, webdataset.WebDataset, tarfile) and the naive loop's stages.

Prints tables and writes bench/results/data_pipeline.json (`--sections` runs a subset and writes
data_pipeline_<sections>.json).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    QUICKSTART,
    SYNTH_POOL,
    TreeMemory,
    benchmark_args,
    machine,
    median,
    peak_rss_mb,
    synthetic_data,
    table,
    write_report,
)

H100_BF16_DENSE_TFLOPS = 989.4  # H100 SXM5, dense bf16 tensor-core peak (NVIDIA datasheet; 1,979 is with sparsity)


# --------------------------------------------------------------------------- one measurement, in a subprocess


SECTIONS = ("throughput", "memory", "hires", "side_by_side")
BEFORE = "before fixes (torch.manual_seed, tarfile)"
BEFORE_TAR = "before the tar fix (tarfile)"


def _workers(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def _before_fixes(undone: list[str]) -> Any:
    """`_fit.BeforeFixes` for the fixes named in `undone` ("seeding", "tar"); the pipeline logs nothing."""
    from _fit import BeforeFixes

    return BeforeFixes(seeding="seeding" in undone, logging=False, tar="tar" in undone)


def _data(spec: dict[str, Any], steps_per_task: int) -> Any:
    """The data module a measurement reads: `spec`'s benchmark, tasks, batch and workers, no evaluation."""
    from timelit.training.clip import build_clip

    bundle = build_clip(spec["model"], device="meta")  # transforms and tokenizer only; no weights are allocated
    return synthetic_data(
        spec["root"],
        bundle,
        num_tasks=spec["tasks"],
        batch_size=spec["batch"],
        steps_per_task=steps_per_task,
        eval_datasets=[],
        num_workers=spec["workers"],
    )


def measure_loader(spec: dict[str, Any]) -> dict[str, Any]:
    """Iterate `batches` batches of task `task` (after a first one); samples/s and peak memory of the tree."""
    import torch

    torch.set_num_threads(spec["threads"])
    with _before_fixes(spec["before"]):
        return _iterate(spec)


def _iterate(spec: dict[str, Any]) -> dict[str, Any]:
    from timelit.data.loaders import TaskLoader, loader_kwargs

    data = _data(spec, steps_per_task=spec["batches"] + 1)
    task = spec["task"] if spec["task"] >= 0 else spec["tasks"] + spec["task"]
    with TreeMemory() as memory:
        loader = TaskLoader(data.task_batches(task), **loader_kwargs(spec["workers"]))
        began = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        first = time.perf_counter()
        count = sum(1 for _ in iterator)
        done = time.perf_counter()
    return {
        "samples_per_s": count * spec["batch"] / (done - first),
        "first_batch_s": first - began,
        "peak_tree_pss_mb": memory.peak_mb,
        "main_peak_rss_mb": peak_rss_mb(),
        "load": os.getloadavg()[0],
    }


def measure_tasks(spec: dict[str, Any]) -> dict[str, Any]:
    """Every task in turn (a new loader per task, as Lightning reloads it), memory of the tree after each."""
    import torch

    from timelit.data.loaders import TaskLoader, loader_kwargs

    torch.set_num_threads(spec["threads"])
    data = _data(spec, steps_per_task=spec["batches"])
    after = []
    with TreeMemory() as memory:
        for task in range(spec["tasks"]):
            peak_before = memory.peak_mb
            memory.peak_mb = 0.0
            for _ in TaskLoader(data.task_batches(task), **loader_kwargs(spec["workers"])):
                pass
            after.append(round(max(memory.peak_mb, memory.sample()), 1))
            memory.peak_mb = max(memory.peak_mb, peak_before)
    return {"peak_tree_pss_mb_per_task": after, "main_peak_rss_mb": peak_rss_mb(), "load": os.getloadavg()[0]}


def measure_model(spec: dict[str, Any]) -> dict[str, Any]:
    """Samples per second the model trains on (plain steps on random inputs of its shape), same torch threads."""
    import torch
    from _fit import PlainLoop, PlainRecipe

    torch.set_num_threads(spec["threads"])
    loop = PlainLoop(PlainRecipe(spec["model"], steps_per_task=1000))
    size = loop.model.visual.image_size
    size = size if isinstance(size, int) else size[0]
    batch = {
        "image": torch.randn(spec["batch"], 3, size, size),
        "text": torch.randint(0, 49408, (spec["batch"], loop.model.context_length)),
    }
    loop.step(batch)
    times = []
    for _ in range(spec["steps"]):
        began = time.perf_counter()
        loop.step(batch)
        times.append(time.perf_counter() - began)
    return {"samples_per_s": spec["batch"] / median(times), "step_s": median(times), "load": os.getloadavg()[0]}


def check_tar(spec: dict[str, Any]) -> dict[str, Any]:
    """ShardIndex.read returns exactly what it returned through tarfile before the fix (every sample of the pool's
    first shard)."""
    from timelit.data.shards import ShardIndex

    index = ShardIndex.load(Path(spec["root"]) / SYNTH_POOL, "train")
    positions = [int(p) for p in (index.shard == 0).nonzero()[0]]
    now = [index.read(p) for p in positions]
    with _before_fixes(["tar"]):
        before = [index.read(p) for p in positions]
    return {"identical": now == before, "samples_compared": len(positions)}


def run_worker(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (clean memory, no warm state carried over); in this process with
    --quick (fast; memory figures then include everything the process has loaded)."""
    if args.quick:
        return WORKERS[spec["kind"]](spec)
    command = [sys.executable, __file__, "--worker-spec", json.dumps(spec)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"measurement {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- side by side: naive, today, new


TODAY = "timelit today (data.images=host, PIL + open_clip transforms)"
NEW = "timelit new (data.images=device, worker half)"
NAIVE = "naive loop (tarfile + PIL + open_clip transform + tokenizer)"


def photo_shard(target: Path, count: int, width: int, height: int, seed: int = 0) -> dict[str, Any]:
    """`count` photograph-like JPEGs (smooth regions, edges, sensor noise; quality 90) with a distinct caption
    each, in one webdataset shard with timelit's index."""
    import numpy as np
    from PIL import Image

    from timelit.data.shards import ShardWriter, sample_key

    rng = np.random.default_rng(seed)
    sizes = []
    with ShardWriter(target / "PHOTOS", "train", samples_per_shard=count) as writer:
        for i in range(count):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
            pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 8.0, (height, width, 3))
            buffer = io.BytesIO()
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
            sizes.append(buffer.tell())
            caption = f"a photo of object {i}, a kind of thing number {i % 37} seen from the side"
            writer.add(sample_key("PHOTOS", "train", i), buffer.getvalue(), "jpg", caption, {"label": i % 10})
    return {"directory": str(target / "PHOTOS"), "mean_jpeg_bytes": float(np.mean(sizes))}


def _task_batches(index: Any, bundle: Any, batch: int, device: bool, tokenizer: Any) -> Any:
    """timelit's TaskBatches over every sample of `index` once (one source, one pass of its seeded order)."""
    import numpy as np

    from timelit.data.device_images import DeviceTransform, collate_regions, decode_pixels
    from timelit.data.loaders import SampleReader, SourcePart, TaskBatches, encode
    from timelit.data.mixture import SourceSequence

    sequence = SourceSequence(encode(0, np.arange(len(index))), 0, 0, "current")
    parts = [SourcePart("current", sequence, 0, batch, 0, batch)]
    steps = len(index) // batch
    if not device:
        reader = SampleReader([index], "raise")
        return TaskBatches(0, steps, parts, reader, bundle.train_transform, tokenizer, 0)
    transform = DeviceTransform.from_transforms(bundle.train_transform, bundle.eval_transform)
    reader = SampleReader([index], "raise", decode_pixels)
    return TaskBatches(0, steps, parts, reader, transform.train_region, tokenizer, 0, collate_regions)


def _naive(shard: Path, bundle: Any, batch: int) -> int:
    """What a user writes first: tarfile over the shard, PIL, open_clip's preprocess per image, its tokenizer per
    batch (no index, no seeding, no mixture)."""
    import tarfile

    import torch
    from PIL import Image

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    images, captions, done = [], [], 0
    for members in samples.values():
        images.append(bundle.train_transform(Image.open(io.BytesIO(members["jpg"])).convert("RGB")))
        captions.append(members["txt"].decode())
        if len(images) == batch:
            torch.stack(images), bundle.tokenizer(captions)
            done += len(images)
            images, captions = [], []
    return done


def measure_side_by_side(spec: dict[str, Any]) -> dict[str, Any]:
    """One process, one core, no workers: the three pipelines over the same samples, alternated in rounds; the
    device half of the new pipeline timed on this CPU; readers compared; stage costs of the naive loop."""
    import torch
    import torchvision.transforms.functional as tvf
    import webdataset as wds
    from PIL import Image

    from timelit.data.device_images import CachedTokenizer, DeviceTransform, decode_pixels
    from timelit.data.shards import ShardIndex
    from timelit.training.clip import build_clip

    torch.set_num_threads(1)
    bundle = build_clip(spec["model"], device="meta")
    directory = Path(spec["directory"])
    index = ShardIndex.load(directory, "train")
    shard = directory / index.shards[0]
    batch, count = spec["batch"], len(index) // spec["batch"] * spec["batch"]

    def today() -> int:
        batches = _task_batches(index, bundle, batch, False, bundle.tokenizer)
        return sum(len(batches.batch(b)["keys"]) for b in range(batches.steps))

    def new() -> int:  # a fresh token cache every round: each caption is new to it, as in a worker's first pass
        batches = _task_batches(index, bundle, batch, True, CachedTokenizer(bundle.tokenizer))
        return sum(len(batches.batch(b)["keys"]) for b in range(batches.steps))

    pipelines = {NAIVE: lambda: _naive(shard, bundle, batch), TODAY: today, NEW: new}
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for round_ in range(spec["rounds"] + 1):  # round 0 warms caches and lazy imports up, and is not counted
        order = list(pipelines) if round_ % 2 == 0 else list(reversed(pipelines))
        for name in order:
            began = time.perf_counter()
            done = pipelines[name]()
            if round_:
                times[name].append((time.perf_counter() - began) * 1e3 / done)
    # The device half, here on the CPU (a GPU does it in on_after_batch_transfer): the new batches' resample.
    transform = DeviceTransform.from_transforms(bundle.train_transform, bundle.eval_transform)
    new_batches = _task_batches(index, bundle, batch, True, bundle.tokenizer)
    raw = [new_batches.batch(b) for b in range(new_batches.steps)]
    began = time.perf_counter()
    resampled = [transform.resample(b["image"], b["image_geometry"]) for b in raw]
    resample_ms = (time.perf_counter() - began) * 1e3 / count
    host = _task_batches(index, bundle, batch, False, bundle.tokenizer).batch(0)["image"]
    std = torch.tensor(transform.std).view(1, 3, 1, 1)
    difference = (resampled[0] - host) * std * 255
    shipped = sum(b["image"].numel() for b in raw) / count
    # Readers: raw members of every sample, no decoding.
    positions = range(len(index))
    readers = {
        "timelit ShardIndex.read (one pread per sample)": lambda: [index.read(p) for p in positions],
        "webdataset.WebDataset (sequential tar stream)": lambda: list(wds.WebDataset(str(shard), shardshuffle=False)),
        "tarfile (the naive loop's reader)": lambda: _naive_read(shard),
    }
    reader_ms = {name: [] for name in readers}
    for _ in range(spec["rounds"]):
        for name, read in readers.items():
            began = time.perf_counter()
            read()
            reader_ms[name].append((time.perf_counter() - began) * 1e3 / len(index))
    # Stages of the naive loop and of the new worker half, each over every sample.
    jpegs = [index.read(p)["jpg"] for p in positions]
    captions = [index.read(p)["txt"].decode() for p in positions]
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs]
    crop = bundle.train_transform.transforms[0]
    cropped = [crop(im) for im in pil]
    tensors = [tvf.to_tensor(im) for im in cropped]
    normalize = bundle.train_transform.transforms[-1]
    stages = {
        "PIL decode + RGB": lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs],
        "torchvision decode_jpeg (new)": lambda: [decode_pixels(b) for b in jpegs],
        "RandomResizedCrop, PIL bicubic": lambda: [crop(im) for im in pil],
        "ToTensor": lambda: [tvf.to_tensor(im) for im in cropped],
        "Normalize": lambda: [normalize(t) for t in tensors],
        "tokenizer, per batch": lambda: [bundle.tokenizer(captions[i : i + batch]) for i in range(0, count, batch)],
    }
    stage_ms = {}
    for name, stage in stages.items():
        runs = []
        for _ in range(spec["rounds"]):
            began = time.perf_counter()
            stage()
            runs.append((time.perf_counter() - began) * 1e3 / len(jpegs))
        stage_ms[name] = median(runs)
    return {
        "ms_per_sample": {name: median(values) for name, values in times.items()},
        "runs_ms_per_sample": times,
        "device_half_on_this_cpu_ms_per_sample": resample_ms,
        "device_half_gflops_per_sample": _resample_gflops(raw, transform),
        "bytes_to_device_per_sample": {TODAY: 4 * 3 * transform.size[0] * transform.size[1], NEW: shipped},
        "new_vs_today_first_batch_levels": {
            "mean_abs": float(difference.abs().mean()),
            "signed_mean": float(difference.mean()),
            "max_abs": float(difference.abs().max()),
        },
        "reader_ms_per_sample": {name: median(values) for name, values in reader_ms.items()},
        "stage_ms_per_sample": stage_ms,
        "samples": count,
        "load": os.getloadavg()[0],
    }


def _naive_read(shard: Path) -> list[bytes]:
    import tarfile

    with tarfile.open(shard) as tar:
        return [tar.extractfile(member).read() for member in tar]


def _resample_gflops(raw: list[dict[str, Any]], transform: Any) -> float:
    """GFLOP per sample of the device half: its matrices span each batch's padded crops."""
    from timelit.data.device_images import gflops_per_sample

    padded = [(b["image"].shape[1], b["image"].shape[2]) for b in raw for _ in b["image_geometry"]]
    return median(gflops_per_sample(p, transform.size) for p in padded)


def side_by_side(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    print(f"writing {args.photos} {args.photo_width}x{args.photo_height} JPEGs ...", flush=True)
    shard = photo_shard(tmp / "photos", args.photos, args.photo_width, args.photo_height)
    spec = {
        "kind": "side_by_side",
        "directory": shard["directory"],
        "model": args.hires_model,
        "batch": args.photo_batch,
        "rounds": args.rounds,
    }
    result = run_worker(spec, args) | {"mean_jpeg_bytes": shard["mean_jpeg_bytes"], "model": args.hires_model}
    ms = result["ms_per_sample"]
    result["ratio_to_naive"] = {name: value / ms[NAIVE] for name, value in ms.items()}
    result["workers_per_gpu"] = {
        name: {rate: math.ceil(rate * value / 1e3) for rate in args.gpu_rates} for name, value in ms.items()
    }
    return result


def render_side_by_side(s: dict[str, Any]) -> str:
    naive = s["ms_per_sample"][NAIVE]
    rates = list(next(iter(s["workers_per_gpu"].values())))
    rows = [
        [name, f"{value:.2f}", f"{value / naive:.2f}x", *(s["workers_per_gpu"][name][r] for r in rates)]
        for name, value in s["ms_per_sample"].items()
    ]
    head = (
        f"\nside by side, one core, no workers: {s['samples']} JPEGs of {s['mean_jpeg_bytes'] / 1e3:.1f} kB, "
        f"{s['model']} train input"
    )
    lines = table(["pipeline", "ms/sample", "x naive", *(f"workers/GPU at {r:,} samples/s" for r in rates)], rows)
    diff = s["new_vs_today_first_batch_levels"]
    readers = "; ".join(f"{k}: {v:.3f}" for k, v in s["reader_ms_per_sample"].items())
    stages = "; ".join(f"{k}: {v:.3f}" for k, v in s["stage_ms_per_sample"].items())
    bytes_ = s["bytes_to_device_per_sample"]
    return (
        f"{head}\n{lines}\n"
        f"device half (resize + normalise) on this CPU: {s['device_half_on_this_cpu_ms_per_sample']:.3f} ms/sample, "
        f"{s['device_half_gflops_per_sample']:.3f} GFLOP/sample on a GPU\n"
        f"bytes to the device per sample: today {bytes_[TODAY]:,.0f}, new {bytes_[NEW]:,.0f}\n"
        f"new vs today pixels (levels of 255, first batch): mean |d| {diff['mean_abs']:.3f}, "
        f"signed mean {diff['signed_mean']:+.4f}, max {diff['max_abs']:.1f}\n"
        f"readers, ms/sample: {readers}\nstages, ms/sample: {stages}"
    )


WORKERS = {
    "loader": measure_loader,
    "tasks": measure_tasks,
    "model": measure_model,
    "check": check_tar,
    "side_by_side": measure_side_by_side,
}


# --------------------------------------------------------------------------- benchmark copies


def replicate(source: Path, target: Path, copies: int) -> Path:
    """The benchmark with every split written `copies` times (new keys, same labels), same samples per shard."""
    import yaml

    from timelit.data.shards import ShardIndex, ShardWriter, sample_key

    if (target / "READY.copy").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    for folder in ("classnames", "streams", "pools", "datasets"):
        shutil.copytree(source / folder, target / folder)
    for manifest in [*sorted((target / "datasets").glob("*.yaml")), target / "pools" / f"{SYNTH_POOL}.yaml"]:
        spec = yaml.safe_load(manifest.read_text())
        name = spec["name"]
        splits = spec.get("splits", {"train": {}}) if manifest.parent.name == "datasets" else {"train": {}}
        for split in [s for s in splits if s == "train"]:  # the loaders under test read training splits only
            index = ShardIndex.load(source / name, split)
            per_shard = 1000 if name == SYNTH_POOL else 500
            with ShardWriter(target / name, split, samples_per_shard=per_shard) as writer:
                number = 0
                for _ in range(copies):
                    for position in range(len(index)):
                        raw = index.read(position)
                        meta = json.loads(raw["json"])
                        if "label" in meta and "classname" not in meta:  # retrieval: every image its own class
                            meta["label"] = number
                        image_ext = next(e for e in ("png", "jpg") if e in raw)
                        writer.add(
                            sample_key(name, split, number), raw[image_ext], image_ext, raw["txt"].decode(), meta
                        )
                        number += 1
            if manifest.parent.name == "datasets":
                spec["splits"][split]["num_samples"] = number
            else:
                spec["num_samples"] = number
        manifest.write_text(yaml.safe_dump(spec, sort_keys=False))
    (target / "READY.copy").write_text(json.dumps({"source": str(source), "copies": copies}))
    return target


def hires_copy(source: Path, target: Path, size: int, per_split: int, pool: int, seed: int = 0) -> Path:
    """The training splits and pool re-encoded as `size`-px JPEGs (quality 90), the first `per_split` samples of
    each dataset (every class is among them: synth writes classes round-robin) and `pool` of the pool."""
    import numpy as np
    import yaml
    from PIL import Image

    from timelit.data.shards import ShardIndex, ShardWriter, sample_key

    if (target / "READY.copy").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    for folder in ("classnames", "streams", "pools", "datasets"):
        shutil.copytree(source / folder, target / folder)
    rng = np.random.default_rng(seed)
    sizes = []
    for manifest in [*sorted((target / "datasets").glob("*.yaml")), target / "pools" / f"{SYNTH_POOL}.yaml"]:
        spec = yaml.safe_load(manifest.read_text())
        name = spec["name"]
        is_pool = manifest.parent.name == "pools"
        if not is_pool and "train" not in spec["splits"]:
            continue
        index = ShardIndex.load(source / name, "train")
        count = min(len(index), pool if is_pool else per_split)
        with ShardWriter(target / name, "train", samples_per_shard=1000) as writer:
            for position in range(count):
                raw = index.read(position)
                image = Image.open(io.BytesIO(raw.get("png") or raw["jpg"])).convert("RGB")
                pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
                pixels += rng.normal(0.0, 8.0, pixels.shape)  # sensor-like noise: files of a real photo's size
                buffer = io.BytesIO()
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
                sizes.append(buffer.tell())
                meta = json.loads(raw["json"])
                writer.add(sample_key(name, "train", position), buffer.getvalue(), "jpg", raw["txt"].decode(), meta)
        if is_pool:
            spec["num_samples"] = count
        else:
            spec["splits"]["train"]["num_samples"] = count  # the test split stays listed, unread (no evaluation)
        manifest.write_text(yaml.safe_dump(spec, sort_keys=False))
    (target / "READY.copy").write_text(
        json.dumps({"source": str(source), "size": size, "mean_bytes": float(np.mean(sizes))})
    )
    return target


# --------------------------------------------------------------------------- the benchmark


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.worker_spec:
        spec = json.loads(args.worker_spec)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return {}
    from train_overhead import ensure_data

    root = ensure_data(Path(args.data_root), args.quick)
    model = json.loads((root / "READY.json").read_text()).get("base_model", "timelit-tiny-ViT")
    tmp = Path(tempfile.mkdtemp(prefix="data_pipeline_", dir=args.tmp))
    report: dict[str, Any] = {"machine": machine(), "settings": vars(args) | {"model": model}}
    try:
        if "throughput" in args.sections:
            report["throughput"] = throughput(args, root, model)
            print(render_throughput(report["throughput"]), flush=True)
        if "memory" in args.sections:
            report["memory"] = memory_scaling(args, root, model, tmp)
            print(render_memory(report["memory"]), flush=True)
        if "hires" in args.sections:
            report["hires"] = hires(args, root, tmp)
            print(render_hires(report["hires"]), flush=True)
        if "side_by_side" in args.sections:
            report["side_by_side"] = side_by_side(args, tmp)
            print(render_side_by_side(report["side_by_side"]), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    every = len(args.sections) == len(SECTIONS)
    name = "data_pipeline" if every else "data_pipeline_" + "_".join(args.sections)
    path = write_report(name, report, Path(args.out))
    print(f"\nwrote {path}")
    return report


def _loader_spec(args: argparse.Namespace, root: Path, model: str, **overrides: Any) -> dict[str, Any]:
    spec = {
        "kind": "loader",
        "root": str(root),
        "model": model,
        "batch": args.batch_size,
        "tasks": 4,
        "task": 1,
        "batches": args.batches,
        "workers": 0,
        "before": [],
        "threads": args.threads,
    }
    return spec | overrides


def throughput(args: argparse.Namespace, root: Path, model: str) -> dict[str, Any]:
    configs = {_workers(w): {"workers": w} for w in args.workers}
    configs |= {
        f"0 workers, {BEFORE}": {"workers": 0, "before": ["seeding", "tar"]},
        f"0 workers, {BEFORE_TAR}": {"workers": 0, "before": ["tar"]},
        f"{_workers(args.fix_workers)}, {BEFORE}": {"workers": args.fix_workers, "before": ["seeding", "tar"]},
    }
    if args.quick:
        configs = {name: c for name, c in configs.items() if name in ("0 workers", "1 worker", f"0 workers, {BEFORE}")}
    check = run_worker({"kind": "check", "root": str(root)}, args)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in [*configs, "model"]}
    for repeat in range(args.repeats):
        print(f"throughput, repeat {repeat + 1}/{args.repeats}", flush=True)
        runs["model"].append(
            run_worker(
                {
                    "kind": "model",
                    "model": model,
                    "batch": args.batch_size,
                    "steps": args.model_steps,
                    "threads": args.threads,
                },
                args,
            )
        )
        for name, overrides in configs.items():
            runs[name].append(run_worker(_loader_spec(args, root, model, **overrides), args))
    model_rate = median(r["samples_per_s"] for r in runs["model"])
    rows = []
    for name in configs:
        rate = median(r["samples_per_s"] for r in runs[name])
        rows.append(
            {
                "pipeline": name,
                "samples_per_s": rate,
                "ms_per_sample": 1e3 / rate,
                "vs_model": rate / model_rate,
                "first_batch_s": median(r["first_batch_s"] for r in runs[name]),
                "peak_tree_pss_mb": median(r["peak_tree_pss_mb"] for r in runs[name]),
                "load": median(r["load"] for r in runs[name]),
            }
        )
    return {
        "model": model,
        "batch": args.batch_size,
        "model_samples_per_s": model_rate,
        "model_step_s": median(r["step_s"] for r in runs["model"]),
        "rows": rows,
        "runs": runs,
        "tar_check": check,
        "before_vs_now": before_vs_now(rows),
    }


def memory_scaling(args: argparse.Namespace, root: Path, model: str, tmp: Path) -> dict[str, Any]:
    print(f"writing a {args.copies}x copy of the benchmark ...", flush=True)
    began = time.perf_counter()
    big = replicate(root, tmp / f"x{args.copies}", args.copies)
    copy_s = time.perf_counter() - began
    shards = {r: sum(1 for _ in Path(r).glob("*/train-*.tar")) for r in (root, big)}
    rows = []
    for repeat in range(args.repeats):
        print(f"memory, repeat {repeat + 1}/{args.repeats}", flush=True)
        for label, data in (("1x", root), (f"{args.copies}x", big)):
            for tasks in args.task_counts:
                spec = _loader_spec(args, data, model, tasks=tasks, task=-1, workers=args.mem_workers)
                result = run_worker(spec, args)
                rows.append({"shards": f"{label} ({shards[data]} training shards)", "tasks": tasks, **result})
    pooled = []
    for key in dict.fromkeys((r["shards"], r["tasks"]) for r in rows):
        same = [r for r in rows if (r["shards"], r["tasks"]) == key]
        pooled.append(
            {
                "shards": key[0],
                "tasks": key[1],
                "workers": args.mem_workers,
                "peak_tree_pss_mb": median(r["peak_tree_pss_mb"] for r in same),
                "main_peak_rss_mb": median(r["main_peak_rss_mb"] for r in same),
                "samples_per_s": median(r["samples_per_s"] for r in same),
            }
        )
    sweep = run_worker(
        {
            "kind": "tasks",
            "root": str(big),
            "model": model,
            "batch": args.batch_size,
            "tasks": max(args.task_counts),
            "batches": args.sweep_batches,
            "workers": args.mem_workers,
            "threads": args.threads,
        },
        args,
    )
    return {"copy_seconds": copy_s, "rows": pooled, "runs": rows, "task_sweep": sweep}


def hires(args: argparse.Namespace, root: Path, tmp: Path) -> dict[str, Any]:
    from timelit.training.flops import measure_step

    print(f"writing {args.hires_size}-px JPEG copies ...", flush=True)
    data = hires_copy(root, tmp / f"jpeg{args.hires_size}", args.hires_size, args.hires_per_split, args.hires_pool)
    mean_bytes = json.loads((data / "READY.copy").read_text())["mean_bytes"]
    configs = {
        "1 worker": {"workers": 1, "before": []},
        f"1 worker, {BEFORE}": {"workers": 1, "before": ["seeding", "tar"]},
        _workers(args.fix_workers): {"workers": args.fix_workers, "before": []},
    }
    if args.quick:
        configs = {"1 worker": configs["1 worker"]}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for repeat in range(args.repeats):
        print(f"{args.hires_size} px, repeat {repeat + 1}/{args.repeats}", flush=True)
        for name, overrides in configs.items():
            spec = _loader_spec(
                args, data, args.hires_model, batch=args.hires_batch, batches=args.hires_batches, **overrides
            )
            runs[name].append(run_worker(spec, args))
    rows = [
        {
            "pipeline": name,
            "samples_per_s": median(r["samples_per_s"] for r in runs[name]),
            "peak_tree_pss_mb": median(r["peak_tree_pss_mb"] for r in runs[name]),
            "load": median(r["load"] for r in runs[name]),
        }
        for name in configs
    ]
    for row in rows:
        row["ms_per_sample_per_worker"] = 1e3 * configs[row["pipeline"]]["workers"] / row["samples_per_s"]
    gflops_per_sample = measure_step(args.hires_model, 512).gflops_per_sample
    gpu = gpu_rate(args, gflops_per_sample)
    per_worker = {row["pipeline"]: row["samples_per_s"] / configs[row["pipeline"]]["workers"] for row in rows}
    workers_needed = {name: math.ceil(gpu["samples_per_s"] / rate) for name, rate in per_worker.items()}
    return {
        "model": args.hires_model,
        "image_px": args.hires_size,
        "mean_jpeg_bytes": mean_bytes,
        "batch": args.hires_batch,
        "rows": rows,
        "runs": runs,
        "gflops_per_sample": gflops_per_sample,
        "gpu": gpu,
        "per_worker_samples_per_s": per_worker,
        "workers_needed": workers_needed,
        "before_vs_now": before_vs_now(rows),
    }


def gpu_rate(args: argparse.Namespace, gflops_per_sample: float) -> dict[str, Any]:
    """ViT-B/16 training samples/s on one GPU: measured by gpu_throughput.py if its JSON exists, else estimated."""
    measured = Path(args.out) / "gpu_throughput.json"
    if measured.exists():
        report = json.loads(measured.read_text())
        best = report.get("best")
        if best and best.get("model") == args.hires_model and report.get("device", {}).get("cuda"):
            return {
                "samples_per_s": best["samples_per_s"],
                "source": f"measured: {measured}",
                "device": report["device"]["cuda"],
            }
    rate = args.assumed_mfu * H100_BF16_DENSE_TFLOPS * 1e3 / gflops_per_sample
    return {
        "samples_per_s": rate,
        "source": f"ESTIMATE: H100 SXM bf16 dense peak {H100_BF16_DENSE_TFLOPS} TFLOPS x assumed MFU "
        f"{args.assumed_mfu:.0%} / {gflops_per_sample:.2f} GFLOPs per sample (not measured: no GPU in this session)",
        "device": "H100 SXM (assumed)",
    }


def before_vs_now(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples/s now over samples/s with the fixes undone, for every row that has a "before" twin."""
    rates = {row["pipeline"]: row["samples_per_s"] for row in rows}
    out = []
    for name, rate in rates.items():
        for suffix in (BEFORE, BEFORE_TAR):
            twin = f"{name}, {suffix}"
            if twin in rates:
                out.append(
                    {
                        "pipeline": name,
                        "undone": suffix,
                        "before": rates[twin],
                        "now": rate,
                        "now_over_before": rate / rates[twin],
                    }
                )
    return out


def render_versus(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    return "\nbefore the fixes vs now\n" + table(
        ["pipeline", "fixes undone", "samples/s before", "samples/s now", "now / before"],
        [list(r.values()) for r in rows],
    )


# --------------------------------------------------------------------------- output


def render_throughput(t: dict[str, Any]) -> str:
    head = (
        f"\nquickstart pipeline ({t['model']} transforms, batch {t['batch']}); the model trains on "
        f"{t['model_samples_per_s']:,.0f} samples/s ({t['model_step_s'] * 1e3:.0f} ms per step); "
        f"ShardIndex.read's output identical to tarfile's: {t['tar_check']['identical']}"
    )
    return (
        head
        + "\n"
        + table(
            ["pipeline", "samples/s", "ms/sample", "x model's rate", "first batch s", "peak PSS MB", "load"],
            [list(r.values()) for r in t["rows"]],
        )
        + render_versus(t["before_vs_now"])
    )


def render_memory(m: dict[str, Any]) -> str:
    sweep = m["task_sweep"]["peak_tree_pss_mb_per_task"]
    return (
        "\nmemory as shards and tasks grow (last task of the stream, replaying every earlier one)\n"
        + table(
            ["shards", "tasks", "workers", "peak PSS MB (tree)", "main peak RSS MB", "samples/s"],
            [list(r.values()) for r in m["rows"]],
        )
        + f"\nevery task of {len(sweep)} in one process, peak PSS per task (MB): first {sweep[:3]}, "
        f"last {sweep[-3:]}, max {max(sweep)}"
    )


def render_hires(h: dict[str, Any]) -> str:
    head = (
        f"\n{h['image_px']}-px JPEGs (mean {h['mean_jpeg_bytes'] / 1e3:.1f} kB) with {h['model']}'s transforms, "
        f"batch {h['batch']}"
    )
    lines = table(
        ["pipeline", "samples/s", "peak PSS MB", "load", "ms per sample per worker"],
        [list(r.values()) for r in h["rows"]],
    )
    gpu = h["gpu"]
    need = "; ".join(f"{name}: {n} workers" for name, n in h["workers_needed"].items())
    return (
        f"{head}\n{lines}\nGPU rate {gpu['samples_per_s']:,.0f} samples/s ({gpu['source']}).\n"
        f"Workers (CPU cores) one GPU needs at that rate, per-worker rate as measured here: {need}"
        + render_versus(h["before_vs_now"])
    )


QUICK = {  # tiny sizes: every section in seconds
    "batch_size": 16,
    "batches": 2,
    "workers": [0, 1],
    "repeats": 1,
    "model_steps": 2,
    "fix_workers": 1,
    "mem_workers": 0,
    "copies": 2,
    "task_counts": [2],
    "sweep_batches": 1,
    "hires_size": 64,
    "hires_model": "timelit-micro-ViT",
    "hires_batch": 16,
    "hires_batches": 2,
    "hires_per_split": 40,
    "hires_pool": 64,
    "photos": 32,
    "photo_width": 96,
    "photo_height": 72,
    "photo_batch": 16,
    "rounds": 1,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=QUICKSTART, help="a quickstart benchmark")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per measurement (after the first)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--fix-workers", type=int, default=2, help="workers of the extra rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--model-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--task-counts", type=int, nargs="+", default=[4, 40])
    parser.add_argument("--mem-workers", type=int, default=2)
    parser.add_argument("--sweep-batches", type=int, default=2, help="batches per task in the every-task check")
    parser.add_argument("--hires-size", type=int, default=224)
    parser.add_argument("--hires-model", default="ViT-B-16")
    parser.add_argument("--hires-batch", type=int, default=128)
    parser.add_argument("--hires-batches", type=int, default=6)
    parser.add_argument("--hires-per-split", type=int, default=300)
    parser.add_argument("--hires-pool", type=int, default=2000)
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="which measurements to run; "
        "a subset writes data_pipeline_<sections>.json, so data_pipeline.json always holds a full run",
    )
    parser.add_argument("--photos", type=int, default=512, help="side by side: JPEGs in the shard")
    parser.add_argument("--photo-width", type=int, default=320)
    parser.add_argument("--photo-height", type=int, default=240)
    parser.add_argument("--photo-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="side by side: alternated rounds (median)")
    parser.add_argument("--gpu-rates", type=int, nargs="+", default=[3000, 6000], help="ViT-B/16 samples/s on one GPU")
    parser.add_argument("--assumed-mfu", type=float, default=0.4, help="for the GPU-rate estimate without a GPU")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark copies")
    parser.add_argument("--tmp", default=None)
    parser.add_argument("--worker-spec", help=argparse.SUPPRESS)
    return benchmark_args(parser, argv, QUICK, "tiny sizes (the smoke test)")


if __name__ == "__main__":
    main()
