"""From downloaded folders to training batches: `timelit data prepare` on a fake FoMo-in-Flux release, an ImageFolder,
a CSV and an img2dataset pool, `timelit data verify`, then the TimeDataModule streaming what was prepared."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from webdataset import TarWriter

from timelit.commands.data import prepare_command, verify_command
from timelit.data.datamodule import Preprocessing, TimeDataModule
from timelit.data.mixture import Mixture
from timelit.data.samples import decode
from timelit.data.shards import CorruptSampleError, ShardIndex

CLS = ["cat", "dog", "water / carbon"]
RET = ["sky", "sea"]
COLOURS = {"cat": (220, 20, 20), "dog": (20, 220, 20), "water / carbon": (20, 20, 220), "sky": (240, 240, 0),
           "sea": (0, 240, 240), "red": (250, 0, 0), "green": (0, 250, 0)}  # fmt: skip
STREAM = ["FAKECLS+++cat", "FAKERET+++sky", "FAKECLS+++water / carbon", "FAKECLS+++dog", "FAKERET+++sea"]
TASK_CONCEPTS = [set(STREAM[:3]), set(STREAM[3:])]


def _image(path: Path, colour, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path, format=fmt)


def _manifest(root: Path, name: str, role: str, task: str, classes: list[str] | None, splits: tuple[str, ...]) -> None:
    manifest = {
        "name": name,
        "role": role,
        "task": task,
        "classnames": f"../classnames/{name}.json" if classes else None,
        "num_classes": len(classes) if classes else None,
        "prompt_templates": ["a photo of a {}." if classes else "{}"],
        "splits": {s: {"num_samples": None} for s in splits},
        "source": {"test": "tests/integration/test_data_prepare_cli.py"},
        "license": "test data",
    }
    (root / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(manifest))
    if classes:
        (root / "classnames" / f"{name}.json").write_text(json.dumps(classes))


@pytest.fixture
def downloads(tmp_path: Path) -> dict[str, Path]:
    """What a user has downloaded, and the manifest set that describes it."""
    m, release = tmp_path / "manifests", tmp_path / "release"
    for sub in ("datasets", "classnames", "streams", "pools"):
        (m / sub).mkdir(parents=True)
    _manifest(m, "FAKECLS", "adapt", "classification", CLS, ("train", "test"))
    _manifest(m, "FAKERET", "adapt", "retrieval", RET, ("train", "test"))
    _manifest(m, "FAKECOCO", "eval", "retrieval", None, ("test",))
    _manifest(m, "FOLDERSET", "eval", "classification", ["red", "green"], ("test",))
    _manifest(m, "CSVSET", "eval", "retrieval", None, ("test",))
    (m / "pools" / "FAKEPOOL.yaml").write_text(yaml.safe_dump({"name": "FAKEPOOL", "num_samples": 8}))
    (m / "streams" / "s.json").write_text(json.dumps(STREAM))
    info = release / "00_info"
    info.mkdir(parents=True)
    for name, classes in (("FAKECLS", CLS), ("FAKERET", RET)):
        for split, count in (("train", 4), ("test", 2)):
            meta = {}
            for target, cls in enumerate(classes):
                for i in range(count):
                    ref = f"{split}/{target}/{i}.jpg"
                    _image(release / name / ref, COLOURS[cls], fmt="JPEG")
                    caption = f"{cls} number {i}" if i % 2 == 0 else None
                    meta[ref] = {"classname": cls, "default_caption": caption, "primer_caption": None,
                                 "synthetic_caption": None, "synthetic_merged_caption": f"merged {cls} {i}",
                                 "target": target}  # fmt: skip
            (info / f"{name}_{split}.json").write_text(json.dumps(meta))
    meta = {}
    for i in range(4):
        _image(release / "FAKECOCO" / f"val/{i}.jpg", (i * 60, 99, 99), fmt="JPEG")
        meta[f"val/{i}.jpg"] = {"classname": None, "default_caption": [f"coco {i} caption {k}" for k in range(5)]}
    (info / "FAKECOCO_test.json").write_text(json.dumps(meta))
    folder = tmp_path / "imagefolder"
    for cls in ("red", "green"):
        for i in range(3):
            _image(folder / "test" / cls / f"{i}.png", COLOURS[cls])
    table = tmp_path / "csv"
    table.mkdir()
    with (table / "test.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        for i in range(3):
            _image(table / f"{i}.png", (9, 9, 80 * i))
            writer.writerows([[f"{i}.png", f"first caption of {i}"], [f"{i}.png", f"second caption of {i}"]])
    pool = tmp_path / "laion"
    pool.mkdir()
    for shard in range(2):
        with TarWriter(str(pool / f"{shard:05d}.tar")) as writer:
            for i in range(4):
                buffer = io.BytesIO()
                Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, format="JPEG")
                key = f"{shard:05d}{i:04d}"
                writer.write({"__key__": key, "jpg": buffer.getvalue(), "txt": f"pool {key}", "json": {"key": key}})
    return {"manifests": m, "release": release, "imagefolder": folder, "csv": table, "pool": pool, "root": tmp_path}


def _timelit(*args: str) -> None:
    """`timelit data ...` as a user runs it (through timelit's CLI once the lead has wired the commands there)."""
    from timelit.commands.cli import function_commands, main

    if "prepare" in function_commands().get("data", {}):
        main(list(args))
    else:
        import jsonargparse

        commands = {"data": {"prepare": prepare_command, "verify": verify_command}}
        jsonargparse.CLI(commands, args=list(args), as_positional=False)


def _prepare_everything(d: dict[str, Path], data: Path, *extra: str) -> None:
    common = ["--data_root", str(data), "--manifests", str(d["manifests"]), *extra]
    _timelit("data", "prepare", "--source", str(d["release"]), *common, "--samples_per_shard", "3", "--workers", "2")
    for layout, source, name in (
        ("imagefolder", d["imagefolder"], "FOLDERSET"),
        ("csv", d["csv"] / "test.csv", "CSVSET"),
        ("pool", d["pool"], "FAKEPOOL"),
    ):
        _timelit("data", "prepare", "--layout", layout, "--source", str(source), "--datasets", f"[{name}]", *common)


def _byte_tokenizer(captions: list[str]) -> torch.Tensor:
    """Tokens that give the caption back: its UTF-8 bytes, zero-padded."""
    out = torch.zeros(len(captions), 64, dtype=torch.long)
    for row, caption in enumerate(captions):
        data = caption.encode()[:64]
        out[row, : len(data)] = torch.tensor(list(data))
    return out


def _text(tokens: torch.Tensor) -> str:
    return bytes(int(t) for t in tokens if t > 0).decode()


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1)


