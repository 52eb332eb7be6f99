"""Decoding one raw shard sample into an image, its training caption and its metadata.

Only three kinds of member are ever decoded: an image (jpg/jpeg/png/webp through PIL), UTF-8 text (`.txt`) and
JSON (`.json`). webdataset's default decoder would also unpickle `.pyd`/`.pth` members; shards are untrusted input,
so this module is the only decoder timelit uses.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from timelit.data.shards import IMAGE_EXTENSIONS, CorruptSampleError


@dataclass
class Sample:
    key: str
    image: Any  # a PIL image (`decode_image`), or C x H x W uint8 pixels (`device_images.decode_pixels`)
    caption: str
    meta: dict[str, Any]

    @property
    def captions(self) -> list[str]:
        """Every caption of the image: the metadata's list (retrieval sets), else the `.txt` caption."""
        listed = self.meta.get("captions")
        return list(listed) if isinstance(listed, list) and listed else [self.caption]

    def training_caption(self, rng: random.Random) -> str:
        """One caption drawn at random when there are several, as the reference pipeline trains on captions."""
        captions = self.captions
        return captions[0] if len(captions) == 1 else rng.choice(captions)


def decode_image(data: bytes) -> Image.Image:
    """An image file's bytes as an RGB image, every pixel decoded: PIL reads lazily, and a truncated file fails only
    at `load`. `timelit data prepare` checks every image with this, the loaders decode with it."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def image_error(error: Exception) -> str:
    """Why an image did not decode, in words (PIL's message for a non-image names a BytesIO object)."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image file PIL can read"
    return f"{type(error).__name__}: {error}"


def source_of(raw: dict[str, Any]) -> str | None:
    """The source file a sample was prepared from, as its JSON records it (`source_path`; `url` in img2dataset
    pools), or None when the JSON lacks it or does not parse."""
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except (ValueError, UnicodeDecodeError):
        return None
    source = meta.get("source_path") or meta.get("url") if isinstance(meta, dict) else None
    return str(source) if source else None


def describe(raw: dict[str, Any]) -> str:
    """How errors name a sample: its source file first (the one the user prepared, which they can find), then the
    shard key and where it lies."""
    where = f"sample '{raw.get('__key__', '?')}' ({raw.get('__shard__', 'unknown shard')})"
    source = source_of(raw)
    return f"source '{source}', {where}" if source else where


def decode(raw: dict[str, Any], image_decoder: Callable[[bytes], Any] = decode_image) -> Sample:
    """Decode a raw sample from `ShardIndex.read`; anything unreadable raises `CorruptSampleError` naming the source
    file (when the sample's JSON records it), the key and the shard. `image_decoder` turns the image member's bytes
    into what the transform takes (a PIL image by default)."""
    key = raw.get("__key__", "?")
    where = describe(raw)
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_ext is None:
        raise CorruptSampleError(f"{where} has no image member ({'/'.join(IMAGE_EXTENSIONS)})")
    try:
        image = image_decoder(raw[image_ext])
    except Exception as error:  # PIL raises many types for broken files
        raise CorruptSampleError(f"{where}: image does not decode ({image_error(error)})") from error
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
        caption = raw["txt"].decode("utf-8").strip() if "txt" in raw else ""
    except (ValueError, UnicodeDecodeError) as error:
        raise CorruptSampleError(f"{where}: text or JSON member does not decode ({error})") from error
    if not isinstance(meta, dict):
        raise CorruptSampleError(f"{where}: the JSON member is not an object")
    if not caption and not meta.get("captions"):
        raise CorruptSampleError(f"{where} has no caption (.txt) and no 'captions' in its JSON")
    return Sample(key=key, image=image, caption=caption, meta=meta)
