"""`data.images: device`: the same crops as open_clip's transforms, the same pixels within a stated tolerance, the
same batches after a resume, and the host path left as it was.

Tolerance against the host path (PIL), in levels of 255 before normalisation, on 320x240 photograph-like JPEGs at
ViT-B/16's 224 px: mean absolute difference ≤ 0.3, signed mean within ±0.05 (no bias), ≤ 0.5 % of values more than
1 level apart, none more than 6 apart. PIL rounds to 8 bits between its two passes; `resample` rounds once.
"""

from __future__ import annotations

import io
import math
import random
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
import torchvision.transforms.functional as tvf
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from timelit.data.datamodule import Preprocessing, TimeDataModule
from timelit.data.device_images import (
    CachedTokenizer,
    DeviceTransform,
    collate_regions,
    decode_pixels,
    filter_matrix,
    resized_size,
)
from timelit.data.loaders import SampleReader, TaskLoader
from timelit.data.mixture import _SOURCE_CODES
from timelit.data.samples import decode_image
from timelit.training.clip import build_clip
from timelit.training.lightning_cli import config_differences
from timelit.training.seeding import mix_seed, seed_torch_cpu

MICRO = "timelit-micro-ViT"


def photo_jpeg(rng: np.random.Generator, width: int = 320, height: int = 240) -> bytes:
    """A JPEG with a photograph's mix of smooth regions, edges and sensor-like noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-24, 25, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def vit_b16() -> tuple[object, DeviceTransform]:
    bundle = build_clip("ViT-B-16", device="meta")  # transforms only
    return bundle, DeviceTransform.from_transforms(bundle.train_transform, bundle.eval_transform)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    rng = np.random.default_rng(0)
    sizes = [(320, 240)] * 12 + [(240, 320), (500, 375), (224, 224), (1000, 600)]
    return [photo_jpeg(rng, w, h) for w, h in sizes]


def levels(images: torch.Tensor, transform: DeviceTransform) -> torch.Tensor:
    """Normalised images back in levels of 255."""
    mean = torch.tensor(transform.mean).view(1, 3, 1, 1)
    std = torch.tensor(transform.std).view(1, 3, 1, 1)
    return (images * std + mean) * 255


# ---------------------------------------------------------------------------------------------- the resize itself


@pytest.mark.parametrize(("length", "resized"), [(300, 224), (240, 224), (224, 224), (150, 224), (1000, 224)])
@pytest.mark.parametrize("mode", [InterpolationMode.BICUBIC, InterpolationMode.BILINEAR])
def test_filter_matrix_is_torchs_antialiased_resize(length, resized, mode):
    signal = torch.rand(3, 1, length, dtype=torch.float64) * 255
    weights = filter_matrix(
        torch.tensor([float(length)], dtype=torch.float64),
        torch.tensor([float(resized)], dtype=torch.float64),
        torch.tensor([0.0], dtype=torch.float64),
        resized,
        length + 7,  # padding beyond the crop gets zero weight
        mode,
    )[0].double()
    mine = nnf.pad(signal, (0, 7)) @ weights.T
    theirs = tvf.resize(signal, [1, resized], mode, antialias=True)  # signal: a C x 1 x length image
    assert torch.allclose(mine, theirs, atol=1e-3)
    assert weights[:, length:].abs().max() == 0


def test_a_resize_to_the_same_size_is_the_identity(vit_b16):
    _, transform = vit_b16
    pixels = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    geometry = torch.tensor([[224, 224, 224, 224, 0, 0]], dtype=torch.int32)
    out = levels(transform.resample(pixels, geometry), transform).round()
    assert torch.equal(out, pixels.permute(0, 3, 1, 2).float())


@pytest.mark.parametrize(("height", "width"), [(240, 320), (320, 240), (224, 224), (375, 500), (100, 1000)])
def test_eval_geometry_is_torchvisions_resize(height, width):
    expected = tvf.resize(torch.zeros(1, height, width), 224, antialias=False).shape[-2:]
    assert resized_size(height, width, 224, None) == tuple(expected)
    capped = tvf.resize(torch.zeros(1, height, width), 224, max_size=400, antialias=False).shape[-2:]
    assert resized_size(height, width, 224, 400) == tuple(capped)


# ------------------------------------------------------------------------------- against open_clip's transforms


def host_and_device(photos, bundle, transform, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    host, items = [], []
    for seed, data in enumerate(photos):
        seed_torch_cpu(seed)
        host.append((bundle.train_transform if train else bundle.eval_transform)(decode_image(data)))
        seed_torch_cpu(seed)
        pixels = decode_pixels(data)
        items.append(transform.train_region(pixels) if train else transform.eval_region(pixels))
    batch = collate_regions(items)
    device = transform.resample(batch["image"], batch["image_geometry"])
    return levels(torch.stack(host), transform), levels(device, transform)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_device_images_are_the_host_images_within_the_stated_tolerance(photos, vit_b16, train):
    bundle, transform = vit_b16
    host, device = host_and_device(photos, bundle, transform, train)
    assert host.shape == device.shape == (len(photos), 3, 224, 224)
    difference = device - host
    assert difference.abs().mean() <= 0.3
    assert abs(difference.mean()) <= 0.05
    assert (difference.abs() > 1.5).float().mean() <= 0.005
    assert difference.abs().max() <= 6.5


def test_the_crop_boxes_are_the_host_transforms_boxes(photos, vit_b16):
    bundle, transform = vit_b16
    boxes = []
    real = tvf.resized_crop

    def record(image, top, left, height, width, *args, **kwargs):
        boxes.append((top, left, height, width))
        return real(image, top, left, height, width, *args, **kwargs)

    mine = []
    for seed in range(200):
        data = photos[seed % len(photos)]
        with mock.patch.object(tvf, "resized_crop", record):
            seed_torch_cpu(seed)
            bundle.train_transform(decode_image(data))
        seed_torch_cpu(seed)
        pixels = decode_pixels(data)
        region, geometry = transform.train_region(pixels)
        top = region.storage_offset() // pixels.stride(1) if region.numel() else 0
        left = (region.storage_offset() % pixels.stride(1)) // pixels.stride(2)
        mine.append((top, left, geometry[0], geometry[1]))
    assert mine == boxes


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def crop_shapes(draw, n: int, first_seed: int, height: int = 240, width: int = 320) -> np.ndarray:
    """Area share and log aspect ratio of `n` crops drawn by `draw(seed)` -> (h, w)."""
    shapes = np.array([draw(first_seed + i) for i in range(n)], dtype=np.float64)
    return np.stack([shapes[:, 0] * shapes[:, 1] / (height * width), np.log(shapes[:, 1] / shapes[:, 0])], axis=1)


def test_crop_distribution_is_random_resized_crops(vit_b16):
    """The crops the device path ships (seeded as the loaders seed them) have the area and aspect distribution of
    torchvision's RandomResizedCrop drawn independently; the same test rejects a distribution 5 % narrower."""
    _, transform = vit_b16
    pixels = torch.zeros(3, 240, 320, dtype=torch.uint8)
    n = 3000
    critical = 1.95 * math.sqrt(2 / n)  # the KS test at alpha = 0.001

    def device(seed: int) -> tuple[int, int]:
        seed_torch_cpu(mix_seed(0, 1, seed, 1, 3))  # (seed, task, batch, source, slot), as TaskBatches seeds
        return transform.train_region(pixels)[1][:2]

    def reference(seed: int, scale=transform.scale) -> tuple[int, int]:
        torch.manual_seed(10**6 + seed)
        _, _, h, w = T.RandomResizedCrop.get_params(pixels, list(scale), list(transform.ratio))
        return h, w

    mine, theirs = crop_shapes(device, n, 0), crop_shapes(reference, n, 0)
    for column in range(2):
        assert ks_statistic(mine[:, column], theirs[:, column]) < critical
    narrower = crop_shapes(lambda s: reference(s, (0.905, 1.0)), n, 0)
    assert ks_statistic(mine[:, 0], narrower[:, 0]) > critical


