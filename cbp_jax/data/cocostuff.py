"""Converter from the raw ``cocostuff-10k-v1.1`` release to mmseg's layout.

Raw: ``images/<name>.jpg``, ``annotations/<name>.mat`` (field ``S``: raw COCO ids,
0 = unlabeled, 1..182), ``imageLists/{train,test}.txt``. Out:
``images/{train2014,test2014}/<name>.jpg`` and
``annotations/{train2014,test2014}/<name>_labelTrainIds.png`` with train ids 0..171
(0 = unlabeled; the loader's reduce_zero_label then gives 0..170 and 255).
Raw ids 1..182 map in order to 1..171 skipping the 11 unused ids; an unused id
in a file becomes 0 and is counted; a value above 182 is an error.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil

import numpy as np
from PIL import Image

from cbp_jax.data.classes import COCOSTUFF_UNUSED_IDS
from cbp_jax.data.sources import BadExampleError

log = logging.getLogger(__name__)

SPLITS = {"train": "train2014", "test": "test2014"}


def raw_to_train_ids() -> np.ndarray:
    """(256,) int16: raw id -> train id 0..171; unused ids -> 0; > 182 -> -1."""
    lut = np.full(256, -1, np.int16)
    lut[0] = 0
    used = [i for i in range(1, 183) if i not in COCOSTUFF_UNUSED_IDS]
    lut[used] = np.arange(1, len(used) + 1)
    lut[list(COCOSTUFF_UNUSED_IDS)] = 0
    return lut


def convert_label(raw: np.ndarray, path: str) -> tuple[np.ndarray, int]:
    """Raw ``S`` (H, W) -> (uint8 train ids (H, W), number of unused-id pixels)."""
    raw = np.asarray(raw)
    if raw.ndim != 2:
        raise BadExampleError(path, f"field S must be 2-D (H, W), got shape {raw.shape}")
    if raw.size and (raw.min() < 0 or raw.max() > 182):
        bad = np.unique(raw[(raw < 0) | (raw > 182)])
        raise BadExampleError(path, f"label values {bad[:10].tolist()} outside the COCO ids 0..182")
    raw = raw.astype(np.int64)
    unused = int(np.isin(raw, COCOSTUFF_UNUSED_IDS).sum())
    return raw_to_train_ids()[raw].astype(np.uint8), unused


def _convert_one(raw_dir: str, out_dir: str, folder: str, name: str) -> int:
    from scipy.io import loadmat

    mat_path = os.path.join(raw_dir, "annotations", name + ".mat")
    img_path = os.path.join(raw_dir, "images", name + ".jpg")
    if not os.path.isfile(img_path):
        raise BadExampleError(img_path, "image listed in imageLists is missing")
    try:
        mat = loadmat(mat_path)
    except (OSError, ValueError) as e:
        raise BadExampleError(mat_path, f"unreadable .mat file: {e}") from e
    if "S" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise BadExampleError(mat_path, f"no field 'S' (fields: {keys})")
    label, unused = convert_label(mat["S"], mat_path)
    out_label = os.path.join(out_dir, "annotations", folder, name + "_labelTrainIds.png")
    Image.fromarray(label).save(out_label)
    shutil.copyfile(img_path, os.path.join(out_dir, "images", folder, name + ".jpg"))
    return unused


def convert_cocostuff10k(raw_dir: str, out_dir: str, num_workers: int = 4) -> dict:
    """Converts the raw release; returns {"train": n, "test": n, "unused_id_pixels": n}.

    Raises ``BadExampleError`` naming the first bad file (after trying them all,
    every bad file is logged).
    """
    lists = {s: os.path.join(raw_dir, "imageLists", f"{s}.txt") for s in SPLITS}
    missing = [p for p in lists.values() if not os.path.isfile(p)]
    if missing or not os.path.isdir(os.path.join(raw_dir, "annotations")):
        raise FileNotFoundError(
            f"{raw_dir} is not a cocostuff-10k-v1.1 release: expected images/*.jpg, "
            f"annotations/*.mat and imageLists/{{train,test}}.txt (missing: {missing})"
        )
    counts, unused, errors = {}, 0, []
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        for split, folder in SPLITS.items():
            for sub in ("images", "annotations"):
                os.makedirs(os.path.join(out_dir, sub, folder), exist_ok=True)
            with open(lists[split]) as f:
                names = [line.strip() for line in f if line.strip()]
            futures = [pool.submit(_convert_one, raw_dir, out_dir, folder, n) for n in names]
            for fut in futures:
                try:
                    unused += fut.result()
                except BadExampleError as e:
                    errors.append(e)
                    log.error("%s", e)
            counts[split] = len(names)
    if errors:
        raise BadExampleError(
            errors[0].path, f"{errors[0].problem} (and {len(errors) - 1} more bad files, logged)"
        )
    if unused:
        log.warning("%d pixels had unused COCO ids; they were mapped to 0 (ignore)", unused)
    return {**counts, "unused_id_pixels": unused}
