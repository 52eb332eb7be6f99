"""`timelit data verify`: a prepared data root passes; each kind of damage is named precisely, all at once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from webdataset import TarWriter

from timelit.commands.data import verify_command
from timelit.data.prepare.options import PrepareOptions
from timelit.data.prepare.run import prepare
from timelit.data.prepare.verify import format_checks, verify
from timelit.data.shards import ShardIndex, index_path

CLASSES = ["ant", "bee", "cow"]


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def prepared(tmp_path: Path) -> dict[str, Path]:
    """Two prepared datasets (an adaptation set with train/test, a held-out one) from an ImageFolder source; the
    image `train/bee/1.png` holds bytes that are no image, stored unchecked (`decode=False`) as if damaged after
    prepare, for `verify --decode` to find."""
    manifests, source, data = tmp_path / "manifests", tmp_path / "source", tmp_path / "data"
    (manifests / "datasets").mkdir(parents=True)
    (manifests / "classnames").mkdir()
    for name, role, splits in (("ADAPT", "adapt", ("train", "test")), ("HELD", "eval", ("test",))):
        manifest = {
            "name": name,
            "role": role,
            "task": "classification",
            "classnames": f"../classnames/{name}.json",
            "num_classes": len(CLASSES),
            "prompt_templates": ["a photo of a {}."],
            "splits": {s: {"num_samples": None} for s in splits},
            "source": {"test": "tests/unit/data/prepare/test_verify.py"},
            "license": "test data",
        }
        (manifests / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(manifest))
        (manifests / "classnames" / f"{name}.json").write_text(json.dumps(CLASSES))
        for split in splits:
            for label, cls in enumerate(CLASSES):
                for i in range(3):
                    path = source / name / split / cls / f"{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(_png((label * 80, i * 60, 9)))
    (source / "ADAPT" / "train" / "bee" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image at all")
    for name in ("ADAPT", "HELD"):
        prepare(
            PrepareOptions(
                str(source / name),
                data,
                layout="imagefolder",
                datasets=[name],
                manifests=manifests,
                samples_per_shard=4,
                workers=0,
                decode=False,
            ),
            progress=False,
        )
    return {"manifests": manifests, "data": data, "root": tmp_path}


def _by_split(checks) -> dict[str, object]:
    return {f"{c.dataset}/{c.split}": c for c in checks}


def _set_count(manifests: Path, name: str, split: str, count: int) -> None:
    path = manifests / "datasets" / f"{name}.yaml"
    manifest = yaml.safe_load(path.read_text())
    manifest["splits"][split]["num_samples"] = count
    path.write_text(yaml.safe_dump(manifest))


def test_a_prepared_root_passes_and_prints_one_table(prepared, capsys):
    _set_count(prepared["manifests"], "ADAPT", "train", 9)
    verify_command(str(prepared["data"]), str(prepared["manifests"]))
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["dataset", "role", "split", "samples", "expected", "shards", "status"]
    assert "ADAPT                 adapt  train           9         9       3  ok" in out
    assert "all 3 split(s) ok" in out


def test_a_corrupt_image_is_found_only_when_decoding(prepared):
    assert not any(c.problems for c in verify(prepared["data"], prepared["manifests"]))
    checks = _by_split(verify(prepared["data"], prepared["manifests"], decode=True))
    (problem,) = checks["ADAPT/train"].problems
    assert problem.startswith("1 of 9 decoded samples are corrupt") and "ADAPT/train/" in problem
    assert "source 'bee/1.png'" in problem  # the file the user prepared, not only timelit's shard key
    assert checks["ADAPT/train"].status == "BROKEN" and checks["HELD/test"].status == "ok"


def test_decoding_a_fraction_reads_that_share_of_each_split(prepared):
    checks = _by_split(verify(prepared["data"], prepared["manifests"], decode=0.5))
    assert checks["HELD/test"].decoded == 5 and checks["ADAPT/train"].decoded == 5


def test_a_missing_dataset_exits_non_zero_and_names_it(prepared, capsys):
    manifest = yaml.safe_load((prepared["manifests"] / "datasets" / "HELD.yaml").read_text())
    manifest["name"] = "NEVER"
    (prepared["manifests"] / "datasets" / "NEVER.yaml").write_text(yaml.safe_dump(manifest))
    (prepared["manifests"] / "classnames" / "NEVER.json").write_text(json.dumps(CLASSES))
    with pytest.raises(SystemExit) as exited:
        verify_command(str(prepared["data"]), str(prepared["manifests"]))
    assert exited.value.code == 1
    out = capsys.readouterr().out
    assert "NEVER                 eval   test            -         -       -  MISSING" in out
    assert f"NEVER/test: not prepared: no folder {prepared['data'] / 'NEVER'}" in out


def test_a_missing_and_a_truncated_shard_are_both_reported(prepared):
    folder = prepared["data"] / "ADAPT"
    (folder / "test-000001.tar").unlink()
    shard = folder / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    checks = _by_split(verify(prepared["data"], prepared["manifests"]))
    assert checks["ADAPT/test"].problems == [f"shard {folder / 'test-000001.tar'} is missing (4 samples)"]
    (truncated,) = checks["ADAPT/train"].problems
    assert truncated.startswith(f"shard {shard} ends at byte 1500 of ")
    text = format_checks(list(checks.values()))
    assert "2 problem(s) in 2 of 3 split(s)" in text


def test_a_shard_cut_after_its_last_sample_is_still_incomplete(prepared):
    index = ShardIndex.load(prepared["data"] / "HELD", "test")
    last = index.shard == 0
    end = int((index.offset[last] + index.length[last]).max())
    shard = prepared["data"] / "HELD" / "test-000000.tar"
    shard.write_bytes(shard.read_bytes()[:end])
    (problem,) = _by_split(verify(prepared["data"], prepared["manifests"]))["HELD/test"].problems
    assert "lacks the end-of-archive blocks" in problem


def test_a_count_that_differs_from_the_manifest_fails(prepared):
    _set_count(prepared["manifests"], "HELD", "test", 10)
    check = _by_split(verify(prepared["data"], prepared["manifests"]))["HELD/test"]
    assert check.problems == ["9 samples, the manifest states 10"]


def test_labels_outside_the_class_list_fail(prepared):
    (prepared["manifests"] / "classnames" / "HELD.json").write_text(json.dumps(CLASSES[:2]))
    manifest = prepared["manifests"] / "datasets" / "HELD.yaml"
    manifest.write_text(manifest.read_text().replace("num_classes: 3", "num_classes: 2"))
    (problem,) = _by_split(verify(prepared["data"], prepared["manifests"]))["HELD/test"].problems
    assert problem.startswith("3 label(s) outside 0..1")


def test_an_interrupted_prepare_is_told_apart_from_a_missing_one(prepared):
    index_path(prepared["data"] / "ADAPT", "train").unlink()
    (prepared["data"] / "ADAPT" / "test-000009.tar.tmp").write_bytes(b"partial")
    checks = _by_split(verify(prepared["data"], prepared["manifests"]))
    (problem,) = checks["ADAPT/train"].problems
    assert "an interrupted prepare" in problem and "beside 3 shard(s)" in problem
    assert checks["ADAPT/test"].problems == [] and "interrupted prepare" in checks["ADAPT/test"].warnings[0]


def test_only_the_named_datasets_are_checked(prepared):
    checks = verify(prepared["data"], prepared["manifests"], datasets=["HELD"])
    assert [(c.dataset, c.split) for c in checks] == [("HELD", "test")]


def _pool(prepared: dict[str, Path], count: int | None, pairs: int) -> None:
    (prepared["manifests"] / "pools").mkdir(exist_ok=True)
    (prepared["manifests"] / "pools" / "POOL.yaml").write_text(yaml.safe_dump({"name": "POOL", "num_samples": count}))
    folder = prepared["root"] / "img2dataset"
    folder.mkdir()
    with TarWriter(str(folder / "00000.tar")) as writer:
        for i in range(pairs):
            writer.write({"__key__": f"{i:09d}", "jpg": _png((i, i, i)), "txt": f"pair {i}", "json": {"i": i}})
    prepare(
        PrepareOptions(str(folder), prepared["data"], layout="pool", datasets=["POOL"], manifests=prepared["manifests"])
    )


def test_pools_are_optional_unless_named_and_their_counts_only_warn(prepared):
    (prepared["manifests"] / "pools").mkdir()
    (prepared["manifests"] / "pools" / "POOL.yaml").write_text(yaml.safe_dump({"name": "POOL", "num_samples": 5}))
    assert "POOL" not in {c.dataset for c in verify(prepared["data"], prepared["manifests"])}
    named = _by_split(verify(prepared["data"], prepared["manifests"], pools=["POOL"]))["POOL/train"]
    assert named.status == "MISSING"
    (prepared["manifests"] / "pools" / "POOL.yaml").unlink()
    _pool(prepared, 5, 4)
    check = _by_split(verify(prepared["data"], prepared["manifests"], decode=True))["POOL/train"]
    assert check.problems == [] and check.warnings == ["4 samples, the manifest states 5"] and check.decoded == 4
    assert check.status == "ok (warnings)"