def _datamodule(d: dict[str, Path], data: Path, **overrides) -> TimeDataModule:
    kwargs = dict(
        data_root=str(data), manifests=str(d["manifests"]), stream="s", num_tasks=2, batch_size=6,
        mixture=Mixture(pretraining=0.33, current=0.34, replay=0.33), pretraining_pool="FAKEPOOL", steps_per_task=3,
        eval_batch_size=4, num_workers=0, seed=0,
    )  # fmt: skip
    dm = TimeDataModule(**{**kwargs, **overrides})
    dm.set_preprocessing(Preprocessing(_to_tensor, _to_tensor, _byte_tokenizer))
    dm.setup("fit")
    return dm


def test_prepare_and_verify_from_the_command_line(downloads, capsys):
    data = downloads["root"] / "data"
    _prepare_everything(downloads, data)
    out = capsys.readouterr().out
    assert "FAKECLS               train          12" in out and "prepared" in out
    _timelit("data", "verify", "--data_root", str(data), "--manifests", str(downloads["manifests"]), "--decode", "true")
    out = capsys.readouterr().out
    assert "all 8 split(s) ok, 51 images decoded" in out
    # A second prepare of the same source is a no-op.
    _timelit("data", "prepare", "--source", str(downloads["release"]), "--data_root", str(data),
             "--manifests", str(downloads["manifests"]), "--samples_per_shard", "3")  # fmt: skip
    assert capsys.readouterr().out.count("up to date") == 5


def test_verify_exits_non_zero_on_a_missing_dataset(downloads, capsys):
    data = downloads["root"] / "data"
    _timelit("data", "prepare", "--source", str(downloads["release"]), "--data_root", str(data),
             "--manifests", str(downloads["manifests"]))  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        _timelit("data", "verify", "--data_root", str(data), "--manifests", str(downloads["manifests"]))
    assert exited.value.code == 1
    out = capsys.readouterr().out
    assert "CSVSET/test: not prepared" in out and "FOLDERSET/test: not prepared" in out


def test_prepare_exits_non_zero_listing_unknown_classes(downloads, capsys):
    path = downloads["release"] / "00_info" / "FAKERET_train.json"
    meta = json.loads(path.read_text())
    next(iter(meta.values()))["classname"] = "cloud"
    path.write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exited:
        _timelit("data", "prepare", "--source", str(downloads["release"]), "--data_root", str(downloads["root"] / "d"),
                 "--manifests", str(downloads["manifests"]))  # fmt: skip
    assert exited.value.code == 1
    assert "'cloud'" in capsys.readouterr().out


def _sample(data: Path, key: str):
    dataset, split, number = key.split("/")
    index = ShardIndex.load(data / dataset, split)
    return decode(index.read(int(number)))


