"""Drawing primitives of the procedural quickstart benchmark: shapes, glyphs, arrows and textures.

Everything is drawn on a 64 px canvas and reduced to the stored size with a box filter, which gives anti-aliased
edges at 32 px. All randomness comes from the `random.Random` passed in, so a dataset is a function of its seed.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

CANVAS = 64
RGB = tuple[int, int, int]

# The pretraining pool's eight colour words (COLOURS), then finer shades whose names the base model has never seen
# (SHADES). One table, so that every colour of the benchmark is defined in one place.
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "crimson": (200, 20, 60),
    "maroon": (110, 10, 20),
    "salmon": (250, 128, 114),
    "navy": (10, 20, 110),
    "azure": (120, 190, 240),
    "teal": (0, 128, 128),
    "olive": (120, 120, 10),
    "lime": (140, 230, 40),
    "gold": (250, 200, 10),
    "beige": (225, 210, 170),
    "magenta": (235, 30, 210),
    "brown": (120, 70, 30),
}
POOL_COLOURS = 8
COLOURS: dict[str, RGB] = dict(list(PALETTE.items())[:POOL_COLOURS])
SHADES: dict[str, RGB] = dict(list(PALETTE.items())[POOL_COLOURS:])

# The pool's and SHAPES' shape words. `shape` also draws a diamond and a hexagon, which adaptation datasets use as
# unnamed objects: at 32 px a tiny ViT trained for a minute confuses them with squares and circles (v1's SHAPES: 29%).
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
TEXTURES = ("plain", "striped", "dotted", "checkered", "grid", "noisy")


def jitter(colour: RGB, rng: random.Random, amount: int = 12) -> RGB:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


def contrasting(rng: random.Random, avoid: RGB, palette: dict[str, RGB] = COLOURS) -> RGB:
    """A palette colour far enough from `avoid` that a shape stays visible on it."""
    options = [c for c in palette.values() if sum(abs(a - b) for a, b in zip(c, avoid)) > 200]
    return jitter(rng.choice(options or list(palette.values())), rng)


def canvas(background: RGB) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (CANVAS, CANVAS), background)
    return image, ImageDraw.Draw(image)


def finish(image: Image.Image, size: int) -> Image.Image:
    return image.resize((size, size), Image.Resampling.BOX) if size != CANVAS else image


def texture(name: str, rng: random.Random, base: RGB, ink: RGB) -> Image.Image:
    """A full-canvas texture in two colours."""
    image, draw = canvas(base)
    step = rng.randint(8, 14)
    phase = rng.randint(0, step - 1)
    if name == "striped":
        vertical = rng.random() < 0.5
        for pos in range(phase - step, CANVAS, step):
            box = (pos, 0, pos + step // 2, CANVAS) if vertical else (0, pos, CANVAS, pos + step // 2)
            draw.rectangle(box, fill=ink)
    elif name == "dotted":
        radius = max(1, step // 4)
        for x in range(phase, CANVAS, step):
            for y in range(phase, CANVAS, step):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=ink)
    elif name == "checkered":
        for x in range(phase - step, CANVAS, step):
            for y in range(phase - step, CANVAS, step):
                if ((x - phase) // step + (y - phase) // step) % 2 == 0:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=ink)
    elif name == "grid":
        for pos in range(phase, CANVAS, step):
            draw.line((pos, 0, pos, CANVAS), fill=ink, width=2)
            draw.line((0, pos, CANVAS, pos), fill=ink, width=2)
    elif name == "noisy":
        pixels = image.load()
        for x in range(0, CANVAS, 2):
            for y in range(0, CANVAS, 2):
                if rng.random() < 0.5:
                    for dx in (0, 1):
                        for dy in (0, 1):
                            pixels[x + dx, y + dy] = ink  # type: ignore[index]
    elif name != "plain":
        raise ValueError(f"unknown texture '{name}'; known: {TEXTURES}")
    return image


def _regular(cx: float, cy: float, radius: float, sides: int, rotation: float) -> list[tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(rotation + 2 * math.pi * k / sides),
            cy + radius * math.sin(rotation + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def shape(
    draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, radius: float, fill: RGB, rng: random.Random
) -> None:
    """Draw one of `SHAPES` centred at (cx, cy)."""
    turn = rng.uniform(-0.2, 0.2)
    if name == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
    elif name == "ring":
        width = max(3, int(radius / 2.5))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=fill, width=width)
    elif name == "square":
        draw.polygon(_regular(cx, cy, radius * 1.3, 4, math.pi / 4 + turn), fill=fill)
    elif name == "diamond":
        draw.polygon(_regular(cx, cy, radius * 1.2, 4, turn), fill=fill)
    elif name == "triangle":
        draw.polygon(_regular(cx, cy, radius * 1.2, 3, -math.pi / 2 + turn), fill=fill)
    elif name == "hexagon":
        draw.polygon(_regular(cx, cy, radius * 1.1, 6, turn), fill=fill)
    elif name == "star":
        points = []
        for k in range(10):
            r = radius * (1.25 if k % 2 == 0 else 0.5)
            angle = -math.pi / 2 + turn + math.pi * k / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=fill)
    elif name == "cross":
        arm = radius / 2.6
        draw.rectangle((cx - radius, cy - arm, cx + radius, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - radius, cx + arm, cy + radius), fill=fill)
    else:
        raise ValueError(f"unknown shape '{name}'; known: {SHAPES} and diamond, hexagon")


# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle).
_SEGMENTS = {
    "a": ((0, 0), (1, 0)),
    "b": ((1, 0), (1, 1)),
    "c": ((1, 1), (1, 2)),
    "d": ((0, 2), (1, 2)),
    "e": ((0, 1), (0, 2)),
    "f": ((0, 0), (0, 1)),
    "g": ((0, 1), (1, 1)),
}
DIGIT_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")

# Capital letters made of straight strokes, in a unit box (x right, y down).
LETTER_STROKES: dict[str, list[tuple[tuple[float, float], ...]]] = {
    "A": [((0, 1), (0.5, 0), (1, 1)), ((0.25, 0.55), (0.75, 0.55))],
    "E": [((1, 0), (0, 0), (0, 1), (1, 1)), ((0, 0.5), (0.75, 0.5))],
    "F": [((1, 0), (0, 0), (0, 1)), ((0, 0.5), (0.75, 0.5))],
    "H": [((0, 0), (0, 1)), ((1, 0), (1, 1)), ((0, 0.5), (1, 0.5))],
    "K": [((0, 0), (0, 1)), ((1, 0), (0, 0.55), (1, 1))],
    "L": [((0, 0), (0, 1), (1, 1))],
    "M": [((0, 1), (0, 0), (0.5, 0.6), (1, 0), (1, 1))],
    "N": [((0, 1), (0, 0), (1, 1), (1, 0))],
    "T": [((0, 0), (1, 0)), ((0.5, 0), (0.5, 1))],
    "V": [((0, 0), (0.5, 1), (1, 0))],
    "X": [((0, 0), (1, 1)), ((1, 0), (0, 1))],
    "Z": [((0, 0), (1, 0), (0, 1), (1, 1))],
}


def _strokes(draw: ImageDraw.ImageDraw, strokes, box: tuple[float, float, float, float], ink: RGB, width: int) -> None:
    x0, y0, w, h = box
    for stroke in strokes:
        points = [(x0 + x * w, y0 + y * h) for x, y in stroke]
        draw.line(points, fill=ink, width=width, joint="curve")


def digit(draw: ImageDraw.ImageDraw, value: int, ink: RGB, rng: random.Random) -> None:
    width = rng.randint(5, 8)
    w, h = rng.uniform(20, 28), rng.uniform(36, 46)
    x0, y0 = rng.uniform(6, CANVAS - 6 - w), rng.uniform(4, CANVAS - 4 - h)
    strokes = [tuple((x, y / 2) for x, y in _SEGMENTS[s]) for s in DIGIT_SEGMENTS[value]]
    _strokes(draw, strokes, (x0, y0, w, h), ink, width)


def letter(draw: ImageDraw.ImageDraw, name: str, ink: RGB, rng: random.Random) -> None:
    width = rng.randint(5, 7)
    w, h = rng.uniform(28, 38), rng.uniform(34, 44)
    x0, y0 = rng.uniform(5, CANVAS - 5 - w), rng.uniform(5, CANVAS - 5 - h)
    _strokes(draw, LETTER_STROKES[name], (x0, y0, w, h), ink, width)


ARROW_DIRECTIONS = {
    "up": (0, -1),
    "down": (0, 1),
    "left": (-1, 0),
    "right": (1, 0),
    "up and left": (-1, -1),
    "up and right": (1, -1),
    "down and left": (-1, 1),
    "down and right": (1, 1),
}


def arrow(draw: ImageDraw.ImageDraw, direction: str, ink: RGB, rng: random.Random) -> None:
    dx, dy = ARROW_DIRECTIONS[direction]
    norm = math.hypot(dx, dy)
    dx, dy = dx / norm, dy / norm
    length = rng.uniform(34, 46)
    cx, cy = CANVAS / 2 + rng.uniform(-5, 5), CANVAS / 2 + rng.uniform(-5, 5)
    tail = (cx - dx * length / 2, cy - dy * length / 2)
    tip = (cx + dx * length / 2, cy + dy * length / 2)
    draw.line((tail, tip), fill=ink, width=rng.randint(5, 7))
    head = length * 0.4
    for side in (-1, 1):
        angle = math.atan2(-dy, -dx) + side * 0.5
        draw.line((tip, (tip[0] + head * math.cos(angle), tip[1] + head * math.sin(angle))), fill=ink, width=6)


def bars(draw: ImageDraw.ImageDraw, tallest: int, ink: RGB, rng: random.Random) -> None:
    """Four bars of a bar chart, the one at position `tallest` (0-3, left to right) clearly the tallest."""
    width, gap = 10, 4
    left = (CANVAS - 4 * width - 3 * gap) / 2 + rng.uniform(-3, 3)
    floor = CANVAS - rng.uniform(6, 10)
    for position in range(4):
        height = rng.uniform(44, 52) if position == tallest else rng.uniform(10, 30)
        x = left + position * (width + gap)
        draw.rectangle((x, floor - height, x + width, floor), fill=ink)


LINE_ANGLES = {"horizontal": 0.0, "vertical": 90.0, "rising": 45.0, "falling": -45.0}


def line(draw: ImageDraw.ImageDraw, name: str, ink: RGB, rng: random.Random) -> None:
    """One long straight line at the named orientation (y grows downwards: `rising` goes up to the right)."""
    angle = math.radians(LINE_ANGLES[name] + rng.uniform(-8, 8))
    length = rng.uniform(40, 54)
    cx, cy = CANVAS / 2 + rng.uniform(-6, 6), CANVAS / 2 + rng.uniform(-6, 6)
    dx, dy = math.cos(angle) * length / 2, -math.sin(angle) * length / 2
    draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=ink, width=rng.randint(4, 6))


def small_digit(draw: ImageDraw.ImageDraw, value: int, cx: float, cy: float, ink: RGB) -> None:
    """A seven-segment digit about 12 x 20 px centred at (cx, cy): two of them fit side by side or stacked."""
    w, h = 11.0, 20.0
    strokes = [tuple((x, y / 2) for x, y in _SEGMENTS[s]) for s in DIGIT_SEGMENTS[value]]
    _strokes(draw, strokes, (cx - w / 2, cy - h / 2, w, h), ink, 3)


# Textures the pool never shows, for PATTERNS: built from the same strokes as the pool's, so the base model's texture
# features are a start, and named with words it has never read (no shape or texture word inside them: v2's first
# names, such as `crosshatched`, let the base score twice chance zero-shot).
PATTERNS = ("twill", "trellis", "roundel", "chevron", "masonry", "ripple")


def pattern(name: str, rng: random.Random, base: RGB, ink: RGB) -> Image.Image:
    """A full-canvas two-colour pattern of `PATTERNS`."""
    image, draw = canvas(base)
    step = rng.randint(9, 13)
    width = max(2, step // 3)
    if name in ("twill", "trellis"):
        for offset in range(-CANVAS, 2 * CANVAS, step):
            draw.line((offset, 0, offset + CANVAS, CANVAS), fill=ink, width=width)
            if name == "trellis":
                draw.line((offset, CANVAS, offset + CANVAS, 0), fill=ink, width=width)
    elif name == "roundel":
        cx, cy = rng.uniform(16, 48), rng.uniform(16, 48)
        for radius in range(2 * CANVAS, 0, -step):
            colour = ink if (radius // step) % 2 == 0 else base
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif name == "chevron":
        for y in range(-step, CANVAS + step, step):
            points = [
                (x, y + (step // 2 if (x // (step // 2 + 1)) % 2 else 0))
                for x in range(0, CANVAS + step, step // 2 + 1)
            ]
            draw.line(points, fill=ink, width=width)
    elif name == "masonry":
        height = step
        for row, y in enumerate(range(0, CANVAS, height)):
            draw.line((0, y, CANVAS, y), fill=ink, width=2)
            shift = (step if row % 2 else 0) + rng.randint(0, 1)
            for x in range(-shift, CANVAS, 2 * step):
                draw.line((x, y, x, y + height), fill=ink, width=2)
    elif name == "ripple":
        for y0 in range(0, CANVAS + step, step):
            points = [(x, y0 + 3 * math.sin(x / 5.0)) for x in range(0, CANVAS + 1, 2)]
            draw.line(points, fill=ink, width=width)
    else:
        raise ValueError(f"unknown pattern '{name}'; known: {PATTERNS}")
    return image
