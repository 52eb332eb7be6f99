"""`timelit merge` end to end (timelit/commands/merge.py over merging/weight_files.py): safetensors and Lightning
checkpoints in and out, through jsonargparse."""

from __future__ import annotations

import json
import pickle

import jsonargparse
import lightning
import pytest
import torch

from timelit.commands.merge import merge_argv, merge_command
from timelit.merging import ExpertStore, load_weights, merge, read_metadata
from timelit.merging.safetensors_io import file_sha256
from timelit.utilities.errors import UnreadableFileError


def _cli(*args: str) -> object:
    return jsonargparse.CLI({"merge": merge_command}, as_positional=False, args=["merge", *args])


def test_merging_a_store_into_safetensors_records_provenance(tmp_path, clip_base, perturbed, write):
    experts = perturbed(clip_base, 3)
    store = ExpertStore(tmp_path / "experts")
    for task, expert in enumerate(experts):
        store.add(task, expert)
    base = write("base", clip_base)
    out = tmp_path / "merged.safetensors"
    hparams = '{"k": 0.3, "scope": "tower"}'
    _cli(
        "--base",
        str(base),
        "--experts",
        str(store.directory),
        "--method",
        "ties",
        "--hparams",
        hparams,
        "--out",
        str(out),
    )
    expected = merge(clip_base, experts, "ties", k=0.3, scope="tower")
    merged = load_weights(out)
    assert all(torch.equal(merged[key], expected[key]) for key in clip_base)
    metadata = read_metadata(out)
    assert metadata["timelit.method"] == "ties"
    # The values used, defaults resolved (lam 1.0), not the null defaults of the dataclass.
    assert json.loads(metadata["timelit.hparams"]) == {
        "skip": [],
        "lam": 1.0,
        "scope": "tower",
        "lines": False,
        "k": 0.3,
    }
    assert [e["sha256"] for e in json.loads(metadata["timelit.experts"])] == [file_sha256(p) for p in store.paths]
    assert json.loads(metadata["timelit.base"])["sha256"] == file_sha256(base)


def test_lightning_checkpoints_in_and_out(tmp_path, clip_base, perturbed, write):
    older, newer = perturbed(clip_base, 2)
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in clip_base.items()} | {"loss.scale": torch.ones(1)}}
    torch.save(checkpoint, tmp_path / "base.ckpt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in newer.items()}}, tmp_path / "newer.ckpt")
    out = tmp_path / "ema.ckpt"
    experts = f"[{write('older', older)}, {tmp_path / 'newer.ckpt'}]"
    _cli("--base", str(tmp_path / "base.ckpt"), "--experts", experts, "--method", "interpolation", "--out", str(out))
    saved = torch.load(out, weights_only=True, map_location="cpu")
    assert saved["pytorch-lightning_version"] == lightning.__version__
    assert json.loads(saved["timelit_merge"]["timelit.hparams"]) == {"skip": [], "w": 0.5}
    expected = merge(clip_base, [older, newer], "interpolation", w=0.5)
    assert saved["state_dict"].keys() == {f"model.{k}" for k in clip_base}
    assert all(torch.equal(saved["state_dict"][f"model.{k}"], expected[k]) for k in clip_base)


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, clip_base, write):
    class Payload:
        def __reduce__(self):  # what a malicious checkpoint does to run code at load time
            return (print, ("pwned",))

    torch.save({"state_dict": {f"model.{k}": v for k, v in clip_base.items()}, "x": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(
        UnreadableFileError, match=r"evil\.ckpt: holds objects that timelit does not unpickle"
    ) as refused:
        merge_command(tmp_path / "evil.ckpt", write("e", clip_base), "average", tmp_path / "out.safetensors")
    assert isinstance(refused.value.__cause__, pickle.UnpicklingError)  # torch's weights_only=True refused it
    assert "GLOBAL print" in str(refused.value)


def test_a_checkpoint_of_another_model_is_named_by_its_file(tmp_path, clip_base, write):
    other = {key: value for key, value in clip_base.items() if key != "visual.proj"}
    torch.save({"state_dict": {f"model.{k}": v for k, v in other.items()}}, tmp_path / "other.ckpt")
    torch.save({"state_dict": {f"model.{k}": v for k, v in clip_base.items()}}, tmp_path / "base.ckpt")
    expert = write("e", clip_base)
    with pytest.raises(
        ValueError, match=r"other\.ckpt: keys differ from the base .*base\.ckpt: missing \['visual.proj'\]"
    ):
        merge_command(tmp_path / "base.ckpt", [expert, tmp_path / "other.ckpt"], "average", tmp_path / "o.safetensors")


def test_a_bad_hyperparameter_fails_before_any_weights_are_read(tmp_path):
    with pytest.raises(ValueError, match="unknown hyperparameter 'kk' for 'ties'; did you mean 'k'"):
        merge_command(tmp_path / "missing.safetensors", [], "ties", tmp_path / "o.safetensors", hparams={"kk": 0.2})
    with pytest.raises(ValueError, match=r"must end in \.safetensors or \.ckpt"):
        merge_command(tmp_path / "missing.safetensors", [], "ties", tmp_path / "o.pt")


def test_help_shows_every_option_with_its_documentation(capsys):
    with pytest.raises(SystemExit):
        _cli("--help")
    text = capsys.readouterr().out
    for option in ("--base", "--experts", "--method", "--out", "--hparams", "--chunk_size", "--progress"):
        assert option in text
    assert "the base weights theta_0" in text and "breadcrumbs_ties" in text
    assert all(method in text for method in ("model_stock", "tall_masks", "consensus_ties", "random"))
    assert all(method in text for method in ("tsv", "iso_c", "iso_cts", "opcm"))


def test_experts_given_as_several_paths_or_a_directory(tmp_path, clip_base, perturbed, write, monkeypatch):
    """`timelit merge --experts a b c` (what a shell glob expands to) and `--experts DIR` through timelit's own CLI."""
    from timelit.commands.cli import main

    monkeypatch.chdir(tmp_path)
    experts = perturbed(clip_base, 3)
    store = ExpertStore(tmp_path / "experts")
    for task, expert in enumerate(experts):
        store.add(task, expert)
    base, expected = write("base", clip_base), merge(clip_base, experts, "model_stock")
    common = ["merge", "--base", str(base), "--method", "model_stock", "--progress", "false", "--out"]
    main([*common, "globbed.safetensors", "--experts", *map(str, store.paths)])
    main([*common, "directory.safetensors", "--experts", str(store.directory)])
    for name in ("globbed", "directory"):
        merged = load_weights(tmp_path / f"{name}.safetensors")
        assert all(torch.equal(merged[key], expected[key]) for key in clip_base)
        recorded = json.loads(read_metadata(tmp_path / f"{name}.safetensors")["timelit.experts"])
        assert [entry["sha256"] for entry in recorded] == [file_sha256(path) for path in store.paths]


def test_merge_argv_gathers_the_paths_after_experts():
    assert merge_argv(["--experts", "a", "b c", "--method", "ties"]) == ['--experts=["a", "b c"]', "--method", "ties"]
    assert merge_argv(["--method", "ties", "--experts", "a", "b"]) == ["--method", "ties", '--experts=["a", "b"]']
    for unchanged in (["--experts", "runs/x/experts"], ["--experts", "[a, b]", "--out", "o"], ["--experts=a"]):
        assert merge_argv(unchanged) == unchanged
