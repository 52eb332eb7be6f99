"""Images resampled on the training device: loader workers decode and crop, the GPU resizes and normalises.

    timelit fit --config best_in_time.yaml --data.images device

`data.images: host` (the default) runs open_clip's transforms in the loader workers, as open_clip's own training
does: PIL decodes, `RandomResizedCrop` (or `Resize` + `CenterCrop` for evaluation) resamples with PIL's bicubic
filter, `ToTensor` and `Normalize` make a float tensor. On a 320x240 JPEG at ViT-B/16's 224 px that is ~4 ms of one
CPU core per sample, most of it the PIL resize, the float conversion and normalisation (bench/README.md, section 2b),
so one GPU needs more loader workers than most nodes have cores for it.

`data.images: device` splits the same transform at the resize:

* in the worker, `decode_pixels` decodes the image to uint8 (libjpeg-turbo through `torchvision.io.decode_jpeg`,
  the same pixels as PIL's decoder; PIL for other formats), `train_region` draws the crop box with torchvision's own
  `RandomResizedCrop.get_params` from the same seeded generator as the host path (so every sample gets the same box
  as under `host`, and the crop distribution is torchvision's by construction), and the batch carries the uint8
  pixels of each crop, padded to the batch's largest, with each sample's `Geometry`. An evaluation sample carries
  the whole image and the geometry of `Resize` + `CenterCrop`;
* on the device, `resample` applies the resize as two matrix products per batch (rows, then columns: the filter
  of a separable resize is a matrix), with the weights of the antialiased filter that PIL and torch's
  `antialias=True` use (support scaled by the reduction factor, weights normalised per output pixel, taps clamped
  to the crop), then rounds and clamps to 0..255 as a uint8 image would be, and normalises.

The images are not bit-identical to `host`: PIL computes the two passes in 8-bit fixed point and rounds between them;
here they are computed in float32 and rounded once. On photographs the two differ by 0.2 level of 255 on average,
without bias, by more than one level in under 0.5 % of values and by a few levels at most
(tests/unit/data/test_device_images.py states and checks the tolerance). The crop boxes are identical. That is why
`host` stays the default: the shipped configs' results do not move. With
`torch.set_float32_matmul_precision("high")` (TF32) the products carry ~0.1 level of error before rounding, so a few
more values round the other way; results stay deterministic on one device.

The batch is uint8 (a quarter of the float batch's bytes per pixel to copy to the device; 230 kB instead of 602 kB
per 320x240 sample), and the worker's work per sample is a JPEG decode and a copy. The resize costs ~0.2 GFLOP per
224-px sample on the device (1/600 of a ViT-B/16 training step's 124 GFLOPs per sample). On a CPU-only run it runs in
the training process with dense matrices, ~25 ms per 224-px sample: this mode is for GPUs. Images far larger than the
output make the padded batch large: prepare such data with `timelit data prepare --resize 256` (or FoMo-in-Flux's
224-px release), as the reference pipeline does.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

ImagePipeline = Literal["host", "device"]

# Per sample: crop height and width in the shipped pixels, the size the crop is resized to, and the offset of the
# output window in the resized image (a centre crop for evaluation, 0 for training).
GEOMETRY = ("height", "width", "resized_height", "resized_width", "top", "left")
_CHUNK = 64  # samples resampled at once: bounds the float copies of the batch on the device


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution with a = -0.5, the kernel of PIL's BICUBIC and torch's antialiased bicubic."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _bilinear(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp(min=0)


_KERNELS: dict[InterpolationMode, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    InterpolationMode.BICUBIC: (_bicubic, 2.0),
    InterpolationMode.BILINEAR: (_bilinear, 1.0),
}


@dataclass(frozen=True)
class DeviceTransform:
    """open_clip's train and eval transforms, read from the transform objects, as a worker half and a device half.

    Only open_clip's plain transforms are supported (train: RandomResizedCrop, convert, to-tensor, Normalize; eval:
    Resize, CenterCrop, convert, to-tensor, Normalize); anything else (augmentations from an `aug_cfg`, another
    interpolation) is refused by `from_transforms` with the transform's name, as it would silently be dropped.
    """

    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: InterpolationMode
    eval_resize: int | tuple[int, int]
    eval_max_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_transforms(cls, train: Any, evaluation: Any) -> DeviceTransform:
        found: dict[tuple[str, type], Any] = {}
        for name, compose, allowed in (
            ("train", train, (T.RandomResizedCrop, T.Normalize)),
            ("eval", evaluation, (T.Resize, T.CenterCrop, T.Normalize)),
        ):
            for step in getattr(compose, "transforms", [compose]):
                if type(step).__name__ in ("MaybeConvertMode", "MaybeToTensor", "ToTensor"):
                    continue  # conversions the device half does itself
                if not isinstance(step, allowed):
                    raise ValueError(
                        f"data.images=device resamples open_clip's plain {name} transform on the device, but this "
                        f"model's has {type(step).__name__}; use data.images=host"
                    )
                found[(name, type(step))] = step
        needed = [("train", T.RandomResizedCrop), ("train", T.Normalize), ("eval", T.Resize), ("eval", T.CenterCrop)]
        needed += [("eval", T.Normalize)]
        if missing := [f"{where} {kind.__name__}" for where, kind in needed if (where, kind) not in found]:
            raise ValueError(
                f"data.images=device needs open_clip's plain transforms; this model's lack {', '.join(missing)}; "
                f"use data.images=host"
            )
        crop, resize = found[("train", T.RandomResizedCrop)], found[("eval", T.Resize)]
        center = found[("eval", T.CenterCrop)]
        norm, eval_norm = found[("train", T.Normalize)], found[("eval", T.Normalize)]
        for step in (crop, resize):
            if step.interpolation not in _KERNELS:
                raise ValueError(
                    f"data.images=device supports bicubic and bilinear resizing; this model's transform uses "
                    f"{step.interpolation.value}; use data.images=host"
                )
        if crop.interpolation != resize.interpolation or tuple(crop.size) != tuple(center.size):
            raise ValueError("data.images=device needs train and eval transforms of one size and interpolation")
        if (tuple(norm.mean), tuple(norm.std)) != (tuple(eval_norm.mean), tuple(eval_norm.std)):
            raise ValueError("data.images=device needs one normalisation for train and eval transforms")
        size = resize.size
        eval_resize = size[0] if isinstance(size, Sequence) and len(size) == 1 else size
        return cls(
            size=(int(crop.size[0]), int(crop.size[1])),
            scale=tuple(crop.scale),
            ratio=tuple(crop.ratio),
            interpolation=crop.interpolation,
            eval_resize=eval_resize if isinstance(eval_resize, int) else (int(eval_resize[0]), int(eval_resize[1])),
            eval_max_size=resize.max_size,
            mean=tuple(float(m) for m in norm.mean),
            std=tuple(float(s) for s in norm.std),
        )

    # ------------------------------------------------------------------ in the loader worker

    def train_region(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The crop of a `RandomResizedCrop`, drawn from torch's generator exactly as the host transform draws it,
        as a view of `pixels` (C x H x W uint8) and its geometry."""
        top, left, height, width = T.RandomResizedCrop.get_params(pixels, list(self.scale), list(self.ratio))
        region = pixels[:, top : top + height, left : left + width]
        return region, (height, width, self.size[0], self.size[1], 0, 0)

    def eval_region(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The whole image, with the geometry of `Resize(eval_resize)` followed by `CenterCrop(size)`."""
        height, width = int(pixels.shape[-2]), int(pixels.shape[-1])
        resized_h, resized_w = resized_size(height, width, self.eval_resize, self.eval_max_size)
        if resized_h < self.size[0] or resized_w < self.size[1]:
            raise ValueError(f"an image resized to {resized_h}x{resized_w} is smaller than the crop {self.size}")
        top = round((resized_h - self.size[0]) / 2.0)  # torchvision's CenterCrop offsets
        left = round((resized_w - self.size[1]) / 2.0)
        return pixels, (height, width, resized_h, resized_w, top, left)

    # ------------------------------------------------------------------ on the device

    def resample(self, pixels: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """Normalised float images (B x 3 x h x w) from a batch of padded uint8 crops (B x H x W x 3) and their
        geometry (B x 6, `GEOMETRY`), on the device the batch is on."""
        if pixels.numel() == 0:
            return torch.empty(0, device=pixels.device)
        device = pixels.device
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        # The weights are computed in float64, which MPS lacks: there on the CPU, then copied.
        geometry = geometry.to(device="cpu" if device.type == "mps" else device, dtype=torch.float64)
        out = []
        for start in range(0, pixels.shape[0], _CHUNK):
            chunk, geo = pixels[start : start + _CHUNK], geometry[start : start + _CHUNK]
            rows = filter_matrix(geo[:, 0], geo[:, 2], geo[:, 4], self.size[0], chunk.shape[1], self.interpolation)
            cols = filter_matrix(geo[:, 1], geo[:, 3], geo[:, 5], self.size[1], chunk.shape[2], self.interpolation)
            rows, cols = rows.to(device), cols.to(device)
            image = chunk.permute(0, 3, 1, 2).to(torch.float32)  # B x C x H x W, values 0..255
            image = rows.unsqueeze(1) @ image @ cols.unsqueeze(1).transpose(-1, -2)
            # As the host path: an 8-bit image (rounded, clamped), then ToTensor's /255 and Normalize, op for op.
            image = image.round_().clamp_(0, 255).div_(255)
            out.append(image.sub_(mean).div_(std))
        return torch.cat(out)


def resized_size(height: int, width: int, size: int | tuple[int, int], max_size: int | None) -> tuple[int, int]:
    """The output size of torchvision's `Resize(size, max_size)`: an int resizes the shorter side to it, keeping
    the aspect ratio (the longer side truncated, then capped at `max_size`); a pair is the size itself."""
    if not isinstance(size, int):
        return size[0], size[1]
    short, long = min(height, width), max(height, width)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if height > width else (new_short, new_long)


def filter_matrix(
    length: torch.Tensor,
    resized: torch.Tensor,
    offset: torch.Tensor,
    out: int,
    padded: int,
    interpolation: InterpolationMode,
) -> torch.Tensor:
    """The B x out x padded float32 matrix of a 1-D antialiased resize of each sample's first `length` pixels to
    `resized` pixels, keeping outputs `offset` .. `offset + out` (float64 tensors of B values).

    PIL's resampling (and torch's `antialias=True`): output pixel o samples the input around
    center = (o + 0.5) * scale, scale = length / resized, with the kernel stretched by max(scale, 1) (a low-pass
    filter when reducing); taps beyond the crop are dropped and the weights renormalised, as PIL does at a
    crop's edges. Weights are computed in float64, as PIL does, then rounded to float32.
    """
    kernel, support = _KERNELS[interpolation]
    scale = length / resized  # B
    stretch = scale.clamp(min=1.0)
    outputs = torch.arange(out, device=length.device, dtype=torch.float64)
    center = (outputs[None, :] + offset[:, None] + 0.5) * scale[:, None]  # B x out
    reach = support * stretch[:, None]
    first = (center - reach + 0.5).floor().clamp(min=0)  # PIL's integer tap window [first, last)
    last = torch.minimum((center + reach + 0.5).floor(), length[:, None])
    taps = torch.arange(padded, device=length.device, dtype=torch.float64)[None, None, :]
    inside = (taps >= first[..., None]) & (taps < last[..., None])
    weights = kernel((taps - center[..., None] + 0.5) / stretch[:, None, None]) * inside
    weights = weights / weights.sum(-1, keepdim=True)
    return weights.to(torch.float32)


def decode_pixels(data: bytes) -> torch.Tensor:
    """An image file's bytes as a C x H x W uint8 RGB tensor (its memory H x W x C).

    JPEGs through `torchvision.io.decode_jpeg` (libjpeg-turbo, as PIL, and the same pixels, without PIL's RGBX
    buffer and copy to an array: 0.2-0.3 ms less per 320x240 sample); anything else, and any JPEG that decoder warns
    about or refuses (truncated, CMYK, progressive oddities), through PIL, whose errors the caller reports as a
    corrupt sample. torchvision 0.29 deprecates its decoders for TorchCodec's; until they are removed, the
    deprecation notice is ignored here (and where they are gone, PIL decodes everything).
    """
    if data[:3] == b"\xff\xd8\xff":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*TorchVision.*")
            try:
                return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except Exception:
                pass  # PIL decides, and names the error
    image = Image.open(io.BytesIO(data))
    image.load()
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def collate_regions(items: list[tuple[torch.Tensor, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    """`image`: the crops as one B x H x W x 3 uint8 tensor, each padded to the largest with zeros (the filter
    matrices give padding zero weight), and `image_geometry`, B x 6 int32."""
    if not items:
        return {"image": torch.empty(0, dtype=torch.uint8), "image_geometry": torch.empty(0, 6, dtype=torch.int32)}
    height = max(int(region.shape[1]) for region, _ in items)
    width = max(int(region.shape[2]) for region, _ in items)
    batch = torch.zeros(len(items), height, width, 3, dtype=torch.uint8)
    for slot, (region, _) in enumerate(items):
        batch[slot, : region.shape[1], : region.shape[2]] = region.permute(1, 2, 0)
    geometry = torch.tensor([g for _, g in items], dtype=torch.int32)
    return {"image": batch, "image_geometry": geometry}


def stack_images(images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """`image`: the host transform's float tensors stacked (an empty tensor for an empty batch)."""
    return {"image": torch.stack(images) if images else torch.empty(0)}


