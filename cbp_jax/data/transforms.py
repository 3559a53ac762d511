"""mmsegmentation's train and test pipelines in NumPy/OpenCV.

Transforms are frozen dataclasses (picklable for grain worker processes). The
train transform takes an explicit ``np.random.Generator``; the loader seeds it
from (seed, epoch, record index), so an example's augmentation never depends on
the worker, the batch or the order in which examples are processed.

Train (mmseg ADE20K recipe): RandomResize(scale, ratio_range, keep_ratio) ->
RandomCrop(crop_size, cat_max_ratio) -> RandomFlip(0.5) -> PhotoMetricDistortion
-> Normalize -> Pad to crop_size (image 0 after normalizing, label 255).
Test: keep-ratio Resize(scale) [-> AlignedResize to multiples of 32] -> Normalize;
the label stays at its original size.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from cbp_jax.data.sources import IGNORE_INDEX

# ImageNet statistics in RGB order, 0..255 scale (mmseg's data preprocessor).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

Size = tuple[int, int]


def rescale_size(hw: Size, scale: Size) -> Size:
    """mmcv's keep-ratio target size: fit the long side to max(scale), the short to min.

    Args:
        hw: input (H, W).
        scale: (long, short) bound, e.g. (2048, 512); order does not matter.

    Returns:
        (H', W') = (int(H * f + 0.5), int(W * f + 0.5)), f = min(long/max(H, W),
        short/min(H, W)).
    """
    h, w = hw
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


def aligned_size(hw: Size, size_divisor: int = 32) -> Size:
    """NVlabs ``AlignedResize``: each side rounded UP to a multiple of ``size_divisor``."""
    return -(-hw[0] // size_divisor) * size_divisor, -(-hw[1] // size_divisor) * size_divisor


def resize(image: np.ndarray, hw: Size, nearest: bool = False) -> np.ndarray:
    """cv2 resize to (H, W): bilinear (mmcv 'bilinear') or nearest for labels."""
    if image.shape[:2] == tuple(hw):
        return image
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(image, (hw[1], hw[0]), interpolation=interp)


def normalize(image: np.ndarray, mean=MEAN, std=STD) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> float32 (image - mean) / std."""
    out = image.astype(np.float32)
    out -= np.asarray(mean, np.float32)
    out *= 1.0 / np.asarray(std, np.float32)
    return out


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    img = img.astype(np.float32) * alpha + beta
    return np.clip(img, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg PhotoMetricDistortion on uint8 (H, W, 3) RGB; each step with p = 0.5.

    Brightness +-delta, contrast first or last at random, saturation, hue
    (OpenCV's 0..180 scale, shift drawn from [-delta, delta)).
    """
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if rng.integers(2):
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = int(rng.integers(-hue_delta, hue_delta))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 180).astype(np.uint8)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if mode == 0 and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    return image


def _crop_box(hw: Size, crop: Size, rng: np.random.Generator) -> tuple[int, int, int, int]:
    margin_h, margin_w = max(hw[0] - crop[0], 0), max(hw[1] - crop[1], 0)
    y0 = int(rng.integers(0, margin_h + 1))
    x0 = int(rng.integers(0, margin_w + 1))
    return y0, min(y0 + crop[0], hw[0]), x0, min(x0 + crop[1], hw[1])


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    crop: Size,
    rng: np.random.Generator,
    cat_max_ratio: float = 0.75,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg RandomCrop: up to 10 re-draws until no class covers >= cat_max_ratio.

    A crop is accepted when it holds more than one non-ignored class and the
    largest covers less than ``cat_max_ratio`` of the non-ignored pixels; after 10
    rejections the last draw is kept (mmseg's behaviour).
    """
    box = _crop_box(label.shape, crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            y0, y1, x0, x1 = box
            counts = np.bincount(label[y0:y1, x0:x1].ravel(), minlength=256)
            counts[ignore_index] = 0
            if np.count_nonzero(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(label.shape, crop, rng)
    y0, y1, x0, x1 = box
    return image[y0:y1, x0:x1], label[y0:y1, x0:x1]


def pad_to(array: np.ndarray, hw: Size, value) -> np.ndarray:
    """Pads (H, W, ...) at the bottom and right to ``hw``."""
    ph, pw = hw[0] - array.shape[0], hw[1] - array.shape[1]
    if ph == 0 and pw == 0:
        return array
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, constant_values=value)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """mmseg train pipeline. Call with an example dict and a ``np.random.Generator``.

    Returns ``{"image": float32 (crop_h, crop_w, 3) normalized, "label": uint8
    (crop_h, crop_w)}``; padding is 0 in the image and ``ignore_index`` in the label.
    """

    crop_size: Size
    base_scale: Size
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be (H, W) > 0, got {self.crop_size}")
        if len(self.base_scale) != 2 or min(self.base_scale) <= 0:
            raise ValueError(f"base_scale must be (long, short) > 0, got {self.base_scale}")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must be 0 < low <= high, got {self.ratio_range}")

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image, label = example["image"], example["label"]
        # RandomResize: scale = int(base * r), then keep-ratio rescale.
        r = rng.uniform(*self.ratio_range)
        scale = (int(self.base_scale[0] * r), int(self.base_scale[1] * r))
        hw = rescale_size(image.shape[:2], scale)
        image, label = resize(image, hw), resize(label, hw, nearest=True)
        image, label = random_crop(
            image, label, tuple(self.crop_size), rng, self.cat_max_ratio, self.ignore_index
        )
        if rng.random() < self.flip_prob:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric:
            image = photometric_distortion(
                np.ascontiguousarray(image),
                rng,
                self.brightness_delta,
                self.contrast_range,
                self.saturation_range,
                self.hue_delta,
            )
        image = pad_to(normalize(image, self.mean, self.std), self.crop_size, 0.0)
        label = pad_to(np.ascontiguousarray(label), self.crop_size, self.ignore_index)
        return {"image": image, "label": label}


@dataclasses.dataclass(frozen=True)
class TestTransform:
    """mmseg test pipeline: keep-ratio resize, optional AlignedResize, normalize.

    Returns ``{"image": float32 (h, w, 3), "label": uint8 (H, W) original size,
    "name": str}``.
    """

    scale: Size
    aligned: bool = False
    size_divisor: int = 32
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    def output_size(self, hw: Size) -> Size:
        """The (h, w) the image of original size ``hw`` is resized to."""
        hw = rescale_size(hw, self.scale)
        return aligned_size(hw, self.size_divisor) if self.aligned else hw

    def __call__(self, example: dict, rng: np.random.Generator | None = None) -> dict:
        del rng  # deterministic
        image = example["image"]
        hw = rescale_size(image.shape[:2], self.scale)
        image = resize(image, hw)
        if self.aligned:
            # NVlabs AlignedResize: a second bilinear resize up to multiples of 32.
            image = resize(image, self.output_size(example["image"].shape[:2]))
        out = {"image": normalize(image, self.mean, self.std), "label": example["label"]}
        if "name" in example:
            out["name"] = example["name"]
        return out


def train_transform(
    crop_size: Size,
    base_scale: Size,
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    **kwargs,
) -> TrainTransform:
    """The mmseg train pipeline, e.g. ``train_transform((512, 512), (2048, 512))``.

    Args:
        crop_size: (H, W) of the crop and of every output.
        base_scale: (long, short) resize bound before the random ratio.
        ratio_range: range of the random resize ratio.
        cat_max_ratio: crop re-draw threshold (1.0 disables it).
        **kwargs: other ``TrainTransform`` fields (flip_prob, photometric, ...).
    """
    return TrainTransform(
        tuple(crop_size), tuple(base_scale), tuple(ratio_range), cat_max_ratio, **kwargs
    )


def test_transform(scale: Size, aligned: bool = False, **kwargs) -> TestTransform:
    """The mmseg test pipeline, e.g. ``test_transform((2048, 512), aligned=True)``."""
    return TestTransform(tuple(scale), aligned, **kwargs)


test_transform.__test__ = False  # not a pytest test when imported into a test module
TestTransform.__test__ = False
