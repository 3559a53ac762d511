"""The dataset doctor: scans a whole data set and lists every bad file.

``python -m cbp_jax.data check --dataset {ade20k,cocostuff10k,camvid} --root DIR``
prints per-split counts, image-size ranges and class pixel frequencies, then every
bad file (missing pair, unreadable, size mismatch, out-of-range label values).
Exit status 1 when anything is bad or no split is present; an absent split is
reported, not an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

import numpy as np
from tqdm import tqdm

from cbp_jax import storage
from cbp_jax.data import sources as src_lib


@dataclasses.dataclass
class SplitReport:
    split: str
    present: bool = False
    num_pairs: int = 0
    num_good: int = 0
    min_hw: tuple[int, int] | None = None
    max_hw: tuple[int, int] | None = None
    pixel_counts: np.ndarray | None = None  # (N,) train-id pixels
    image_counts: np.ndarray | None = None  # (N,) images containing the class
    ignore_pixels: int = 0
    bad: list[str] = dataclasses.field(default_factory=list)
    note: str = ""


def _scan_one(info: src_lib.DatasetInfo, lut: np.ndarray, image_path: str, label_path: str):
    try:
        image = src_lib.decode_image(storage.path(image_path).read_bytes(), image_path)
        raw = src_lib.decode_label(storage.path(label_path).read_bytes(), label_path)
        if raw.shape != image.shape[:2]:
            raise src_lib.BadExampleError(
                label_path, f"label size {raw.shape} differs from image size {image.shape[:2]}"
            )
        label = src_lib.map_label(raw, info, label_path, lut)
    except (src_lib.BadExampleError, OSError) as e:
        return None, str(e)
    hist = np.bincount(label.ravel(), minlength=256)
    return (image.shape[:2], hist), None


def scan_split(
    dataset: str, root: str, split: str, num_workers: int = 4, progress: bool = True
) -> SplitReport:
    """Checks one split file by file (threads; OpenCV decodes without the GIL)."""
    report = SplitReport(split)
    info = src_lib.INFOS[dataset]
    try:
        img_dir, ann_dir, img_suf, ann_suf = src_lib.check_layout(dataset, root, split)
    except src_lib.LayoutError as e:
        report.note = str(e).split(". Expected layout")[0]
        return report
    report.present = True
    stems, no_label, no_image = src_lib.list_pairs(img_dir, ann_dir, img_suf, ann_suf)
    report.bad += [f"{os.path.join(img_dir, s + img_suf)}: no label file" for s in no_label]
    report.bad += [f"{os.path.join(ann_dir, s + ann_suf)}: no image file" for s in no_image]
    report.num_pairs = len(stems)
    n = info.num_classes
    report.pixel_counts = np.zeros(n, np.int64)
    report.image_counts = np.zeros(n, np.int64)
    lut = info.lut
    jobs = [(os.path.join(img_dir, s + img_suf), os.path.join(ann_dir, s + ann_suf)) for s in stems]
    with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
        results = pool.map(lambda j: _scan_one(info, lut, *j), jobs)
        for ok, err in tqdm(
            results, total=len(jobs), desc=f"{dataset}/{split}", disable=not progress
        ):
            if err is not None:
                report.bad.append(err)
                continue
            hw, hist = ok
            report.num_good += 1
            report.min_hw = hw if report.min_hw is None else tuple(map(min, report.min_hw, hw))
            report.max_hw = hw if report.max_hw is None else tuple(map(max, report.max_hw, hw))
            report.pixel_counts += hist[:n]
            report.image_counts += hist[:n] > 0
            report.ignore_pixels += int(hist[src_lib.IGNORE_INDEX])
    return report


def format_report(dataset: str, root: str, reports: list[SplitReport]) -> str:
    info = src_lib.INFOS[dataset]
    lines = [f"dataset {dataset} at {root}"]
    for r in reports:
        if not r.present:
            lines.append(f"  split {r.split}: absent ({r.note})")
            continue
        lines.append(
            f"  split {r.split}: {r.num_pairs} pairs, {r.num_good} good, {len(r.bad)} bad; "
            f"image (H, W) from {r.min_hw} to {r.max_hw}"
        )
    present = [r for r in reports if r.present and r.pixel_counts is not None]
    if present:
        total = sum(r.pixel_counts for r in present)
        images = sum(r.image_counts for r in present)
        ignore = sum(r.ignore_pixels for r in present)
        all_pixels = max(int(total.sum()) + ignore, 1)
        share = 100 * ignore / all_pixels
        lines.append(f"class pixel frequencies over present splits (ignore: {share:.2f} %):")
        lines.append(f"  {'id':>3}  {'class':<22} {'pixels %':>9} {'images':>7}")
        for i in np.argsort(-total, kind="stable"):
            lines.append(
                f"  {i:>3}  {info.class_names[i]:<22} {100 * total[i] / all_pixels:>9.3f} "
                f"{int(images[i]):>7}"
            )
    bad = [b for r in reports for b in r.bad]
    lines.append(f"bad files: {len(bad)}")
    lines += [f"  {b}" for b in bad]
    if not any(r.present for r in reports):
        lines.append("no split present: check --root and the expected layout:")
        lines.append(src_lib.LAYOUTS[dataset])
    return "\n".join(lines)


def check(
    dataset: str,
    root: str,
    splits: list[str] | None = None,
    num_workers: int = 4,
    progress: bool = True,
) -> tuple[int, str, list[SplitReport]]:
    """Scans ``splits`` (default: all of the data set's); returns (exit status, text, reports)."""
    if dataset not in src_lib.LAYOUTS:
        raise ValueError(f"unknown data set {dataset!r}; use one of {sorted(src_lib.LAYOUTS)}")
    splits = list(splits or src_lib.DATASET_SPLITS[dataset])
    reports = [scan_split(dataset, root, s, num_workers, progress) for s in splits]
    text = format_report(dataset, root, reports)
    bad = any(r.bad for r in reports) or not any(r.present for r in reports)
    return int(bad), text, reports
