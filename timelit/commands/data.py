"""`timelit data new / prepare / verify / stream / synth`: the data tools, each a typed function
(timelit/commands/cli.py).

    timelit data new --name DIGITS --source ~/digits --out my_set --held_out quickstart
    timelit data prepare --layout imagefolder --source ~/digits --datasets DIGITS --manifests my_set --data_root my_set
    timelit data verify --manifests my_set --data_root my_set
    timelit data stream --out my_stream.json --ordering class_incremental --seed 3
    timelit data synth --out ~/.cache/timelit/quickstart

The work is in timelit/data/prepare (new, prepare, verify, stream) and timelit/data/synth; each command imports
its work when it runs (numpy, PIL and torch load only for the command that needs them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from timelit.data.prepare.new import DEFAULT_PROMPT, QUICKSTART, NewLayout
from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.stream_files import Ordering
from timelit.utilities.errors import UsageError


def new_command(
    name: str,
    out: str,
    source: str | None = None,
    layout: NewLayout = "auto",
    role: Literal["adapt", "eval"] = "adapt",
    prompt: str = DEFAULT_PROMPT,
    held_out: list[str] | str | None = None,
    quickstart: str = QUICKSTART,
    num_tasks: int | None = None,
    image_root: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write the manifest set of your own dataset (from an image folder or CSV), ready to prepare and run.

    Writes OUT/datasets/NAME.yaml (classes, image counts, a prompt template to edit), OUT/classnames/NAME.json,
    OUT/streams/stream.json (the classes of every adaptation dataset of OUT, cut into NUM_TASKS tasks by the run)
    and OUT/fit.yaml, then prints the prepare, verify and fit commands. Run it again with another NAME to add a
    dataset; without SOURCE, NAME is copied from the shipped FoMo-in-Flux set or the quickstart. docs/own_data.md
    walks through it.

    Args:
        name: the dataset's name (files, shard folder, stream concepts NAME+++class).
        out: the manifest set's folder, created or extended; prepared shards go there too.
        source: an image folder (<split>/<class>/<image>, with train/ and test/), a folder of <split>.csv files or
            one CSV (rows path,caption[,label]); none: copy NAME from FoMo-in-Flux or the quickstart.
        layout: how SOURCE is organised (auto: CSV files, else an image folder).
        role: adapt (streamed and trained on; A_KA) or eval (held out; A_ZS, needs only a test split).
        prompt: the zero-shot prompt, '{}' = class name (edit it in the YAML later).
        held_out: held-out sets to evaluate zero-shot retention on, as NAME or [NAME,...]: quickstart (its held-out
            sets and pretraining pool, linked) or dataset names from the quickstart or FoMo-in-Flux.
        quickstart: the quickstart benchmark's folder (`timelit data synth` writes it).
        num_tasks: tasks the stream is cut into, in OUT/fit.yaml (default: the number there, else 4; never more than
            the stream's concepts).
        image_root: csv: folder that relative image paths start from (default: the CSV's folder).
        overwrite: write NAME again when OUT has it already.
    """
    from timelit.data.manifest import names
    from timelit.data.prepare.new import new_dataset

    for line in new_dataset(
        name,
        out,
        source,
        layout,
        role,
        prompt,
        names(held_out),
        quickstart,
        num_tasks,
        image_root,
        overwrite,
    ):
        print(line)


def prepare_command(**options: Any) -> None:
    """Convert a downloaded dataset folder into timelit shards under DATA_ROOT/<NAME>/ (resumable, parallel).

    Every image is decoded once, in the worker processes: a file that does not decode is an error naming it (or,
    with --skip_bad true, is left out and listed in DATA_ROOT/<NAME>/<split>.skipped.tsv). Rerun the same command
    after an interruption: finished shards are kept, the rest are written. Every problem (unknown class names, missing
    or bad images, counts that differ from the manifest) is listed at once, and the command exits with status 1; an
    unknown dataset or a source that does not exist ends it with one line and status 2.

    The options are the fields of `timelit.data.prepare.options.PrepareOptions`, with their help: jsonargparse
    reads them from the `PrepareOptions(**options)` call below, so they are written once.
    """
    from timelit.data.prepare.run import format_results, prepare
    from timelit.data.prepare.shard_jobs import PrepareError

    try:
        results = prepare(PrepareOptions(**options))
    except PrepareError as error:  # problems found in the data, listed in full; what was asked is wrong: exit 2
        print(f"timelit data prepare: {error}", flush=True)
        raise SystemExit(1) from None
    print(format_results(results))
    for result in results:
        if result.skipped:
            shown = ", ".join(source for source, _ in result.skipped[:5])
            more = f" and {len(result.skipped) - 5} more" if len(result.skipped) > 5 else ""
            print(
                f"{result.dataset}/{result.split}: skipped {len(result.skipped)} bad image(s): {shown}{more} "
                f"(reasons in {result.report})"
            )