class CachedTokenizer:
    """A tokenizer that remembers the tokens of the captions it has seen (up to `capacity`, oldest dropped first).

    A task draws its current and replay samples many times over (FoMo-in-Flux: ~1,400 steps of 512 from a few
    thousand samples), and open_clip's tokenizer cleans every caption with ftfy and regexes each time (0.1-0.3 ms).
    Tokenising is a function of the caption alone, so cached rows are the rows the tokenizer would return.
    """

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor], capacity: int = 1 << 15):
        self.tokenizer, self.capacity = tokenizer, capacity
        self.rows: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self.rows))
        if missing:
            for caption, row in zip(missing, self.tokenizer(missing), strict=True):
                if len(self.rows) >= self.capacity:
                    self.rows.pop(next(iter(self.rows)))
                self.rows[caption] = row
        if not captions:
            return self.tokenizer(captions)
        return torch.stack([self.rows[c] if c in self.rows else self.tokenizer([c])[0] for c in captions])

    def __getattr__(self, name: str) -> Any:  # context_length and the like, for whoever asks the tokenizer
        if name == "tokenizer":
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def gflops_per_sample(region: tuple[int, int], size: tuple[int, int]) -> float:
    """Multiply-adds x 2 of `resample` for one sample: rows (out_h x H x W x 3) then columns (out_h x W x out_w x 3)."""
    h, w = region
    return 2 * 3 * size[0] * (h * w + w * size[1]) / 1e9
