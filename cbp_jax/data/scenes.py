"""'scenes': a procedurally generated segmentation data set, made on the fly.

A fresh machine without downloads can train and evaluate on it. Every image is a
pure function of (seed, split, index): a sky gradient over a textured ground with
a few objects whose class is told by shape, colour and texture together (boxes
and crates are both rectangles, told apart by texture; colours are jittered and
noise is added), so it is learnable but not trivial. One-pixel object outlines
and occasional "void" patches are labelled 255 (ignore).

Classes (8): sky, ground, box, ball, tent, crate, ring, pole. Images are 120x160
(H, W) by default; a matching pipeline is ``train_transform((96, 128), (160, 120))``
and ``test_transform((160, 120))`` (the test resize is then the identity).
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

from cbp_jax.data.sources import IGNORE_INDEX, DatasetInfo

SCENES_CLASSES = ("sky", "ground", "box", "ball", "tent", "crate", "ring", "pole")
SCENES_PALETTE = (
    (70, 130, 180),
    (140, 110, 60),
    (220, 40, 40),
    (240, 200, 30),
    (40, 170, 60),
    (150, 90, 30),
    (160, 60, 200),
    (150, 150, 150),
)
SCENES = DatasetInfo(
    "scenes",
    SCENES_CLASSES,
    SCENES_PALETTE,
    (*((i, i) for i in range(len(SCENES_CLASSES))), (IGNORE_INDEX, IGNORE_INDEX)),
)
# Mean object colours (RGB); each object jitters its own.
_COLOURS = {2: (200, 60, 50), 3: (225, 190, 50), 4: (60, 150, 70), 5: (150, 100, 50)}
_COLOURS |= {6: (140, 70, 180), 7: (130, 130, 135)}
DEFAULT_SIZES = {"train": 512, "val": 128}


def _split_id(split: str) -> int:
    return zlib.crc32(split.encode())


def generate_scene(
    rng: np.random.Generator, height: int = 120, width: int = 160
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: uint8 image (H, W, 3) RGB and uint8 label (H, W) in 0..7 or 255."""
    h, w = height, width
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    horizon = h * rng.uniform(0.3, 0.6) + (xx - w / 2) * rng.uniform(-0.15, 0.15)
    ground = yy >= horizon  # (H, W)

    # Sky: vertical blue gradient; ground: brown/green with horizontal streaks.
    top = np.array([90, 140, 220], np.float32) + rng.normal(0, 12, 3)
    bottom = np.array([190, 215, 240], np.float32) + rng.normal(0, 12, 3)
    t = (yy / h)[..., None]
    image = (1 - t) * top + t * bottom
    image = np.broadcast_to(image, (h, w, 3)).copy()
    soil = np.array([130, 110, 60], np.float32) + rng.normal(0, 15, 3)
    streaks = 18 * np.sin(yy * rng.uniform(0.5, 1.2) + rng.uniform(0, 6.3))[..., None]
    image[ground] = (soil + streaks + rng.normal(0, 10, (h, w, 1)))[ground]
    label = np.where(ground, 1, 0).astype(np.uint8)

    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(2, 8))
        mask = np.zeros((h, w), np.uint8)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(h // 5, h))
        size = int(rng.integers(min(h, w) // 10, min(h, w) // 3))
        if cls in (2, 5):  # box, crate: rectangles
            ax, ay = size, int(size * rng.uniform(0.6, 1.4))
            cv2.rectangle(mask, (cx - ax // 2, cy - ay // 2), (cx + ax // 2, cy + ay // 2), 1, -1)
        elif cls == 3:  # ball
            cv2.circle(mask, (cx, cy), size // 2, 1, -1)
        elif cls == 4:  # tent: triangle
            pts = np.array([[cx - size // 2, cy + size // 2], [cx + size // 2, cy + size // 2]])
            pts = np.vstack(
                [pts, [[cx + int(rng.integers(-size // 4, size // 4 + 1)), cy - size // 2]]]
            )
            cv2.fillPoly(mask, [pts.astype(np.int32)], 1)
        elif cls == 6:  # ring
            cv2.circle(mask, (cx, cy), size // 2, 1, max(2, size // 6))
        else:  # pole: a thin tall bar
            cv2.rectangle(mask, (cx - 2, cy - size), (cx + 2, cy + size // 2), 1, -1)
        region = mask.astype(bool)
        if not region.any():
            continue
        colour = np.array(_COLOURS[cls], np.float32) + rng.normal(0, 18, 3)
        tex = np.zeros((h, w), np.float32)
        if cls == 5:  # crate: checkerboard
            p = int(rng.integers(3, 6))
            tex = 35 * ((((yy // p) + (xx // p)) % 2) - 0.5) * np.ones((h, w), np.float32)
        elif cls == 4:  # tent: diagonal stripes
            tex = 30 * np.sign(np.sin((xx + yy) * 0.8)) * np.ones((h, w), np.float32)
        elif cls == 3:  # ball: radial shading
            r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / max(size / 2, 1) ** 2
            tex = -45 * np.clip(r2, 0, 1)
        elif cls == 7:  # pole: horizontal bands
            tex = 30 * np.sign(np.sin(yy * 0.6)) * np.ones((h, w), np.float32)
        obj = colour + tex[..., None] + rng.normal(0, 8, (h, w, 1))
        image[region] = obj[region]
        label[region] = cls
        # One-pixel outline = ignore, as VOC-style boundary labels.
        label[(cv2.dilate(mask, np.ones((3, 3), np.uint8)) > 0) & ~region] = IGNORE_INDEX

    if rng.random() < 0.3:  # a void patch
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        label[y0 : y0 + 8, x0 : x0 + 8] = IGNORE_INDEX
    image = image * rng.uniform(0.8, 1.2) + rng.normal(0, 6, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


class ScenesSource:
    """The 'scenes' split as a grain random-access source; examples are generated.

    Args:
        split: any name ("train", "val", ...); it changes the images.
        num_images: number of examples (default 512 for train, 128 otherwise).
        height, width: image size.
        seed: data set seed.
    """

    info = SCENES
    skip_bad_examples = False

    def __init__(
        self,
        split: str = "train",
        num_images: int | None = None,
        height: int = 120,
        width: int = 160,
        seed: int = 0,
    ):
        if height < 32 or width < 32:
            raise ValueError(f"scenes images must be at least 32x32, got {height}x{width}")
        self.split = split
        self.num_images = DEFAULT_SIZES.get(split, 128) if num_images is None else num_images
        self.height, self.width, self.seed = height, width, seed

    num_classes = property(lambda self: self.info.num_classes)
    class_names = property(lambda self: self.info.class_names)
    palette = property(lambda self: self.info.palette)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_images:
            raise IndexError(f"scenes index {index} out of range [0, {self.num_images})")
        rng = np.random.default_rng([self.seed, _split_id(self.split), index])
        image, label = generate_scene(rng, self.height, self.width)
        return {"image": image, "label": label, "name": f"scene_{self.split}_{index:06d}"}

    def __repr__(self) -> str:
        return f"ScenesSource(split={self.split!r}, n={len(self)}, {self.height}x{self.width})"
