"""The embedded quickstart benchmark: a small procedural FoMo-in-Flux in the real shard and manifest format.

    timelit data synth --out ~/.cache/timelit/quickstart                 # 4 adaptation datasets
    timelit data synth --out ~/.cache/timelit/science --size science    # 12, for the study (docs/science.md)

Version 2 is built so that the TIME protocols can be told apart on it (docs/science.md has the criteria and what they
measured). As in FoMo-in-Flux:

* a pretraining pool of captioned images (shapes, eight colours, six textures) on which a tiny CLIP is trained from
  scratch (seeded; `base_model.py`) and cached as `base_model.safetensors`: it stands for the base model's web-scale
  pretraining data, and replaying it is the pipeline's pretraining replay;
* held-out datasets of skills that pretraining gives (SHAPES, COLOURS, TEXTURES): the base scores ~88 % on them, so
  forgetting shows as a fall of A_ZS;
* adaptation datasets of concepts the pool never names, next to chance zero-shot: mostly fine-grained ones (invented
  names for colour and shape combinations, flags, patterns, shades: learnable within a small budget, and learning
  them re-uses the features the held-out sets need), and in the science size also digits, letters, arrows, counts,
  lines, sizes, bar charts and a retrieval set (RELATIONS). Their captions name only the concept they teach, never
  a colour, shape or texture word (v1's did, which rehearsed the held-out skills and hid forgetting);
* a dataset-incremental stream (`dataset_incremental`: one dataset after another, in a seeded order) and a random one;
* test splits of at least 500 samples, all evaluated after every task (v1's ~300-sample subsets left one run's noise
  as large as the differences between protocols).

Every dataset draws from a seed of its own (`{seed}/{name}/{split}`), so both sizes hold identical copies of the
datasets they share, the same pool and so the same base model.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from PIL import Image, ImageDraw
from tqdm import tqdm

from timelit.data.shards import ShardWriter, sample_key
from timelit.data.synth import draw
from timelit.utilities.atomic import write_text
from timelit.utilities.errors import UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # v2: held-out skill vs adaptation concepts kept apart (docs/science.md)
BASE_STEPS = 800
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
    """One coloured shape on a background texture: the pool's main kind of image."""
    image, base, texture = _background(rng, textured=0.6)
    ink, colour = _ink(rng, base)
    shape = rng.choice(draw.SHAPES)
    radius = rng.uniform(16, 22)
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
    image, base, _ = _background(rng, textured=0.15)
    ink, colour = _ink(rng, base)
    radius = rng.uniform(16, 22)
    draw.shape(ImageDraw.Draw(image), name, rng.uniform(28, 36), rng.uniform(26, 38), radius, ink, rng)  # type: ignore[arg-type]
    return image, [f"a photo of a {colour} {name} shape"]


