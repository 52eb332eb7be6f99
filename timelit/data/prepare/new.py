"""`timelit data new`: the manifest set of a researcher's own dataset, written from its image folder or CSV.

    timelit data new --name DIGITS --source ~/digits --out my_set --held_out quickstart
    timelit data prepare --layout imagefolder --source ~/digits --datasets DIGITS --manifests my_set --data_root my_set
    timelit fit --config quickstart.yaml --config my_set/fit.yaml

A run reads a manifest set (`timelit.data.manifest`): datasets/, classnames/, streams/ and pools/. This command writes
one from what a folder holds, so that nothing has to be written by hand (docs/own_data.md walks through it):

* `datasets/<NAME>.yaml` with the class count, the image count of every split (checked by prepare and verify), a
  prompt template to edit and the source it was made from; `classnames/<NAME>.json`, the class folders or the CSV's
  label column in natural order ("2" before "10");
* `streams/stream.json`: the concepts (`NAME+++class`) of every adaptation dataset of the set, in the order the
  datasets were added and each dataset's classes in class-list order; the run cuts it into `num_tasks` tasks;
* held-out sets (`--held_out`): the quickstart's (`quickstart`: COLOURS, SHAPES, TEXTURES and its pretraining pool,
  their shards linked into the set, so a quickstart-sized run has A_ZS and replay at no cost) or datasets named from
  the quickstart or the shipped FoMo-in-Flux set (prepared from their release with `timelit data prepare`);
* `fit.yaml`, a config fragment that points a run at the set: data_root and manifests (the set's folder holds its
  shards too, as the quickstart's does), stream, num_tasks, and the quickstart's pool and base model when reused.

Run it again with another `--name` to add a dataset to the same set (its concepts go to the end of the stream); a
name without `--source` copies that dataset from the shipped FoMo-in-Flux set or the quickstart, so a stream can mix
one's own datasets with the benchmark's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Literal

import yaml

from timelit.data.manifest import ManifestError, ManifestSet, load_manifests, resolve_manifest_root
from timelit.data.prepare.csv_files import scan_csv
from timelit.data.prepare.imagefolder import scan_imagefolder
from timelit.data.prepare.records import Found, LayoutError
from timelit.data.streams import SEPARATOR, chunk
from timelit.utilities.atomic import write_text

QUICKSTART = "~/.cache/timelit/quickstart"
STREAM = "stream"
FIT_CONFIG = "fit.yaml"
DEFAULT_PROMPT = "a photo of a {}."
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SUBFOLDERS = ("datasets", "classnames", "streams", "pools")

NewLayout = Literal["auto", "imagefolder", "csv"]


def shown(path: Path) -> str:
    """A path as printed: relative to the working directory when it lies below it (what the user typed), else
    from ~ when it lies in the home folder."""
    for base, prefix in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return prefix + str(path.relative_to(base))
        except ValueError:
            continue
    return str(path)


def scan_source(source: Path, layout: NewLayout, role: str) -> Found:
    """Find the layout (a CSV file, a folder of <split>.csv, or an image folder) and what the source holds."""
    if not source.exists():
        raise LayoutError(f"--source {source} does not exist")
    csvs = sorted(source.glob("*.csv")) if source.is_dir() else []
    if layout == "auto":
        layout = "csv" if source.is_file() or csvs else "imagefolder"
    if layout == "imagefolder":
        if not source.is_dir():
            raise LayoutError(f"--source {source} is a file; --layout imagefolder reads a folder <split>/<class>/")
        return scan_imagefolder(source)
    if source.is_file():
        if role == "adapt":
            raise LayoutError(
                f"--source {source} is one CSV, which holds one split; an adaptation dataset needs train and test: "
                f"give a folder with train.csv and test.csv (or --role eval for a held-out test set)"
            )
        return scan_csv({"test": source})
    if not csvs:
        raise LayoutError(f"--source {source} holds no <split>.csv files (train.csv, test.csv)")
    return scan_csv({path.stem: path for path in csvs})


def _check_splits(found: Found, role: str, source: Path) -> None:
    needed = ("train", "test") if role == "adapt" else ("test",)
    missing = [split for split in needed if split not in found.counts]
    if missing:
        kind = "an adaptation dataset (streamed, trained on)" if role == "adapt" else "a held-out dataset"
        where = "/".join(f"{s}{'.csv' if found.layout == 'csv' else '/'}" for s in missing)
        raise LayoutError(
            f"{source} has no {where} split, which {kind} needs; it holds {sorted(found.counts)}"
            + (" (or pass --role eval to hold it out)" if role == "adapt" and "test" in found.counts else "")
        )
    if role == "adapt" and found.classnames is None:
        raise LayoutError(f"{source}: the CSV rows have no label column; a streamed dataset needs classes")


# --------------------------------------------------------------------------- writing the set


def _dataset_manifest(
    name: str, role: str, found: Found, prompt: str, source: Path, image_root: Path | None
) -> dict[str, object]:
    layout_source = {"layout": found.layout, "path": str(source)}
    if image_root is not None:
        layout_source["image_root"] = str(image_root)
    return {
        "name": name,
        "role": role,
        "task": "classification" if found.classnames else "retrieval",
        "classnames": f"../classnames/{name}.json" if found.classnames else None,
        "num_classes": len(found.classnames) if found.classnames else None,
        "prompt_templates": [prompt],
        "splits": {split: {"num_samples": count} for split, count in sorted(found.counts.items())},
        "source": {**layout_source, "written_by": "timelit data new"},
        "license": "your own data: state its terms here",
        "notes": (
            "Written by `timelit data new`. Edit prompt_templates to describe your images (zero-shot accuracy "
            "depends on it; '{}' is the class name), and license. The counts are the images found; prepare and "
            "verify check them."
        ),
    }


def _prepare_command(name: str, found: Found, source: Path, out: Path, image_root: Path | None) -> str:
    parts = [f"timelit data prepare --layout {found.layout} --source {shown(source)} --datasets {name}"]
    if found.layout == "csv" and source.is_file():
        parts.append("--splits test")
    if image_root is not None:
        parts.append(f"--image_root {shown(image_root)}")
    parts.append(f"--manifests {shown(out)} --data_root {shown(out)}")
    return " ".join(parts)


def _read_stream(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
    except ValueError as error:
        raise ManifestError(f"{path}: not valid JSON ({error}); delete it to start the stream again") from error
    if not isinstance(entries, list):
        raise ManifestError(f"{path}: not a JSON list of concepts; delete it to start the stream again")
    return entries


def _with_dataset(entries: list[str], name: str, classnames: list[str] | tuple[str, ...]) -> list[str]:
    """The stream with `name`'s concepts in class order: in place of its old ones, else at the end."""
    new = [f"{name}{SEPARATOR}{c}" for c in classnames]
    positions = [i for i, entry in enumerate(entries) if entry.split(SEPARATOR, 1)[0] == name]
    if not positions:
        return entries + new
    rest = [entry for entry in entries if entry.split(SEPARATOR, 1)[0] != name]
    return rest[: positions[0]] + new + rest[positions[0] :]


