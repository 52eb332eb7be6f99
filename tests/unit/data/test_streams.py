"""Streams: FoMo-in-Flux chunking and errors that name the culprit."""

from __future__ import annotations

import json

import pytest

from timelit.data.manifest import ManifestError
from timelit.data.streams import chunk, load_stream, parse_concepts


def test_chunking_gives_the_first_tasks_one_more_concept():
    sizes = [len(c) for c in chunk(list(range(18381)), 20)]
    assert sizes[0] == 920 and set(sizes[1:]) == {919} and sum(sizes) == 18381


def test_chunks_are_contiguous_and_ordered():
    assert chunk(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e"], ["f", "g"]]


def test_more_tasks_than_concepts_is_an_error():
    with pytest.raises(ValueError, match="cannot cut 2 concepts into 3 tasks"):
        chunk([1, 2], 3)


def test_malformed_and_duplicate_concepts_name_their_position():
    with pytest.raises(ManifestError, match="entry 1"):
        parse_concepts(["A+++x", "no separator"], "s.json")
    with pytest.raises(ManifestError, match="appears twice"):
        parse_concepts(["A+++x", "A+++x"], "s.json")


def test_stream_resolves_to_labels_per_task(tiny_benchmark):
    stream = load_stream("random", tiny_benchmark, 3)
    assert stream.sizes == [30, 30, 29]  # 89 concepts of the 12 adaptation datasets
    assert frozenset().union(*(task.get("DIGITS", frozenset()) for task in stream.labels)) == frozenset(range(10))
    assert "SHAPES" not in stream.datasets  # held-out datasets never enter the stream


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("DIGIT+++one", "unknown dataset 'DIGIT'.*Did you mean 'DIGITS'"),
        ("DIGITS+++eleven", "has no class 'eleven'"),
        ("SHAPES+++circle", "held-out dataset 'SHAPES'"),
    ],
)
def test_stream_with_unknown_names_is_rejected(tiny_benchmark, tmp_path, entry, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(["DIGITS+++one", entry]))
    with pytest.raises(ManifestError, match=message):
        load_stream(str(path), tiny_benchmark, 1)


def test_dataset_boundaries_make_one_task_per_dataset(tiny_benchmark):
    stream = load_stream("dataset_incremental", tiny_benchmark, 12, boundaries="dataset")
    assert [sorted(task) for task in stream.labels] == [[name] for name in stream.datasets]
    grouped = load_stream("dataset_incremental", tiny_benchmark, 4, boundaries="dataset")
    names = stream.datasets
    assert [sorted(task) for task in grouped.labels] == [sorted(names[i : i + 3]) for i in (0, 3, 6, 9)]
    with pytest.raises(ManifestError, match=r"12 dataset\(s\).*into 5 tasks.*one of \[1, 2, 3, 4, 6, 12\]"):
        load_stream("dataset_incremental", tiny_benchmark, 5, boundaries="dataset")
