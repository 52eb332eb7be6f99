"""The quickstart benchmark's writer: it claims only folders that are empty or hold a benchmark of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from timelit.data.manifest import load_manifests
from timelit.data.synth import benchmark as synth

MICRO = "timelit-micro-ViT"


def small(root: Path, **kwargs) -> Path:
    return synth.synthesize(root, scale=0.02, base_model=MICRO, base_steps=2, **kwargs)


def test_a_folder_of_other_data_is_refused_and_left_as_it_was(tmp_path):
    data = tmp_path / "fomo"
    (data / "CARS196").mkdir(parents=True)
    (data / "CARS196" / "train-000000.tar").write_bytes(b"real data")
    with pytest.raises(FileExistsError, match=r"fomo is not empty \(CARS196\).*synthesize_if_missing: false"):
        synth.synthesize(data)
    with pytest.raises(FileExistsError):
        synth.synthesize(data, force=True)
    assert (data / "CARS196" / "train-000000.tar").read_bytes() == b"real data"
    assert sorted(p.name for p in data.iterdir()) == ["CARS196"]


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "quickstart").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match="quickstart"):
        synth.synthesize(tmp_path / "quickstart")


def test_a_benchmark_is_written_once_and_a_half_written_one_again(tmp_path):
    root = small(tmp_path / "quickstart")
    assert synth.is_ready(root) and not (root / synth.WRITING_FILE).exists()
    assert set(load_manifests(root).datasets) == set(synth.SIZES["quickstart"])
    ready = (root / synth.READY_FILE).stat().st_mtime_ns
    small(root)  # complete: nothing is rewritten
    assert (root / synth.READY_FILE).stat().st_mtime_ns == ready

    # A writer killed half-way leaves its marker and no READY.json: the next call clears the folder and starts over.
    (root / synth.READY_FILE).unlink()
    (root / synth.WRITING_FILE).write_text("")
    (root / "left-over.tmp").write_text("from the killed writer")
    small(root)
    assert synth.is_ready(root) and not (root / "left-over.tmp").exists()


def test_an_unreadable_ready_file_counts_as_not_ready(tmp_path):
    (tmp_path / synth.READY_FILE).write_text('{"format_vers')
    assert not synth.is_ready(tmp_path)
    (tmp_path / synth.READY_FILE).write_text(json.dumps({"format_version": synth.FORMAT_VERSION}))
    assert synth.is_ready(tmp_path)


def _shard_bytes(root: Path, dataset: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((root / dataset).rglob("*.tar"))}


def test_the_generator_is_a_function_of_its_seed_and_sizes_share_their_datasets(tmp_path, monkeypatch):
    # Data only (the base model's training is the same code for every size and seed): the drawing is what varies.
    monkeypatch.setattr("timelit.data.synth.base_model.train_base", lambda *a, **k: {})
    quick = synth.synthesize(tmp_path / "a", scale=0.02)
    again = synth.synthesize(tmp_path / "b", scale=0.02)
    science = synth.synthesize(tmp_path / "c", scale=0.02, size="science")
    other_seed = synth.synthesize(tmp_path / "d", scale=0.02, seed=1)
    for name in ("SHADES", "SHAPES", synth.POOL_NAME):
        assert _shard_bytes(quick, name) == _shard_bytes(again, name) == _shard_bytes(science, name)
        assert _shard_bytes(quick, name) != _shard_bytes(other_seed, name)
    assert set(load_manifests(science).datasets) == set(synth.SIZES["science"]) > set(synth.SIZES["quickstart"])
    stream = json.loads((science / "streams" / "dataset_incremental.json").read_text())
    order = list(dict.fromkeys(entry.split("+++")[0] for entry in stream))  # one run of concepts per dataset
    assert len(order) == 12 and len(stream) == len(set(stream))


def test_captions_of_adaptation_datasets_name_no_held_out_skill():
    """v1's captions named ink colours and shapes, so training on the stream kept rehearsing the held-out sets."""
    import random

    held_out_words = {*synth.draw.COLOURS, *synth.draw.SHAPES, *synth.draw.TEXTURES[1:]}
    for spec in synth.DATASETS:
        if spec.role != "adapt":
            continue
        rng = random.Random(0)
        for classname in spec.classnames or ():
            for _ in range(5):
                _, captions = spec.drawer(classname, rng)
                for caption in captions:
                    assert not held_out_words & set(caption.split()), (spec.name, caption)


def test_every_evaluation_set_holds_at_least_500_test_samples():
    for spec in synth.DATASETS:
        assert spec.test_per_class * len(spec.classnames or (None,)) >= synth.TEST_SAMPLES >= 500, spec.name


@pytest.mark.slow
def test_a_small_base_knows_the_held_out_skills_and_not_the_adaptation_concepts(tmp_path):
    """The benchmark's premise on a tiny size: pretraining on the pool teaches the held-out sets, not the stream."""
    root = synth.synthesize(tmp_path / "q", scale=0.1, base_model=MICRO, base_steps=150)
    report = json.loads((root / synth.READY_FILE).read_text())["zero_shot"]

    def above_chance(role: str) -> float:
        rows = [row for row in report.values() if row["role"] == role]
        return sum(row["figure"] - row["chance"] for row in rows) / len(rows)

    assert above_chance("eval") >= above_chance("adapt") + 20, report
    assert above_chance("adapt") <= 10, report


def test_a_second_writer_waits_for_the_first_instead_of_clearing_its_half_written_benchmark(tmp_path):
    """Two first runs at once (two sweep points): the later one waits, then finds the benchmark complete."""
    root = tmp_path / "quickstart"
    second = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from timelit.data.synth import benchmark as synth\n"
        f"synth.synthesize({str(root)!r}, scale=0.02, base_model={MICRO!r}, base_steps=2)\n"
    )
    with synth._writer_lock(root):  # this test is the first writer
        waiting = subprocess.Popen([sys.executable, "-c", second], stderr=subprocess.PIPE, text=True)
        first_line = waiting.stderr.readline()  # type: ignore[union-attr]
        assert "waiting for it" in first_line, first_line
        synth._write(root, seed=0, scale=0.02, base_model=MICRO, base_steps=2, size="quickstart")
        ready = (root / synth.READY_FILE).stat().st_mtime_ns
    rest = waiting.communicate(timeout=120)[1]
    assert waiting.returncode == 0, rest
    assert "quickstart datasets" not in rest and "base model" not in rest  # it wrote nothing
    assert synth.is_ready(root) and (root / synth.READY_FILE).stat().st_mtime_ns == ready