def test_decode_pixels_gives_pils_pixels_and_refuses_broken_files(photos):
    for data in photos[:3]:
        with mock.patch.object(Image, "open", side_effect=AssertionError("a good JPEG must not need PIL")):
            pixels = decode_pixels(data)
        assert torch.equal(pixels.permute(1, 2, 0), torch.from_numpy(np.array(decode_image(data))))
    png = io.BytesIO()
    Image.new("L", (20, 10), 128).save(png, "PNG")
    assert decode_pixels(png.getvalue()).shape == (3, 10, 20)
    with pytest.raises(OSError):
        decode_pixels(photos[0][: len(photos[0]) // 2])


def test_unsupported_transforms_are_refused(vit_b16):
    bundle, _ = vit_b16
    jitter = T.Compose(
        [*bundle.train_transform.transforms[:1], T.ColorJitter(0.4), *bundle.train_transform.transforms[1:]]
    )
    with pytest.raises(ValueError, match="ColorJitter"):
        DeviceTransform.from_transforms(jitter, bundle.eval_transform)
    with pytest.raises(ValueError, match="eval CenterCrop"):
        DeviceTransform.from_transforms(bundle.train_transform, T.Compose(bundle.eval_transform.transforms[:1]))


# ----------------------------------------------------------------------------------------- tokens and configs


def test_cached_tokens_are_the_tokenizers():
    tokenizer = build_clip(MICRO, device="meta").tokenizer
    cached = CachedTokenizer(tokenizer, capacity=3)
    captions = ["a cat", "a dog", "a cat", "Ünïcode &amp; html", "a ship", "a dog", "a cat", "a cat"]
    for start in range(0, len(captions), 3):
        assert torch.equal(cached(captions[start : start + 3]), tokenizer(captions[start : start + 3]))
    assert len(cached.rows) <= 3 and cached.context_length == tokenizer.context_length


def test_a_run_saved_before_the_option_resumes_under_host():
    saved = {"data": {"class_path": "timelit.data.datamodule.TimeDataModule", "init_args": {"batch_size": 64}}}
    host = {"data": {"class_path": saved["data"]["class_path"], "init_args": {"batch_size": 64, "images": "host"}}}
    device = {"data": {"class_path": saved["data"]["class_path"], "init_args": {"batch_size": 64, "images": "device"}}}
    assert config_differences(saved, host) == []
    assert config_differences(saved, device) == ["data.init_args.images: 'host' -> 'device'"]


# ---------------------------------------------------------------------------------- the DataModule, end to end


@pytest.fixture(scope="module")
def preprocessing() -> Preprocessing:
    bundle = build_clip(MICRO)
    return Preprocessing(bundle.train_transform, bundle.eval_transform, bundle.tokenizer)


def make(benchmark, preprocessing, images: str) -> TimeDataModule:
    dm = TimeDataModule(
        data_root=str(benchmark), manifests=str(benchmark), stream="random", num_tasks=3, batch_size=16,
        pretraining_pool="SYNTH_POOL", steps_per_task=5, num_workers=0, eval_batch_size=8, seed=0, images=images,
    )  # fmt: skip
    dm.set_preprocessing(preprocessing)
    dm.setup("fit")
    return dm


def test_device_batches_are_the_host_batches_after_transfer(tiny_benchmark, preprocessing):
    host, device = make(tiny_benchmark, preprocessing, "host"), make(tiny_benchmark, preprocessing, "device")
    for task in range(3):
        plain, raw = host.task_batches(task).batch(2), device.task_batches(task).batch(2)
        assert raw["image"].dtype == torch.uint8 and raw["image_geometry"].shape == (16, 6)
        moved = device.on_after_batch_transfer(raw, 0)
        assert "image_geometry" not in moved and moved["image"].shape == plain["image"].shape
        assert moved["keys"] == plain["keys"] and torch.equal(moved["text"], plain["text"])
        transform = device.device_transform()
        assert (levels(moved["image"], transform) - levels(plain["image"], transform)).abs().mean() <= 0.5
        assert host.on_after_batch_transfer(plain, 0) is plain  # host batches pass through
    spec = device.eval_specs[0]
    evaluated = device.on_after_batch_transfer(device.eval_batches(spec).batch(spec.subset[:5]), 0)
    reference = host.eval_batches(spec).batch(spec.subset[:5])
    assert evaluated["image"].shape == reference["image"].shape
    assert torch.equal(evaluated["label"], reference["label"])


def test_host_batches_are_open_clips_transform_and_tokenizer_bit_for_bit(tiny_benchmark, preprocessing):
    """The default (`data.images: host`, with the token cache) is what it was: every slot is open_clip's transform
    of the decoded image under the slot's seed, and the tokens are the tokenizer's, bit for bit."""
    dm = make(tiny_benchmark, preprocessing, "host")
    batches = dm.task_batches(1)
    batch = batches.batch(2)
    images, captions = [], []
    for part in batches.parts:
        first = part.start + 2 * part.per_batch + part.rank_offset
        for slot in range(part.rank_count):
            sample = batches._fill_slot(part, first + slot)
            seed = mix_seed(0, 1, 2, _SOURCE_CODES[part.name], part.rank_offset + slot)
            torch.manual_seed(seed)
            images.append(preprocessing.train_transform(sample.image))
            captions.append(sample.training_caption(random.Random(seed)))
    assert torch.equal(batch["image"], torch.stack(images))
    assert torch.equal(batch["text"], preprocessing.tokenizer(captions))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_device_loader_yields_the_same_pixels(tiny_benchmark, preprocessing, workers):
    dm = make(tiny_benchmark, preprocessing, "device")
    full = list(TaskLoader(dm.task_batches(2), num_workers=workers))
    resumed = TaskLoader(dm.task_batches(2), num_workers=workers)
    resumed.load_state_dict({"task": 2, "batches": 3})
    rest = list(resumed)
    assert len(rest) == 2
    for mine, theirs in zip(rest, full[3:], strict=True):
        assert torch.equal(mine["image"], theirs["image"])
        assert torch.equal(mine["image_geometry"], theirs["image_geometry"])
        assert torch.equal(dm.on_after_batch_transfer(mine, 0)["image"], dm.on_after_batch_transfer(theirs, 0)["image"])


def test_a_corrupt_image_is_skipped_by_the_device_decoder(tiny_benchmark, tmp_path, damage_sample):
    import shutil

    from timelit.data.shards import ShardIndex

    copy = tmp_path / "SYNTH_POOL"
    shutil.copytree(tiny_benchmark / "SYNTH_POOL", copy)
    index = ShardIndex.load(copy, "train")
    damage_sample(index, 3)
    reader = SampleReader([index], "skip", decode_pixels)
    assert reader.read(3) is None and len(reader.take_skipped()) == 1
    assert reader.read(4).image.dtype == torch.uint8
