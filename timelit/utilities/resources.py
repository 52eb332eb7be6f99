"""Where the files that ship with timelit live: configs, dataset manifests, tiny model configs.

In a wheel, `configs/` and `data_manifests/` are copied to `timelit/_shipped/` (see pyproject.toml); in a source
checkout (editable install, tests) they sit at the repository root beside the package. Both layouts resolve here so
that `timelit fit --config best_in_time.yaml` works from any directory (docs/ARCHITECTURE.md, property 5).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from timelit.utilities.errors import UsageError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # timelit/
MODEL_CONFIGS_DIR = PACKAGE_DIR / "training" / "model_configs"


def _shipped(name: str) -> Path:
    for candidate in (PACKAGE_DIR / "_shipped" / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"timelit's shipped '{name}/' folder is missing: looked in {PACKAGE_DIR / '_shipped' / name} and "
        f"{PACKAGE_DIR.parent / name}. Reinstall timelit (pip install timelit) or run from a source checkout."
    )


def configs_dir() -> Path:
    """The folder of shipped LightningCLI configs (`configs/` in the repository)."""
    return _shipped("configs")


def manifests_dir() -> Path:
    """The folder of shipped dataset manifests, streams and pretraining pools (`data_manifests/`)."""
    return _shipped("data_manifests")


def resolve_config(name: str) -> Path:
    """Find a config given as a path, or as a bare name of a shipped config (with or without `.yaml`).

    A path that exists wins, so a user's own `best_in_time.yaml` in the working directory shadows the shipped one.
    """
    path = Path(name).expanduser()
    if path.is_file():
        return _text_file(path)
    shipped = configs_dir()
    for candidate in (shipped / name, shipped / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    available = sorted(p.relative_to(shipped) for p in shipped.rglob("*.yaml"))
    # A misspelt name is compared with each config's path and its file name, both without `.yaml`.
    spellings = {form: str(p) for p in available for form in (str(p.with_suffix("")), p.stem)}
    close = difflib.get_close_matches(name.removesuffix(".yaml"), list(spellings), n=6)
    suggested = list(dict.fromkeys(spellings[form] for form in close))[:3]
    hint = f"did you mean {' or '.join(suggested)}?" if suggested else f"{shipped / 'README.md'} lists them"
    raise FileNotFoundError(
        f"config '{name}' is neither a file nor one of the {len(available)} configs shipped in {shipped}; {hint}"
    )


def _text_file(path: Path) -> Path:
    """`path`, if it reads as UTF-8 text; a binary file given as a config (a checkpoint, weights) would otherwise fail
    deep inside jsonargparse with a UnicodeDecodeError traceback."""
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            f"config {path} is not a YAML text file (byte {error.start} is not UTF-8); weights go in "
            "--model.init_args.pretrained, checkpoints in --ckpt_path"
        ) from None
    return path