def _copy_dataset(origin: ManifestSet, name: str, out: Path, data_root: Path, link: bool) -> list[str]:
    """Copy a dataset (or pool) manifest and its class list into `out`; link its shards when `link`."""
    done = []
    is_pool = name in origin.pools
    manifest_path = origin.pools[name].path if is_pool else origin.datasets[name].path
    target = out / ("pools" if is_pool else "datasets") / manifest_path.name
    data = yaml.safe_load(manifest_path.read_text())
    data["source"] = {**(data.get("source") or {}), "copied_from": str(origin.root.resolve())}
    if not is_pool and data.get("classnames"):
        classes = (manifest_path.parent / data["classnames"]).resolve()
        shutil.copyfile(classes, out / "classnames" / f"{name}.json")
        data["classnames"] = f"../classnames/{name}.json"
    write_text(target, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    done.append(f"{shown(target)}: copied from {shown(origin.root)}")
    if link and (origin.root / name).is_dir():
        shards = data_root / name
        if shards.is_symlink() or not shards.exists():
            shards.unlink(missing_ok=True)
            shards.symlink_to((origin.root / name).resolve(), target_is_directory=True)
            done.append(f"{shown(shards)} -> {shown((origin.root / name).resolve())} (its prepared shards, linked)")
    return done


def _origin_of(name: str, quickstart_dir: str) -> tuple[ManifestSet, bool]:
    """The set a dataset without --source is copied from: the shipped FoMo-in-Flux set, else the quickstart (whose
    shards are linked, being prepared already)."""
    shipped = load_manifests("fomo_in_flux")
    if name in shipped.datasets:
        return shipped, False
    quickstart = _load_quickstart(quickstart_dir, needed=False)
    if quickstart is not None and (name in quickstart.datasets or name in quickstart.pools):
        return quickstart, True
    import difflib

    known = [*shipped.datasets, *(quickstart.datasets if quickstart else ()), *(quickstart.pools if quickstart else ())]
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    where = "the shipped FoMo-in-Flux set" + (" or the quickstart" if quickstart else " (the quickstart is not there)")
    raise ManifestError(
        f"dataset '{name}' is in neither {where}.{hint} Pass --source FOLDER to make a dataset of your own images"
    )


def _load_quickstart(quickstart: str, needed: bool) -> ManifestSet | None:
    root = Path(quickstart).expanduser()
    if not (root / "datasets").is_dir():
        if needed:
            raise ManifestError(
                f"no quickstart benchmark at {root}: run `timelit data synth` first (about 3 minutes), or pass "
                f"--quickstart DIR"
            )
        return None
    return load_manifests(root)


def _previous_tasks(out: Path) -> int | None:
    """The num_tasks of the set's fit.yaml, which a dataset added later keeps unless --num_tasks is given."""
    try:
        value = yaml.safe_load((out / FIT_CONFIG).read_text())["data"]["init_args"]["num_tasks"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


def _fit_config(out: Path, num_tasks: int, concepts: int, manifest_set: ManifestSet) -> str:
    pools = list(manifest_set.pools)
    data: dict[str, object] = {
        "data_root": str(out),
        "manifests": str(out),
        "stream": STREAM,
        "num_tasks": num_tasks,
        "task_boundaries": "equal",
        "synthesize_if_missing": False,
    }
    if pools:
        data["pretraining_pool"] = pools[0]
    else:  # no pool to replay: the batch is the current task and replay of earlier ones
        data["pretraining_pool"] = None
        data["mixture"] = {"pretraining": 0.0, "current": 0.5, "replay": 0.5}
    config: dict[str, object] = {"data": {"init_args": data}}
    # A pool copied from the quickstart was the base model's pretraining data: that model is the one to adapt.
    copied_from = manifest_set.pools[pools[0]].source.get("copied_from") if pools else None
    base = Path(str(copied_from)) / "base_model.safetensors" if copied_from else None
    if base is not None and base.is_file():
        config["model"] = {"init_args": {"pretrained": str(base)}}
    config["trainer"] = {"logger": {"init_args": {"name": out.name}}}
    header = (
        f"# Written by `timelit data new`: a run of the stream of {shown(out)} ({concepts} concepts in {num_tasks} "
        f"tasks).\n"
        f"#   timelit fit --config quickstart.yaml --config {shown(out / FIT_CONFIG)}\n"
        f"# The run folder is runs/{out.name}/ (trainer.logger's name), so that it neither resumes nor overwrites the\n"
        f"# quickstart's. Edit num_tasks here, or override it: --data.init_args.num_tasks 2.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def new_dataset(
    name: str,
    out: str | Path,
    source: str | None = None,
    layout: NewLayout = "auto",
    role: Literal["adapt", "eval"] = "adapt",
    prompt: str = DEFAULT_PROMPT,
    held_out: list[str] | None = None,
    quickstart: str = QUICKSTART,
    num_tasks: int | None = None,
    image_root: str | None = None,
    overwrite: bool = False,
) -> list[str]:
    """Write or extend the manifest set `out` (see `timelit.commands.data.new_command`); returns the lines to print."""
    out = Path(out).expanduser().resolve()
    if not NAME_PATTERN.match(name) or SEPARATOR in name:
        raise ManifestError(
            f"dataset name {name!r}: use letters, digits, '_', '-' and '.' (it names files and the shard folder)"
        )
    held_out = list(held_out or [])
    quick = _load_quickstart(quickstart, needed="quickstart" in held_out)
    if quick is not None and out == quick.root.resolve():
        raise ManifestError(f"--out {out} is the quickstart benchmark itself; choose a folder of your own")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; give a folder for the manifest set")
    if out.is_dir() and any(out.iterdir()) and not (out / "datasets").is_dir():
        raise ManifestError(
            f"--out {out} is a folder that holds no manifest set (no datasets/); choose a new or empty folder"
        )
    for sub in SUBFOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    existing = resolve_manifest_root(out)
    if (existing / "datasets" / f"{name}.yaml").is_file() and not overwrite:
        raise ManifestError(
            f"dataset '{name}' is already in {out / 'datasets'}; pass --overwrite true to write it again (its "
            f"prepared shards are replaced by the next prepare with --overwrite true)"
        )
    lines: list[str] = []
    next_steps: list[str] = []
    if source is not None:
        src = Path(source).expanduser().resolve()
        found = scan_source(src, layout, role)
        _check_splits(found, role, src)
        root = Path(image_root).expanduser().resolve() if image_root else None
        manifest = _dataset_manifest(name, role, found, prompt, src, root)
        if found.classnames:
            write_text(out / "classnames" / f"{name}.json", json.dumps(found.classnames, indent=1, ensure_ascii=False))
        write_text(out / "datasets" / f"{name}.yaml", yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True))
        counts = ", ".join(f"{split} {count}" for split, count in sorted(found.counts.items()))
        classes = f"{len(found.classnames)} classes" if found.classnames else "no classes (retrieval)"
        lines.append(f"{shown(out / 'datasets' / f'{name}.yaml')}: {role}, {classes}, images: {counts}")
        lines.append(f"  prompt {prompt!r} (edit prompt_templates to describe your images)")
        if found.classnames:
            listed = ", ".join(found.classnames[:8]) + (", ..." if len(found.classnames) > 8 else "")
            lines.append(f"{shown(out / 'classnames' / f'{name}.json')}: {listed}")
        next_steps.append(_prepare_command(name, found, src, out, root))
        classnames = found.classnames or []
    else:
        origin, link = _origin_of(name, quickstart)
        lines += _copy_dataset(origin, name, out, out, link)
        role = origin.datasets[name].role if name in origin.datasets else "pool"
        classnames = list(origin.datasets[name].classnames) if name in origin.datasets else []
        if not link:
            next_steps.append(
                f"timelit data prepare --source FOMO_RELEASE --datasets {name} --manifests {shown(out)} "
                f"--data_root {shown(out)}"
            )
    for entry in held_out:
        if entry == "quickstart":
            assert quick is not None
            members = [m.name for m in quick.by_role("eval")] + list(quick.pools)
        else:
            members = [entry]
        for held in members:
            origin, link = _origin_of(held, quickstart)
            if held in origin.datasets and origin.datasets[held].role != "eval":
                raise ManifestError(
                    f"--held_out {held}: a dataset with role {origin.datasets[held].role} in {origin.root}; held-out "
                    f"sets have role eval (add it without --held_out to stream it)"
                )
            lines += _copy_dataset(origin, held, out, out, link)
            if not link:
                next_steps.append(
                    f"timelit data prepare --source FOMO_RELEASE --datasets {held} --manifests {shown(out)} "
                    f"--data_root {shown(out)}"
                )
    stream_path = out / "streams" / f"{STREAM}.json"
    entries = _read_stream(stream_path)
    if role == "adapt":
        entries = _with_dataset(entries, name, classnames)
        write_text(stream_path, json.dumps(entries, indent=0, ensure_ascii=False) + "\n")
    manifest_set = load_manifests(out)  # the set as a run will read it: any mistake shows here, not at fit time
    if entries:
        from timelit.data.prepare.stream_files import check_stream

        check_stream(str(stream_path), manifest_set)
        tasks = num_tasks if num_tasks is not None else min(_previous_tasks(out) or 4, len(entries))
        if tasks < 1 or tasks > len(entries):
            raise ManifestError(
                f"--num_tasks {tasks}: the stream has {len(entries)} concepts; choose 1 to {len(entries)} tasks"
            )
        sizes = [len(task) for task in chunk(entries, tasks)]
        datasets = list(dict.fromkeys(e.split(SEPARATOR, 1)[0] for e in entries))
        lines.append(
            f"{shown(stream_path)}: {len(entries)} concepts of {', '.join(datasets)}; {tasks} tasks of {sizes} concepts"
        )
        pools = list(manifest_set.pools)
        write_text(out / FIT_CONFIG, _fit_config(out, tasks, len(entries), manifest_set))
        held = [m.name for m in manifest_set.by_role("eval")]
        lines.append(
            f"{shown(out / FIT_CONFIG)}: data_root and manifests {shown(out)}, {tasks} tasks, "
            + (f"held out: {', '.join(held)}" if held else "no held-out sets (the run reports A_KA alone)")
            + (f", pool {pools[0]}" if pools else ", no pretraining pool")
        )
        next_steps += [
            f"timelit data verify --manifests {shown(out)} --data_root {shown(out)}",
            f"timelit fit --config quickstart.yaml --config {shown(out / FIT_CONFIG)}",
        ]
    return lines + ["next:"] + [f"  {step}" for step in next_steps]
