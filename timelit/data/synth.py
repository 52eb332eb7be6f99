"""The embedded quickstart benchmark: a small procedural FoMo-in-Flux in the real shard and manifest format.

    timelit data synth --out ~/.cache/timelit/quickstart

Why it looks like this. In FoMo-in-Flux the adaptation datasets hold concepts the base model knows badly (absent or
rare in its pretraining data, or finer-grained), so A_KA starts low and rises with training; the held-out datasets
are ones the base knows, so that forgetting shows as a fall in A_ZS. The quickstart copies that structure:

* a pretraining pool of image-caption pairs about shapes, eight colours and six textures, on which a tiny CLIP is
  trained from scratch (seeded; `synth_base.py`) and cached as `base_model.safetensors`;
* held-out datasets drawn from that same world (SHAPES, COLOURS, TEXTURES, and SCENES for retrieval), which the base
  model recognises zero-shot;
* adaptation datasets of concepts the pool never shows: digits, letters, arrow directions, object counts, positions,
  finer colour shades and spatial relations (RELATIONS, a retrieval set with classes, like FSCOCO).

Captions, prompt templates, class lists, a random stream and the pool are written exactly as the real benchmark's
manifests and shards are, so the quickstart exercises the same code as a FoMo-in-Flux run.
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image, ImageDraw
from tqdm import tqdm

from timelit.atomic import write_text
from timelit.data import synth_draw as draw
from timelit.data.shards import ShardWriter, sample_key

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGE_SIZE = 32
POOL_NAME = "SYNTH_POOL"
READY_FILE = "READY.json"
# Written before anything else, so that a folder holding it (and no READY.json) is a half-written benchmark of ours
# that may be cleared and written again; a folder holding neither is someone's data and is never touched.
WRITING_FILE = ".timelit-synth-writing"
BASE_MODEL_FILE = "base_model.safetensors"

Drawer = Callable[[str | None, random.Random], tuple[Image.Image, list[str]]]


def _background(rng: random.Random, textured: float = 0.3) -> tuple[Image.Image, tuple[int, int, int], str]:
    """A plain (mostly) or textured background in muted colours, and its texture name."""
    base = draw.jitter(rng.choice(list(draw.COLOURS.values())), rng, 20)
    name = rng.choice(draw.TEXTURES[1:]) if rng.random() < textured else "plain"
    ink = draw.jitter(tuple((c + 128) % 256 for c in base), rng, 20) if name != "plain" else base  # type: ignore[arg-type]
    image = draw.texture(name, rng, base, tuple((2 * b + i) // 3 for b, i in zip(base, ink)))  # type: ignore[arg-type]
    return image, base, name


def _colour_name(rgb: tuple[int, int, int]) -> str:
    return min(draw.COLOURS, key=lambda n: sum((a - b) ** 2 for a, b in zip(draw.COLOURS[n], rgb)))


def _ink(rng: random.Random, base: tuple[int, int, int]) -> tuple[tuple[int, int, int], str]:
    name = rng.choice([n for n, c in draw.COLOURS.items() if sum(abs(a - b) for a, b in zip(c, base)) > 220])
    return draw.jitter(draw.COLOURS[name], rng), name


# --------------------------------------------------------------------------- the pretraining world


def scene(rng: random.Random) -> tuple[Image.Image, dict[str, str]]:
    """One coloured shape on a background texture: the pool's main kind of image, and the SCENES held-out set."""
    image, base, texture = _background(rng, textured=0.6)
    ink, colour = _ink(rng, base)
    shape = rng.choice(draw.SHAPES)
    radius = rng.uniform(12, 20)
    where = (rng.uniform(radius + 4, 64 - radius - 4), rng.uniform(radius + 4, 64 - radius - 4))
    draw.shape(ImageDraw.Draw(image), shape, *where, radius, ink, rng)
    return image, {"shape": shape, "colour": colour, "texture": texture}


def pool_sample(rng: random.Random) -> tuple[Image.Image, str]:
    """Pretraining pairs: scenes, textures and colour fields, captioned with the pool's vocabulary."""
    kind = rng.random()
    if kind < 0.55:
        image, facts = scene(rng)
        templates = [
            "a photo of a {colour} {shape} on a {texture} background",
            "a {colour} {shape} shape",
            "a photo of a {shape} shape",
            "a {shape} that is {colour}",
            "a {texture} background with a {colour} {shape}",
        ]
        return image, rng.choice(templates).format(**facts)
    if kind < 0.8:
        texture = rng.choice(draw.TEXTURES[1:])
        base = draw.jitter(rng.choice(list(draw.COLOURS.values())), rng, 15)
        ink, colour = _ink(rng, base)
        image = draw.texture(texture, rng, base, ink)
        return image, rng.choice(["a photo of a {t} texture", "a {c} and {b} {t} pattern", "{t} texture"]).format(
            t=texture, c=colour, b=_colour_name(base)
        )
    colour = rng.choice(list(draw.COLOURS))
    image, _ = draw.canvas(draw.jitter(draw.COLOURS[colour], rng, 18))
    return image, rng.choice(["a photo of the colour {c}", "a plain {c} image", "the colour {c}"]).format(c=colour)