def test_the_data_module_streams_what_prepare_wrote(downloads):
    data = downloads["root"] / "data"
    _prepare_everything(downloads, data)
    dm = _datamodule(downloads, data)
    for task in (0, 1):
        batches = dm.task_batches(task)
        assert len(batches) == 3
        for batch in batches:
            assert batch["image"].shape == (6, 3, 4, 4) and batch["skipped"] == []
            for key, source, tokens, image in zip(batch["keys"], batch["source"], batch["text"], batch["image"]):
                if int(source) == 0:  # the pretraining pool keeps img2dataset's keys and captions
                    assert _text(tokens) == f"pool {key}"
                    continue
                sample = _sample(data, key)
                assert _text(tokens) in sample.captions
                concept = f"{sample.meta['dataset']}+++{sample.meta['classname']}"
                assert concept in TASK_CONCEPTS[task if int(source) == 1 else 0]
                assert key.split("/")[1] == "train"
                colour = COLOURS[sample.meta["classname"]]
                assert np.allclose(image[:, 0, 0].numpy(), colour, atol=12)  # the image belongs to its caption
    counts = {int(s): 0 for s in (0, 1, 2)}
    for batch in dm.task_batches(1):
        for source in batch["source"]:
            counts[int(source)] += 1
    assert counts == {0: 6, 1: 9, 2: 3}  # 6 per batch as 2 pool + 3 current + 1 replay


def test_evaluation_reads_labels_and_captions_from_the_manifests(downloads):
    data = downloads["root"] / "data"
    _prepare_everything(downloads, data)
    dm = _datamodule(downloads, data)
    specs = {spec.name: spec for spec in dm.eval_specs}
    assert set(specs) == {"FAKECLS", "FAKERET", "FAKECOCO", "FOLDERSET", "CSVSET"}
    labels = torch.cat([b["label"] for b in dm.eval_batches(specs["FAKECLS"], "full")]).tolist()
    assert labels == [0, 0, 1, 1, 2, 2]
    folder = list(dm.eval_batches(specs["FOLDERSET"], "full"))
    # folders are read in sorted order (green, red); labels follow the manifest's list (red, green)
    assert torch.cat([b["label"] for b in folder]).tolist() == [1, 1, 1, 0, 0, 0]
    assert np.allclose(folder[0]["image"][0, :, 0, 0].numpy(), COLOURS["green"], atol=2)
    coco = list(dm.eval_batches(specs["FAKECOCO"], "full"))
    captions = [_text(t) for b in coco for t in b["caption_tokens"]]
    assert captions[:5] == [f"coco 0 caption {k}" for k in range(5)] and len(captions) == 20
    csv_batch = next(iter(dm.eval_batches(specs["CSVSET"], "full")))
    assert [_text(t) for t in csv_batch["caption_tokens"][:2]] == ["first caption of 0", "second caption of 0"]


def test_a_corrupt_jpeg_is_skipped_and_counted_or_named(downloads):
    (downloads["release"] / "FAKECOCO" / "val" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    data = downloads["root"] / "data"
    _prepare_everything(downloads, data, "--decode", "false")  # stored unchecked: a file damaged after prepare
    skipping = _datamodule(downloads, data, on_corrupt="skip")
    spec = next(s for s in skipping.eval_specs if s.name == "FAKECOCO")
    batches = list(skipping.eval_batches(spec, "full"))
    assert sum(len(b["label"]) for b in batches) == 3 and sum(len(b["skipped"]) for b in batches) == 1  # per batch
    raising = _datamodule(downloads, data, on_corrupt="raise")
    with pytest.raises(CorruptSampleError, match=r"source 'val/2.jpg', sample 'FAKECOCO/test/00000002'.*not decode"):
        list(raising.eval_batches(spec, "full"))


def test_a_truncated_shard_is_named_by_verify_the_data_module_and_the_loader(downloads, capsys):
    data = downloads["root"] / "data"
    _prepare_everything(downloads, data)
    shard = data / "FOLDERSET" / "test-000000.tar"
    shard.write_bytes(shard.read_bytes()[:4000])
    with pytest.raises(SystemExit):
        _timelit("data", "verify", "--data_root", str(data), "--manifests", str(downloads["manifests"]))
    assert f"FOLDERSET/test: shard {shard} ends at byte 4000 of " in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match=rf"\n  shard {re.escape(str(shard))} ends at byte 4000 of "):
        _datamodule(downloads, data, on_corrupt="raise")  # at set-up, from the index: before anything is read
    dm = _datamodule(downloads, data, on_corrupt="skip")
    spec = next(s for s in dm.eval_specs if s.name == "FOLDERSET")
    skipped = [skip for batch in dm.eval_batches(spec, "full") for skip in batch["skipped"]]
    assert skipped and all(s.shard_problem.startswith(f"shard {shard} ends at byte 4000 of ") for s in skipped)
    assert all("the file ends early" in s.reason for s in skipped)


def test_a_missing_dataset_stops_the_data_module_with_its_name(downloads):
    data = downloads["root"] / "data"
    _prepare_everything(downloads, data)
    for path in (data / "FAKERET").iterdir():
        path.unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks 2 prepared split\(s\):\n  FAKERET/train\n  FAKERET/test"):
        _datamodule(downloads, data)
