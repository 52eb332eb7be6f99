"""docs/own_data.md, followed as a user would: the guide's commands, run through `timelit` on a generated image
folder (with a truncated PNG) and a CSV, up to a TIME run and its report; and the errors a first attempt meets.

The commands are the guide's own lines (the test fails when the guide changes them); the test only adds what makes
them fast: the session's tiny quickstart instead of ~/.cache/timelit/quickstart, and the micro model and a few steps
for the fit.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from webdataset import TarWriter

from timelit.commands.cli import main
from timelit.utilities.resources import PACKAGE_DIR

GUIDE = PACKAGE_DIR.parent / "docs" / "own_data.md"
MICRO = "timelit-micro-ViT"
DIGITS, LETTERS = "012", "AB"
TRUNCATED = Path("digits/train/2/2_1.png")

NEW_FOLDER = "timelit data new --name DIGITS --source digits --out my_set --held_out quickstart"
NEW_CSV = "timelit data new --name LETTERS --source letters --out my_set --num_tasks 3"
PREPARE_FOLDER = (
    "timelit data prepare --layout imagefolder --source digits --datasets DIGITS --manifests my_set --data_root my_set"
)
PREPARE_CSV = (
    "timelit data prepare --layout csv --source letters --datasets LETTERS --manifests my_set --data_root my_set"
)
VERIFY = "timelit data verify --manifests my_set --data_root my_set"
FIT = "timelit fit --config quickstart.yaml --config my_set/fit.yaml"
REPORT = "timelit report runs/my_set --out report/my_set"
POOL_COPY = (
    "timelit data prepare --layout pool --source DIR --datasets MYPOOL --manifests my_set --data_root my_set "
    "--pool_copy true"
)


def _glyph(text: str, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (32, 32), tuple(rng.randrange(0, 90) for _ in range(3)))
    ImageDraw.Draw(image).text((12 + rng.randint(-4, 4), 10 + rng.randint(-4, 4)), text, fill=(250, 250, 250))
    return image


def _make_sources(root: Path) -> None:
    """`digits/<split>/<class>/*.png` (3 classes, train 3 and test 2 images each, one PNG cut short) and
    `letters/<split>.csv` rows `path,caption,label` over `letters/images/` (2 classes)."""
    rng = random.Random(0)
    for split, count in (("train", 3), ("test", 2)):
        for digit in DIGITS:
            for i in range(count):
                path = root / "digits" / split / digit / f"{digit}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _glyph(digit, rng).save(path)
        rows = [["path", "caption", "label"]]
        for letter in LETTERS:
            for i in range(count):
                path = root / "letters" / "images" / f"{split}_{letter}_{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _glyph(letter, rng).save(path)
                rows.append([f"images/{path.name}", f"a photo of the letter {letter}", letter])
        with open(root / "letters" / f"{split}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    bad = root / TRUNCATED
    bad.write_bytes(bad.read_bytes()[:80])


def _timelit(command: str, *extra: str) -> None:
    main([*shlex.split(command)[1:], *extra])


def _fails(command: str, *extra: str) -> int:
    with pytest.raises(SystemExit) as exited:
        _timelit(command, *extra)
    return exited.value.code


def _fast_fit(benchmark: Path) -> list[str]:
    return [
        "--model.init_args.model_name", MICRO, "--data.init_args.steps_per_task", "2", "--budget.total_gflops", "null",
        "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "0", "--data.init_args.eval_batch_size",
        "64", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--model.init_args.pretrained", str(benchmark / "base_model.safetensors"),
    ]  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _make_sources(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_guide_runs_from_an_image_folder_and_a_csv_to_a_report(tiny_benchmark, workdir, capsys):
    guide = GUIDE.read_text()
    for command in (NEW_FOLDER, NEW_CSV, PREPARE_FOLDER, PREPARE_CSV, VERIFY, FIT, REPORT):
        assert command in guide, f"docs/own_data.md no longer runs: {command}"
    _timelit(NEW_FOLDER, "--quickstart", str(tiny_benchmark))
    out = capsys.readouterr().out
    assert "my_set/datasets/DIGITS.yaml: adapt, 3 classes, images: test 6, train 9" in out
    assert PREPARE_FOLDER in out  # the command it prints is the guide's next step
    _timelit(NEW_CSV)
    assert "my_set/streams/stream.json: 5 concepts of DIGITS, LETTERS; 3 tasks of [2, 2, 1]" in capsys.readouterr().out
    # the truncated PNG stops the split, named by the path the user gave
    assert _fails(PREPARE_FOLDER) == 1
    assert f"DIGITS/train: bad image {TRUNCATED}: OSError" in capsys.readouterr().out
    _timelit(PREPARE_FOLDER, "--skip_bad", "true")
    assert f"DIGITS/train: skipped 1 bad image(s): {TRUNCATED}" in capsys.readouterr().out
    _timelit(PREPARE_CSV)
    _timelit(VERIFY, "--decode", "true")
    out = capsys.readouterr().out
    assert re.search(r"DIGITS +adapt +train +8 +9 +1  ok \(warnings\)", out)  # 9 images found, 8 stored
    assert "1 bad image(s) left out at prepare" in out and "split(s) ok" in out
    _timelit(FIT, *_fast_fit(tiny_benchmark))
    results = json.loads((workdir / "runs" / "my_set" / "results.json").read_text())
    assert results["complete"]
    assert results["run"]["data"]["task_datasets"] == [["DIGITS"], ["DIGITS", "LETTERS"], ["LETTERS"]]
    held_out = {name for name, entry in results["points"][-1]["datasets"].items() if entry["role"] == "eval"}
    assert held_out and held_out <= {"COLOURS", "SHAPES", "TEXTURES"} and results["points"][-1]["GM"] is not None
    _timelit(REPORT, "--plots", "false")
    rows = list(csv.DictReader((workdir / "report" / "my_set" / "runs.csv").read_text().splitlines()))
    assert [(r["init"], r["deploy"], r["complete"]) for r in rows] == [("ema", "ema", "True")]


def test_a_set_without_held_out_sets_runs_and_reports_a_ka_alone(tiny_benchmark, workdir, caplog):
    _timelit("timelit data new --name LETTERS --source letters --out plain")
    _timelit(PREPARE_CSV.replace("my_set", "plain"))
    with caplog.at_level(logging.WARNING, logger="timelit"):
        _timelit("timelit fit --config quickstart.yaml --config plain/fit.yaml", *_fast_fit(tiny_benchmark))
    said = [r.getMessage() for r in caplog.records if "no held-out datasets" in r.getMessage()]
    assert len(said) == 1 and "A_KA alone" in said[0]  # once, at the start
    results = json.loads((workdir / "runs" / "plain" / "results.json").read_text())
    assert results["complete"] and all(set(p) & {"A_KA", "A_ZS", "GM"} == {"A_KA"} for p in results["points"])


def test_first_contact_errors_are_one_line_with_exit_status_2(tiny_benchmark, workdir, capsys):
    _timelit(NEW_FOLDER, "--quickstart", str(tiny_benchmark))
    _timelit(PREPARE_FOLDER, "--skip_bad", "true")
    capsys.readouterr()
    cases = [
        # --manifests forgotten: the shipped FoMo-in-Flux set has no DIGITS
        (PREPARE_FOLDER.replace(" --manifests my_set", ""), "unknown dataset 'DIGITS'", "--manifests DIR"),
        (VERIFY.replace(" --manifests my_set", ""), "holds none of the 63 datasets", "--manifests DIR"),
        (NEW_FOLDER, "dataset 'DIGITS' is already in", "--overwrite true"),
        ("timelit data new --name DIGITS --source nowhere --out other", "--source", "does not exist"),
        ("timelit data new --name FLAT --source digits/train/0 --out other", "no images in <split>/<class>/", "train"),
    ]
    for command, *wanted in cases:
        assert _fails(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("timelit data "), err
        assert all(text in err for text in wanted), err


def _img2dataset_pool(folder: Path, source: Path, order: int | None) -> None:
    """The letters' training images as an img2dataset pool of two shards; `order` shuffles each shard's members, as
    the order in which downloads finish does, None keeps key order."""
    images = sorted((source / "images").glob("train_*.png"))
    folder.mkdir()
    for shard in range(2):
        members = [(f"{shard:05d}{i:04d}", path) for i, path in enumerate(images[shard::2])]
        if order is not None:
            random.Random(order + shard).shuffle(members)
        with TarWriter(str(folder / f"{shard:05d}.tar")) as writer:
            for key, path in members:
                meta = {"url": f"https://example.invalid/{path.name}", "key": key, "status": "success"}
                writer.write({"__key__": key, "png": path.read_bytes(), "txt": f"a letter, {path.stem}", "json": meta})


@pytest.mark.slow
def test_a_pool_downloaded_twice_in_another_order_gives_the_same_run(tiny_benchmark, workdir):
    _timelit("timelit data new --name LETTERS --source letters --out plain --num_tasks 2")
    _timelit(PREPARE_CSV.replace("my_set", "plain"))
    (workdir / "plain" / "pools" / "POOL.yaml").write_text("name: POOL\nnum_samples: null\n")
    figures = []
    for order in (None, 7):
        _img2dataset_pool(workdir / f"pool_{order}", workdir / "letters", order)
        _timelit(f"timelit data prepare --layout pool --source pool_{order} --datasets POOL --manifests plain "
                 "--data_root plain")  # fmt: skip
        run = f"pool_{order}"
        _timelit(
            "timelit fit --config quickstart.yaml --config plain/fit.yaml --data.init_args.pretraining_pool POOL",
            "--data.init_args.mixture", "{pretraining: 0.5, current: 0.25, replay: 0.25}",
            "--trainer.logger.init_args.name", run, *_fast_fit(tiny_benchmark),
        )  # fmt: skip
        points = json.loads((workdir / "runs" / run / "results.json").read_text())["points"]
        figures.append([(p["A_KA"], {name: d["figure"] for name, d in p["datasets"].items()}) for p in points])
    assert len(figures[0]) == 3 and figures[0] == figures[1]


def _pool_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith((".tar", ".index.safetensors"))}


def test_a_pool_copied_twice_from_downloads_in_another_order_gives_identical_files(workdir):
    """The guide's `--pool_copy true`: two downloads whose members lie in other orders (and whose tar headers carry
    other times) prepare to byte-identical shards and index files; indexed in place, only the samples' order agrees."""
    assert POOL_COPY in GUIDE.read_text(), f"docs/own_data.md no longer runs: {POOL_COPY}"
    _timelit("timelit data new --name LETTERS --source letters --out plain")
    (workdir / "plain" / "pools" / "MYPOOL.yaml").write_text("name: MYPOOL\nnum_samples: null\n")
    copied, in_place = [], []
    for order in (None, 7):
        _img2dataset_pool(workdir / f"pool_{order}", workdir / "letters", order)
        command = POOL_COPY.replace("DIR", f"pool_{order}").replace("--manifests my_set", "--manifests plain")
        _timelit(command.replace("--data_root my_set", f"--data_root copied_{order}"))
        copied.append(_pool_files(workdir / f"copied_{order}" / "MYPOOL"))
        _timelit(
            command.replace("--data_root my_set", f"--data_root in_place_{order}").replace(" --pool_copy true", "")
        )
        in_place.append(_pool_files(workdir / f"in_place_{order}" / "MYPOOL"))
    assert (workdir / "pool_None" / "00000.tar").read_bytes() != (workdir / "pool_7" / "00000.tar").read_bytes()
    assert sorted(copied[0]) == ["train-000000.tar", "train-000001.tar", "train.index.safetensors"]
    assert copied[0] == copied[1]
    assert list(in_place[0]) == ["train.index.safetensors"] and in_place[0] != in_place[1]  # offsets into other tars