def _draw_colours(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    image, _ = draw.canvas(draw.jitter(draw.COLOURS[name], rng, 25))  # type: ignore[index]
    return image, [f"a photo of the colour {name}"]


def _draw_textures(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    base = draw.jitter(rng.choice(list(draw.COLOURS.values())), rng, 15)
    ink, _ = _ink(rng, base)
    return draw.texture(name, rng, base, ink), [f"a photo of a {name} texture"]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- concepts the pool never shows
# Captions name the concept a dataset teaches and nothing else: no ink colour, shape or texture words, which are the
# held-out sets' skills. Training on them would rehearse those skills and hide forgetting (benchmark v1 did).


def _glyph(painter: Callable, rng: random.Random) -> Image.Image:
    image, base, _ = _background(rng, textured=0.15)
    ink, _ = _ink(rng, base)
    painter(ImageDraw.Draw(image), ink)
    return image


def _draw_digits(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    value = DIGIT_NAMES.index(name)  # type: ignore[arg-type]
    return _glyph(lambda d, ink: draw.digit(d, value, ink, rng), rng), [f"a photo of the digit {name}"]


def _draw_letters(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    image = _glyph(lambda d, ink: draw.letter(d, name, ink, rng), rng)  # type: ignore[arg-type]
    return image, [f"a photo of the letter {name}"]


def _draw_arrows(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    return _glyph(lambda d, ink: draw.arrow(d, name, ink, rng), rng), [f"a photo of an arrow pointing {name}"]  # type: ignore[arg-type]


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
        for x, y in _place(rng, count, 6.5):
            draw.shape(d, shape, x, y, 6.5, ink, rng)

    return _glyph(paint, rng), [f"a photo of {name} objects" if count > 1 else "a photo of one object"]


def _draw_shades(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    shade = draw.jitter(draw.SHADES[name], rng, 10)  # type: ignore[index]
    image, _ = draw.canvas(draw.jitter(rng.choice([(235, 235, 235), (25, 25, 25), (128, 128, 128)]), rng, 10))
    shape = rng.choice(draw.SHAPES[:-1])
    draw.shape(ImageDraw.Draw(image), shape, rng.uniform(26, 38), rng.uniform(26, 38), rng.uniform(16, 22), shade, rng)
    return image, [f"a photo of something coloured {name}"]


RELATION_NAMES = ("left of", "right of", "above", "below")
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _draw_relations(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    """Two digits in a spatial relation, captioned both ways round: a retrieval set with classes, like FSCOCO.

    The objects are digits (taught by DIGITS) rather than the pool's shapes, so that its captions name no held-out
    skill; the digit pair makes most captions unique, which retrieval's tie rule needs.
    """
    image, base, _ = _background(rng, textured=0.0)
    ink = _ink(rng, base)[0]
    a, b = rng.sample(range(10), 2)
    along, across = rng.uniform(15, 18), rng.uniform(24, 40)
    first, second = (along, across), (64 - along, across)  # first is left of second
    if name in ("above", "below"):
        first, second = (across, along), (across, 64 - along)  # first is above second
    a_pos, b_pos = (first, second) if name in ("left of", "above") else (second, first)
    d = ImageDraw.Draw(image)
    for value, (x, y) in ((a, a_pos), (b, b_pos)):
        draw.small_digit(d, value, x, y, ink)
    return image, [
        f"the digit {DIGIT_NAMES[a]} {name} the digit {DIGIT_NAMES[b]}",
        f"the digit {DIGIT_NAMES[b]} {_INVERSE[name]} the digit {DIGIT_NAMES[a]}",  # type: ignore[index]
    ]


def _draw_lines(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    return _glyph(lambda d, ink: draw.line(d, name, ink, rng), rng), [f"a photo of a {name} line"]  # type: ignore[arg-type]


SIZE_NAMES = ("tiny", "small", "large", "huge")
_SIZE_RADII = {"tiny": (3.0, 4.5), "small": (7.0, 9.0), "large": (13.0, 16.0), "huge": (22.0, 26.0)}


def _draw_sizes(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    radius = rng.uniform(*_SIZE_RADII[name])  # type: ignore[index]
    shape = rng.choice(["circle", "square", "diamond", "hexagon"])
    margin = radius * 1.3 + 1
    image = _glyph(
        lambda d, ink: draw.shape(d, shape, rng.uniform(margin, 64 - margin), rng.uniform(margin, 64 - margin),
                                  radius, ink, rng), rng,
    )  # fmt: skip
    return image, [f"a photo of a {name} object"]


BAR_NAMES = ("first", "second", "third", "fourth")


def _draw_bars(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    tallest = BAR_NAMES.index(name)  # type: ignore[arg-type]
    return _glyph(lambda d, ink: draw.bars(d, tallest, ink, rng), rng), [f"a bar chart whose {name} bar is tallest"]


# Fine-grained concepts, as most of FoMo-in-Flux's adaptation datasets are (birds, cars, aircraft): new names for
# combinations of what the base model sees well (colours, shapes, layouts), so the budget can teach them, and so that
# learning them re-uses, and can disturb, the features that the held-out sets rely on.
CREATURE_SPECIES: dict[str, tuple[str, str]] = {  # invented name -> (shape, colour)
    "zorb": ("star", "red"),
    "quil": ("circle", "blue"),
    "vexa": ("triangle", "green"),
    "plim": ("square", "yellow"),
    "drak": ("cross", "purple"),
    "snorf": ("ring", "orange"),
    "teeb": ("star", "blue"),
    "glim": ("circle", "red"),
    "wubble": ("triangle", "yellow"),
    "frel": ("square", "purple"),
    "brix": ("cross", "green"),
    "yond": ("ring", "red"),
}
FLAG_COLOURS: dict[str, tuple[str, str, str]] = {  # invented country -> (layout, first colour, second colour)
    "Zembla": ("horizontal", "red", "blue"),
    "Quorvia": ("horizontal", "green", "yellow"),
    "Tarnis": ("vertical", "red", "blue"),
    "Velmor": ("vertical", "orange", "purple"),
    "Ildria": ("horizontal", "black", "white"),
    "Brastov": ("vertical", "green", "white"),
    "Kelmar": ("horizontal", "yellow", "purple"),
    "Oruna": ("vertical", "black", "yellow"),
}


def _draw_creatures(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    shape, colour = CREATURE_SPECIES[name]  # type: ignore[index]
    image, base, _ = _background(rng, textured=0.2)
    if sum(abs(a - b) for a, b in zip(base, draw.COLOURS[colour])) < 150:  # keep the creature visible
        image, _ = draw.canvas(draw.jitter(draw.COLOURS["white"], rng, 20))
    radius = rng.uniform(12, 20)
    where = (rng.uniform(radius + 4, 60 - radius), rng.uniform(radius + 4, 60 - radius))
    draw.shape(ImageDraw.Draw(image), shape, *where, radius, draw.jitter(draw.COLOURS[colour], rng), rng)
    return image, [f"a photo of a {name}"]


def _draw_flags(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    layout, first, second = FLAG_COLOURS[name]  # type: ignore[index]
    image, painter = draw.canvas(draw.jitter(draw.COLOURS[first], rng, 15))
    cut = 32 + rng.uniform(-4, 4)
    box = (0, cut, 64, 64) if layout == "horizontal" else (cut, 0, 64, 64)
    painter.rectangle(box, fill=draw.jitter(draw.COLOURS[second], rng, 15))
    return image, [f"the flag of {name}"]


def _draw_patterns(name: str | None, rng: random.Random) -> tuple[Image.Image, list[str]]:
    base = draw.jitter(rng.choice(list(draw.COLOURS.values())), rng, 15)
    ink, _ = _ink(rng, base)
    return draw.pattern(name, rng, base, ink), [f"a photo of a {name} pattern"]  # type: ignore[arg-type]


DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNT_NAMES = ("one", "two", "three", "four", "five")
# Every evaluation set holds at least this many test samples: with ~300 (v1) one run's evaluation noise (~0.8 GM)
# was as large as the differences between protocols.
TEST_SAMPLES = 500


@dataclass(frozen=True)
class SynthDataset:
    """One procedural dataset: its manifest fields, its drawer and its size (at scale 1)."""

    name: str
    role: str
    task: str
    classnames: tuple[str, ...] | None
    prompt: str | tuple[str, ...]
    drawer: Drawer
    train_per_class: int

    @property
    def test_per_class(self) -> int:
        return math.ceil(TEST_SAMPLES / len(self.classnames or (None,))) if self.classnames else TEST_SAMPLES


def _adapt(name: str, classnames: tuple[str, ...], prompt: str, drawer: Drawer, train: int = 800) -> SynthDataset:
    """An adaptation dataset of about `train` training samples."""
    return SynthDataset(name, "adapt", "classification", classnames, prompt, drawer, math.ceil(train / len(classnames)))


DATASETS = (
    SynthDataset(
        "SHAPES",
        "eval",
        "classification",
        draw.SHAPES,
        ("a photo of a {} shape.", "a {} shape.", "a {}."),
        _draw_shapes,
        0,
    ),
    SynthDataset(
        "COLOURS", "eval", "classification", tuple(draw.COLOURS), "a photo of the colour {}.", _draw_colours, 0
    ),
    SynthDataset(
        "TEXTURES",
        "eval",
        "classification",
        draw.TEXTURES,
        ("a photo of a {} texture.", "{} texture."),
        _draw_textures,
        0,
    ),
    _adapt("CREATURES", tuple(CREATURE_SPECIES), "a photo of a {}.", _draw_creatures),
    _adapt("FLAGS", tuple(FLAG_COLOURS), "the flag of {}.", _draw_flags),
    _adapt("PATTERNS", draw.PATTERNS, "a photo of a {} pattern.", _draw_patterns),
    _adapt("DIGITS", DIGIT_NAMES, "a photo of the digit {}.", _draw_digits),
    _adapt("ARROWS", tuple(draw.ARROW_DIRECTIONS), "a photo of an arrow pointing {}.", _draw_arrows),
    _adapt("SHADES", tuple(draw.SHADES), "a photo of something coloured {}.", _draw_shades),
    _adapt("LETTERS", tuple(draw.LETTER_STROKES), "a photo of the letter {}.", _draw_letters),
    _adapt("COUNTS", COUNT_NAMES, "a photo of {} objects.", _draw_counts),
    SynthDataset(
        "RELATIONS", "adapt", "retrieval", RELATION_NAMES, "the digit one {} the digit two.", _draw_relations, 300
    ),
    _adapt("LINES", tuple(draw.LINE_ANGLES), "a photo of a {} line.", _draw_lines),
    _adapt("SIZES", SIZE_NAMES, "a photo of a {} object.", _draw_sizes),
    _adapt("BARS", BAR_NAMES, "a bar chart whose {} bar is tallest.", _draw_bars),
)
# Sizes of the generator. `quickstart` is the default run's benchmark (4 tasks, one dataset each); `science` is the
# study's (12 adaptation datasets: 12 one-dataset tasks, or 4 tasks of three), a superset drawn from the same seeds,
# so the datasets both hold are identical, and so are the pool and the base model.
SIZES: dict[str, tuple[str, ...]] = {
    "quickstart": ("SHAPES", "COLOURS", "TEXTURES", "CREATURES", "FLAGS", "PATTERNS", "SHADES"),
    "science": tuple(spec.name for spec in DATASETS),  # the quickstart's and DIGITS ... BARS
}
POOL_SIZE = 8000


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    draw.finish(image, IMAGE_SIZE).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_split(spec: SynthDataset, split: str, per_class: int, root: Path, seed: int) -> int:
    # Each split draws from its own seed, so that a dataset is the same whichever other datasets a size holds.
    rng = random.Random(f"{seed}/{spec.name}/{split}")
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
        "prompt_templates": [spec.prompt] if isinstance(spec.prompt, str) else list(spec.prompt),
        "splits": {split: {"num_samples": count} for split, count in counts.items()},
        "source": {"generator": "timelit.data.synth", "format_version": FORMAT_VERSION},
        "license": "MIT (generated by timelit)",
    }
    (root / "datasets").mkdir(exist_ok=True)
    (root / "datasets" / f"{spec.name}.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    if spec.classnames:
        (root / "classnames").mkdir(exist_ok=True)
        (root / "classnames" / f"{spec.name}.json").write_text(json.dumps(list(spec.classnames), indent=1))


def _write_pool(root: Path, size: int, seed: int) -> None:
    rng = random.Random(f"{seed}/{POOL_NAME}")
    with ShardWriter(root / POOL_NAME, "train", samples_per_shard=1000) as writer:
        for number in range(size):
            image, caption = pool_sample(rng)
            writer.add(
                sample_key(POOL_NAME, "train", number), _encode_png(image), "png", caption, {"dataset": POOL_NAME}
            )
    (root / "pools").mkdir(exist_ok=True)
    pool = {"name": POOL_NAME, "num_samples": size, "source": {"generator": "timelit.data.synth"}, "license": "MIT"}
    (root / "pools" / f"{POOL_NAME}.yaml").write_text(yaml.safe_dump(pool, sort_keys=False))


def _write_streams(root: Path, specs: list[SynthDataset], seed: int) -> None:
    """`dataset_incremental`: the adaptation datasets one after another in a seeded order, as FoMo-in-Flux's
    dataset-incremental streams; `random`: every concept shuffled (v1's stream, kept for tests and comparison)."""
    adapt = [spec for spec in specs if spec.role == "adapt"]
    random.Random(f"{seed}/stream").shuffle(adapt)
    concepts = [f"{spec.name}+++{c}" for spec in adapt for c in spec.classnames or ()]
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


class NotOurFolderError(UserError, FileExistsError):
    """The benchmark's folder holds files that are not a quickstart benchmark of ours."""


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive flock(2) on `<parent>/.<name>.lock` while the benchmark in `root` is checked and written.

    Two first runs at once (two points of a sweep, two users of one home) would otherwise both find the folder
    unfinished, and the second would clear what the first was writing. With the lock the second waits, then finds
    the benchmark complete. The kernel drops the lock of a writer that dies, however it dies, so a killed writer
    never blocks the next one (which clears its half-written folder, see `_claim`). The lock file lies beside
    `root`, not in it, so that `root` stays empty for `_claim`, and it is left in place: removing it would let a
    waiter lock a file that a newcomer no longer sees.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is writing the quickstart benchmark into %s; waiting for it", root)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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
        raise NotOurFolderError(
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
    base_steps: int = BASE_STEPS,
    force: bool = False,
    size: str = "quickstart",
) -> Path:
    """Write the quickstart benchmark (shards, manifests, stream, pool) and train its base model into `root`.

    Does nothing when `root` already holds a complete benchmark (`READY.json`); a half-written one is removed and
    written again. A folder that holds anything else is refused, never cleared (`_claim`). Processes that call this
    at once for one folder take turns (`_writer_lock`): one writes, the others wait and find it complete. `scale`
    multiplies every dataset's size (tests use a small one); `size` picks the datasets (`SIZES`).
    """
    if size not in SIZES:
        raise ValueError(f"unknown benchmark size {size!r}; choose one of {sorted(SIZES)}")
    root = Path(root).expanduser()
    if is_ready(root) and not force:
        return root
    with _writer_lock(root):
        if is_ready(root) and not force:
            return root  # written by the process this one waited for
        _write(root, seed, scale, base_model, base_steps, size)
    return root


def _write(root: Path, seed: int, scale: float, base_model: str, base_steps: int, size: str) -> None:
    _claim(root)
    specs = [spec for spec in DATASETS if spec.name in SIZES[size]]
    splits = [
        (spec, split, max(1, round(n * scale)))
        for spec in specs
        for split, n in (("train", spec.train_per_class), ("test", spec.test_per_class))
        if n
    ]
    for spec, split, per_class in tqdm(splits, desc="quickstart datasets", unit="split"):
        count = _write_split(spec, split, per_class, root, seed)
        manifest_path = root / "datasets" / f"{spec.name}.yaml"
        counts = yaml.safe_load(manifest_path.read_text())["splits"] if manifest_path.exists() else {}
        counts = {name: info["num_samples"] for name, info in counts.items()} | {split: count}
        _write_manifest(spec, counts, root)
    _write_pool(root, max(64, round(POOL_SIZE * scale)), seed)
    _write_streams(root, specs, seed)
    from timelit.data.synth.base_model import train_base

    report = train_base(root, POOL_NAME, BASE_MODEL_FILE, model_name=base_model, steps=base_steps, seed=seed)
    write_text(  # atomic: a kill mid-write must not leave a READY.json that is_ready cannot parse
        root / READY_FILE,
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "size": size,
                "seed": seed,
                "scale": scale,
                "base_model": base_model,
                **report,
            },
            indent=1,
        ),
    )
    (root / WRITING_FILE).unlink()
