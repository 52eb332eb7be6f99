"""The quickstart benchmark's writer: it claims only folders that are empty or hold a benchmark of its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from timelit.data import synth
from timelit.data.manifest import load_manifests

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
    assert set(load_manifests(root).datasets) >= {"SHAPES", "COLOURS", "TEXTURES", "SCENES"}
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