def verify_command(
    data_root: str,
    manifests: str = "fomo_in_flux",
    datasets: list[str] | str | None = None,
    pools: list[str] | str | None = None,
    decode: bool | float = False,
    seed: int = 0,
) -> None:
    """Check prepared shards against the manifests; print one table; exit with status 1 if anything is wrong.

    Args:
        data_root: the folder of prepared shards (the data module's data_root).
        manifests: the manifest set: fomo_in_flux (shipped) or a folder.
        datasets: datasets to check, as NAME or [NAME,...] (default: every dataset of the manifest set).
        pools: pretraining pools to check, as NAME or [NAME,...] (default: those present under DATA_ROOT; absent
            ones are optional).
        decode: also decode images: true for every image, or a fraction (0.05) for a seeded random sample.
        seed: seed of the decoded sample.
    """
    from timelit.data.prepare.verify import format_checks, verify

    checks = verify(data_root, manifests, datasets, pools, decode, seed)
    print(format_checks(checks), flush=True)
    if any(c.problems for c in checks):
        raise SystemExit(1)


def stream_command(
    out: str,
    ordering: Ordering = "random",
    manifests: str = "fomo_in_flux",
    seed: int = 0,
    datasets: list[str] | None = None,
    dataset_order: list[str] | None = None,
    universe: str | None = None,
    shuffle_classes: bool = False,
    num_tasks: int | None = None,
) -> None:
    """Write a stream of concepts (FoMo-in-Flux JSON format) in one of the standard orderings.

    Use it with `--data.stream OUT` (a path) or copy it into a manifest set's streams/ folder.

    Args:
        out: the JSON file to write.
        ordering: random (seeded), dataset_incremental (datasets one after another), or class_incremental (every
            dataset's classes spread evenly over the stream).
        manifests: the manifest set: fomo_in_flux (shipped) or a folder.
        seed: seed of every shuffle (dataset_incremental: of the dataset order unless DATASET_ORDER is given, and of
            the classes with SHUFFLE_CLASSES); the same arguments always write the same stream.
        datasets: adaptation datasets to include (default: all of them, or those of DATASET_ORDER).
        dataset_order: explicit dataset order for dataset_incremental / class_incremental; with DATASETS it must
            list exactly the same datasets.
        universe: take the concepts of this stream (e.g. random_sequence_1) instead of every class of the datasets.
        shuffle_classes: dataset_incremental: shuffle the classes within each dataset.
        num_tasks: also print the datasets of each of this many tasks.
    """
    from timelit.data.prepare.stream_files import generate_stream, write_stream
    from timelit.data.streams import SEPARATOR, chunk

    entries = generate_stream(ordering, manifests, seed, datasets, dataset_order, universe, shuffle_classes)
    path = write_stream(entries, out)
    datasets_seen = list(dict.fromkeys(e.split(SEPARATOR, 1)[0] for e in entries))
    print(f"{path}: {len(entries)} concepts from {len(datasets_seen)} datasets ({ordering})")
    if num_tasks:
        for task, concepts in enumerate(chunk(entries, num_tasks)):
            names = list(dict.fromkeys(e.split(SEPARATOR, 1)[0] for e in concepts))
            print(f"  task {task:>3}: {len(concepts):>5} concepts, {len(names):>2} datasets: {', '.join(names[:6])}")


def synth_command(
    out: str = "~/.cache/timelit/quickstart",
    seed: int = 0,
    scale: float = 1.0,
    base_model: str = "timelit-tiny-ViT",
    base_steps: int = 800,
    force: bool = False,
    size: Literal["quickstart", "science"] = "quickstart",
) -> None:
    """Write the embedded quickstart benchmark (shards, manifests, stream, pool) and train its base model.

    Takes about three minutes on two CPU cores; does nothing when OUT already holds a complete benchmark.

    Args:
        out: folder to write into (the quickstart config reads ~/.cache/timelit/quickstart).
        seed: seed of every drawing and of the base model's training.
        scale: multiplies the size of every dataset and of the pool.
        base_model: open_clip architecture of the base model (the config's model.model_name must match).
        base_steps: training steps of the base model on the pool (batch 128).
        force: write everything again even if OUT is complete.
        size: `quickstart` (3 held-out and 4 adaptation datasets, the default run's) or `science` (the same and 8
            more adaptation datasets: the 12-dataset horizons of configs/sweeps/scaling.yaml).
    """
    from timelit.data.synth.benchmark import READY_FILE, synthesize

    if not (math.isfinite(scale) and scale > 0):  # checked before anything is written into OUT
        raise UsageError(f"--scale must be a positive number (a fraction shrinks every dataset), got {scale}")
    root = synthesize(out, seed=seed, scale=scale, base_model=base_model, base_steps=base_steps, force=force, size=size)
    report = json.loads((Path(root) / READY_FILE).read_text())
    print(f"quickstart benchmark in {root}")
    print(f"{'dataset':<12}{'role':<7}{'zero-shot':>10}{'chance':>8}")
    for name, row in sorted(report["zero_shot"].items(), key=lambda kv: (kv[1]["role"], kv[0])):
        print(f"{name:<12}{row['role']:<7}{row['figure']:>10.1f}{row['chance']:>8.1f}")
