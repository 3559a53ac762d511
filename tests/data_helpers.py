"""Tiny generated data sets in the exact on-disk layouts, for the data tests."""

from __future__ import annotations

import os

import cv2
import numpy as np
from scipy.io import savemat

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CAMVID_CANDIDATES = [
    os.environ.get("CBP_CAMVID_ROOT", ""),
    os.path.join(_REPO, "..", "shared", "datasets", "camvid"),
    "/work/shared/datasets/camvid",
]
CAMVID_ROOT = next((p for p in _CAMVID_CANDIDATES if p and os.path.isdir(p)), None)


def _blocks(rng, hw, values) -> np.ndarray:
    """A label of 4x4 blocks with values drawn from ``values``."""
    h, w = hw
    grid = rng.choice(values, size=(4, 4)).astype(np.uint8)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_NEAREST)


def write_image(path: str, image_rgb: np.ndarray) -> None:
    cv2.imwrite(path, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))


def make_ade20k(root: str, n_train: int = 4, n_val: int = 2, seed: int = 0) -> str:
    """``root/ADEChallengeData2016`` with JPEG images and raw labels 0..150."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "ADEChallengeData2016")
    for folder, n in (("training", n_train), ("validation", n_val)):
        os.makedirs(os.path.join(base, "images", folder), exist_ok=True)
        os.makedirs(os.path.join(base, "annotations", folder), exist_ok=True)
        for i in range(n):
            hw = (int(rng.integers(40, 64)), int(rng.integers(40, 80)))
            name = f"ADE_{folder[:5]}_{i:08d}"
            write_image(
                os.path.join(base, "images", folder, name + ".jpg"),
                rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
            )
            label = _blocks(rng, hw, [0, 1, 5, 77, 150])
            cv2.imwrite(os.path.join(base, "annotations", folder, name + ".png"), label)
    return base


def make_cocostuff_raw(root: str, n_train: int = 3, n_test: int = 2, seed: int = 0) -> str:
    """A raw ``cocostuff-10k-v1.1`` release: images, ``.mat`` labels (field S), lists."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "annotations", "imageLists"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        names = [f"COCO_{split}2014_{i:012d}" for i in range(n)]
        for name in names:
            hw = (int(rng.integers(30, 50)), int(rng.integers(30, 60)))
            write_image(
                os.path.join(root, "images", name + ".jpg"),
                rng.integers(0, 256, (*hw, 3), dtype=np.uint8),
            )
            # raw ids incl. 0 (unlabeled), 11, 13 (after unused 12), 182 (last).
            s = _blocks(rng, hw, [0, 1, 11, 13, 92, 182]).astype(np.uint16)
            savemat(os.path.join(root, "annotations", name + ".mat"), {"S": s, "names": "x"})
        with open(os.path.join(root, "imageLists", f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    return root