def _draw_shapes(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    image, base, _ = _background(rng)
    ink, colour = _ink(rng, base)
    radius = rng.uniform(12, 20)
    draw.shape(ImageDraw.Draw(image), name, rng.uniform(24, 40), rng.uniform(24, 40), radius, ink, rng)  # type: ignore[arg-type]
    return image, [f"a photo of a {colour} {name} shape"]


def _draw_colours(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    image, _ = draw.canvas(draw.jitter(draw.COLOURS[name], rng, 25))  # type: ignore[index]
    return image, [f"a photo of the colour {name}"]


def _draw_textures(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    base = draw.jitter(rng.choice(list(draw.COLOURS.values())), rng, 15)
    ink, _ = _ink(rng, base)
    return draw.texture(name, rng, base, ink), [f"a photo of a {name} texture"]  # type: ignore[arg-type]


def _draw_scenes(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    image, facts = scene(rng)
    return image, [
        "a {colour} {shape} on a {texture} background".format(**facts),
        "a {texture} background with a {colour} {shape}".format(**facts),
    ]


# --------------------------------------------------------------------------- concepts the pool never shows


def _glyph(painter: Callable, rng: random.Random) -> tuple[Image.Image, str]:
    image, base, _ = _background(rng, textured=0.15)
    ink, colour = _ink(rng, base)
    painter(ImageDraw.Draw(image), ink)
    return image, colour


def _draw_digits(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    value = DIGIT_NAMES.index(name)  # type: ignore[arg-type]
    image, colour = _glyph(lambda d, ink: draw.digit(d, value, ink, rng), rng)
    return image, [f"a photo of the digit {name}, drawn in {colour}"]


def _draw_letters(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    image, colour = _glyph(lambda d, ink: draw.letter(d, name, ink, rng), rng)  # type: ignore[arg-type]
    return image, [f"a photo of the letter {name} in {colour}"]


def _draw_arrows(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    image, colour = _glyph(lambda d, ink: draw.arrow(d, name, ink, rng), rng)  # type: ignore[arg-type]
    return image, [f"a photo of a {colour} arrow pointing {name}"]


def _place(rng: random.Random, count: int, radius: float) -> list[tuple[float, float]]:
    spots: list[tuple[float, float]] = []
    while len(spots) < count:
        x, y = rng.uniform(radius + 2, 62 - radius), rng.uniform(radius + 2, 62 - radius)
        if all((x - a) ** 2 + (y - b) ** 2 > (2.3 * radius) ** 2 for a, b in spots):
            spots.append((x, y))
    return spots


def _draw_counts(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    count = COUNT_NAMES.index(name) + 1  # type: ignore[arg-type]
    shape = rng.choice(["circle", "square", "diamond"])

    def paint(d, ink):
        for x, y in _place(rng, count, 6.0):
            draw.shape(d, shape, x, y, 6.0, ink, rng)

    image, colour = _glyph(paint, rng)
    return image, [f"a photo of {name} {colour} {shape}s" if count > 1 else f"a photo of one {colour} {shape}"]


POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right", "centre")
_POSITION_CENTRES = {
    "top left": (16, 16),
    "top right": (48, 16),
    "bottom left": (16, 48),
    "bottom right": (48, 48),
    "centre": (32, 32),
}


def _draw_positions(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    cx, cy = _POSITION_CENTRES[name]  # type: ignore[index]
    shape = rng.choice(draw.SHAPES)
    image, colour = _glyph(
        lambda d, ink: draw.shape(d, shape, cx + rng.uniform(-4, 4), cy + rng.uniform(-4, 4), 9.0, ink, rng), rng
    )
    return image, [f"a photo of a {colour} {shape} at the {name}"]


def _draw_shades(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    shade = draw.jitter(draw.SHADES[name], rng, 10)  # type: ignore[index]
    image, _ = draw.canvas(draw.jitter(rng.choice([(235, 235, 235), (25, 25, 25), (128, 128, 128)]), rng, 10))
    shape = rng.choice(draw.SHAPES[:-1])
    draw.shape(ImageDraw.Draw(image), shape, rng.uniform(26, 38), rng.uniform(26, 38), rng.uniform(16, 22), shade, rng)
    return image, [f"a photo of a {shape} coloured {name}"]


RELATION_NAMES = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _draw_relations(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    image, base, _ = _background(rng, textured=0.0)
    (ink_a, colour_a), (ink_b, colour_b) = _ink(rng, base), _ink(rng, base)
    shape_a, shape_b = rng.sample(draw.SHAPES[:-1], 2)
    along, across = rng.uniform(14, 20), rng.uniform(22, 42)
    first, second = (along, across), (64 - along, across)  # first is left of second
    if name in ("above", "below"):
        first, second = (across, along), (across, 64 - along)  # first is above second
    a_pos, b_pos = (first, second) if name in ("left of", "above") else (second, first)
    d = ImageDraw.Draw(image)
    draw.shape(d, shape_a, *a_pos, 10.0, ink_a, rng)
    draw.shape(d, shape_b, *b_pos, 10.0, ink_b, rng)
    return image, [
        f"a {colour_a} {shape_a} {name} a {colour_b} {shape_b}",
        f"a {colour_b} {shape_b} {_INVERSE[name]} a {colour_a} {shape_a}",  # type: ignore[index]
    ]


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNT_NAMES = ("one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class SynthDataset:
    """One procedural dataset: its manifest fields, its drawer and its size per class (at scale 1)."""

    name: str
    role: str
    task: str
    classnames: tuple[str, ...] | None
    prompt: str
    drawer: Drawer
    train_per_class: int
    test_per_class: int


DATASETS = (
    SynthDataset("DIGITS", "adapt", "classification", DIGIT_NAMES, "a photo of the digit {}.", _draw_digits, 80, 30),
    SynthDataset(
        "LETTERS",
        "adapt",
        "classification",
        tuple(draw.LETTER_STROKES),
        "a photo of the letter {}.",
        _draw_letters,
        60,
        25,
    ),
    SynthDataset(
        "ARROWS",
        "adapt",
        "classification",
        tuple(draw.ARROW_DIRECTIONS),
        "a photo of an arrow pointing {}.",
        _draw_arrows,
        70,
        30,
    ),
    SynthDataset("COUNTS", "adapt", "classification", COUNT_NAMES, "a photo of {} objects.", _draw_counts, 80, 40),
    SynthDataset(
        "POSITIONS", "adapt", "classification", POSITION_NAMES, "a photo of a shape at the {}.", _draw_positions, 80, 60
    ),
    SynthDataset(
        "SHADES",
        "adapt",
        "classification",
        tuple(draw.SHADES),
        "a photo of something coloured {}.",
        _draw_shades,
        60,
        25,
    ),
    SynthDataset(
        "RELATIONS", "adapt", "retrieval", RELATION_NAMES, "a photo of one shape {} another.", _draw_relations, 150, 80
    ),
    SynthDataset("SHAPES", "eval", "classification", draw.SHAPES, "a photo of a {} shape.", _draw_shapes, 0, 40),
    SynthDataset(
        "COLOURS", "eval", "classification", tuple(draw.COLOURS), "a photo of the colour {}.", _draw_colours, 0, 40
    ),
    SynthDataset(
        "TEXTURES", "eval", "classification", draw.TEXTURES, "a photo of a {} texture.", _draw_textures, 0, 50
    ),
    SynthDataset("SCENES", "eval", "retrieval", None, "{}", _draw_scenes, 0, 320),
)
POOL_SIZE = 8000


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    draw.finish(image, IMAGE_SIZE).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(spec: SynthDataset, split: str, per_class: int, root: Path, rng: random.Random) -> int:
    classes = spec.classnames or (None,)
    with ShardWriter(root / spec.name, split, samples_per_shard=500) as writer:
        number = 0
        for _ in range(per_class):
            for label, classname in enumerate(classes):
                image, captions = spec.drawer(classname, rng)
                meta = {"dataset": spec.name, "split": split, "label": label if classname else number}
                if classname:
                    meta["classname"] = classname
                if len(captions) > 1:
                    meta["captions"] = captions
                key = sample_key(spec.name, split, number)
                writer.add(key, _encode_png(image), "png", captions[0], meta)
                number += 1
    return number


def _write_manifest(spec: SynthDataset, counts: dict[str, int], root: Path) -> None:
    manifest = {
        "name": spec.name,
        "role": spec.role,
        "task": spec.task,
        "classnames": f"../classnames/{spec.name}.json" if spec.classnames else None,
        "num_classes": len(spec.classnames) if spec.classnames else None,
        "prompt_templates": [spec.prompt],
        "splits": {split: {"num_samples": count} for split, count in counts.items()},
        "source": {"generator": "timelit.data.synth", "format_version": FORMAT_VERSION},
        "license": "MIT (generated by timelit)",
    }
    (root / "datasets").mkdir(exist_ok=True)
    (root / "datasets" / f"{spec.name}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    if spec.classnames:
        (root / "classnames").mkdir(exist_ok=True)
        (root / "classnames" / f"{spec.name}.json").write_text(json.dumps(list(spec.classnames), indent=1))


def _write_pool(root: Path, size: int, rng: random.Random) -> None:
    with ShardWriter(root / POOL_NAME, "train", samples_per_shard=1000) as writer:
        for number in range(size):
            image, caption = pool_sample(rng)
            writer.add(
                sample_key(POOL_NAME, "train", number), _encode_png(image), "png", caption, {"dataset": POOL_NAME}
            )
    (root / "pools").mkdir(exist_ok=True)
    pool = {"name": POOL_NAME, "num_samples": size, "source": {"generator": "timelit.data.synth"}, "license": "MIT"}
    (root / "pools" / f"{POOL_NAME}.yaml").write_text(yaml.safe_dump(pool, sort_keys=False))


def _write_streams(root: Path, seed: int) -> None:
    concepts = [f"{s.name}+++{c}" for s in DATASETS if s.role == "adapt" for c in s.classnames or ()]
    (root / "streams").mkdir(exist_ok=True)
    (root / "streams" / "dataset_incremental.json").write_text(json.dumps(concepts, indent=1))
    random.Random(seed).shuffle(concepts)
    (root / "streams" / "random.json").write_text(json.dumps(concepts, indent=1))


def is_ready(root: str | Path) -> bool:
    marker = Path(root).expanduser() / READY_FILE
    try:
        return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION
    except (OSError, ValueError, AttributeError):
        return False  # absent, unreadable or not ours to trust: written again


def _claim(root: Path) -> None:
    """Make `root` an empty folder for a benchmark, clearing it only if what it holds is one of ours.

    `data_root` is a setting a user also points at real data: quickstart.yaml with an overridden `data_root` (and
    its `synthesize_if_missing: true`), or `timelit data synth --out` with a typo, must never empty that folder.
    """
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"the quickstart benchmark's folder {root} is a file")
    entries = sorted(root.iterdir()) if root.exists() else []
    ours = (root / READY_FILE).is_file() or (root / WRITING_FILE).is_file()
    if entries and not ours:
        shown = ", ".join(entry.name for entry in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(
            f"{root} is not empty ({shown}) and holds no quickstart benchmark ({READY_FILE} or {WRITING_FILE}): "
            "refusing to write the quickstart benchmark over it. Choose an empty or new folder, or, if this folder "
            "holds real data that a config should read, set `data.init_args.synthesize_if_missing: false`"
        )
    for child in entries:
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / WRITING_FILE).write_text("the quickstart benchmark is being written here; READY.json marks it done\n")


def synthesize(
    root: str | Path,
    seed: int = 0,
    scale: float = 1.0,
    base_model: str = "timelit-tiny-ViT",
    base_steps: int = 300,
    force: bool = False,
) -> Path:
    """Write the quickstart benchmark (shards, manifests, stream, pool) and train its base model into `root`.

    Does nothing when `root` already holds a complete benchmark (`READY.json`); a half-written one is removed and
    written again. A folder that holds anything else is refused, never cleared (`_claim`). `scale` multiplies every
    dataset's size (tests use a small one).
    """
    root = Path(root).expanduser()
    if is_ready(root) and not force:
        return root
    _claim(root)
    rng = random.Random(seed)
    splits = [
        (spec, split, max(1, round(n * scale)))
        for spec in DATASETS
        for split, n in (("train", spec.train_per_class), ("test", spec.test_per_class))
        if n
    ]
    for spec, split, per_class in tqdm(splits, desc="quickstart datasets", unit="split"):
        count = _write_split(spec, split, per_class, root, rng)
        manifest_path = root / "datasets" / f"{spec.name}.yaml"
        counts = yaml.safe_load(manifest_path.read_text())["splits"] if manifest_path.exists() else {}
        counts = {name: info["num_samples"] for name, info in counts.items()} | {split: count}
        _write_manifest(spec, counts, root)
    _write_pool(root, max(64, round(POOL_SIZE * scale)), rng)
    _write_streams(root, seed)
    from timelit.data.synth_base import train_base

    report = train_base(root, model_name=base_model, steps=base_steps, seed=seed)
    write_text(  # atomic: a kill mid-write must not leave a READY.json that is_ready cannot parse
        root / READY_FILE,
        json.dumps(
            {"format_version": FORMAT_VERSION, "seed": seed, "scale": scale, "base_model": base_model, **report},
            indent=1,
        ),
    )
    (root / WRITING_FILE).unlink()
    return root
