"""Data: sources -> transforms -> grain loader -> global jax.Arrays.

Sources (grain random-access: ``len(s)``, ``s[i]``) of dict examples::

    {"image": uint8 (H, W, 3) RGB, "label": uint8 (H, W), "name": str}

with labels already mapped to train ids 0..N-1 and 255 = ignore (reduce_zero_label
for ADE20K and COCO-Stuff, void -> 255 for CamVid). Every source has ``info``,
``num_classes``, ``class_names``, ``palette``, ``split`` and ``skip_bad_examples``.

    source = make_source("ade20k", "/data/ADEChallengeData2016", "train")
    source = make_source("cocostuff10k", ROOT, "test")          # mmseg's converted layout
    source = make_source("camvid", "data/CamVid", "val")
    source = make_source("scenes", split="train")                # generated, no download
    source = make_source("ade20k", SHARD_DIR, "val", format="arrayrecord")
    source = make_source("ade20k", TFDS_DATA_DIR, "val", format="tfds")

Transforms (mmseg's pipelines; picklable; NumPy/OpenCV)::

    tt = train_transform(crop_size=(512, 512), base_scale=(2048, 512))
    # tt(example, rng) -> {"image": float32 (512, 512, 3) normalized, "label": uint8}
    et = test_transform(scale=(2048, 512), aligned=False)
    # et(example) -> {"image": float32 (h, w, 3), "label": uint8 (H, W) original, "name"}

Training loader (infinite; shuffled per epoch; ``ShardByJaxProcess``; grain worker
processes; device prefetch; exact resume)::

    loader = make_train_loader(source, tt, global_batch_size=16, mesh=mesh,
                               data_axis="data", seed=0, num_workers=4)
    batch = next(loader)   # {"image": f32 (B, H, W, 3), "label": i32 (B, H, W)} global
    state = loader.get_state()   # small JSON-able dict; save it with the checkpoint
    loader.set_state(state)      # continues with exactly the next batch
    loader.close()               # or use it as a context manager

Evaluation::

    loader = make_eval_loader(source, et, global_batch_size=8, mesh=mesh)
    for batch in loader:   # one global batch per image size in each chunk of 8 examples
        batch["image"]  # f32 (8, h, w, 3); "label" i32 (8, H, W) original size;
        batch["valid"]  # bool (8,): False marks padding, counted nowhere

Bad data: sources check their layout when created (missing folder -> the expected
layout; unpaired files -> the first names) and every example when read (unreadable
file, size mismatch, label values outside the data set's raw values ->
``BadExampleError`` naming the file and values). ``skip_bad_examples=True`` drops
unpaired files and makes loaders replace bad examples by the next good one, counted
in ``loader.num_skipped`` and logged. The doctor scans everything::

    python -m cbp_jax.data check --dataset ade20k --root DIR

Other commands: ``convert-cocostuff10k``, ``write-arrayrecord``, ``prepare-tfds``
(``python -m cbp_jax.data -h``).
"""

from __future__ import annotations

from cbp_jax.data.loader import (
    EvalLoader,
    TrainLoader,
    make_eval_loader,
    make_train_loader,
)
from cbp_jax.data.scenes import SCENES, ScenesSource
from cbp_jax.data.sources import (
    ADE20K,
    CAMVID,
    COCOSTUFF10K,
    IGNORE_INDEX,
    BadExampleError,
    DatasetInfo,
    FolderSource,
    LayoutError,
    folder_source,
)
from cbp_jax.data.transforms import (
    TestTransform,
    TrainTransform,
    test_transform,
    train_transform,
)

DATASETS = ("ade20k", "cocostuff10k", "camvid", "scenes")
INFOS = {"ade20k": ADE20K, "cocostuff10k": COCOSTUFF10K, "camvid": CAMVID, "scenes": SCENES}
FORMATS = ("folder", "arrayrecord", "tfds")


def dataset_info(name: str) -> DatasetInfo:
    """Class names, palette and label mapping of data set ``name``."""
    if name not in INFOS:
        raise ValueError(f"unknown data set {name!r}; use one of {list(DATASETS)}")
    return INFOS[name]


def make_source(
    name: str,
    root: str | None = None,
    split: str = "train",
    *,
    format: str = "folder",  # noqa: A002 -- the natural name for users
    skip_bad_examples: bool = False,
    **opts,
):
    """A random-access source of split ``split`` of data set ``name``.

    Args:
        name: "ade20k", "cocostuff10k", "camvid" or "scenes".
        root: data folder (format "folder"), shard folder ("arrayrecord") or TFDS
            data dir ("tfds"); unused for "scenes".
        split: ade20k: train/val; cocostuff10k: train/test (val = test); camvid:
            train/val/test; scenes: any name.
        format: "folder", "arrayrecord" or "tfds".
        skip_bad_examples: skip unpaired files and bad examples (counted, logged)
            instead of raising.
        **opts: "scenes" only: num_images, height, width, seed.

    Returns:
        A source with ``len``, ``[i]`` -> {"image", "label", "name"}, ``num_classes``,
        ``class_names``, ``palette``.
    """
    dataset_info(name)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of {list(FORMATS)}")
    if opts and name != "scenes":
        raise TypeError(f"make_source({name!r}) takes no options {sorted(opts)}")
    if name == "scenes":
        if format != "folder" and root is None:
            raise ValueError(f"format={format!r} needs root")
        if format == "folder":
            return ScenesSource(split, **opts)
    if root is None:
        raise ValueError(f"make_source({name!r}) needs root (the data folder)")
    if format == "folder":
        return folder_source(name, root, split, skip_bad_examples=skip_bad_examples)
    if format == "arrayrecord":
        from cbp_jax.data.arrayrecord import ArrayRecordSource

        source = ArrayRecordSource(root, split, skip_bad_examples=skip_bad_examples)
        if source.info.name != name:
            raise ValueError(f"shards in {root} hold {source.info.name!r}, not {name!r}")
        return source
    from cbp_jax.data.tfds_builders import TfdsSource

    return TfdsSource(name, root, split, skip_bad_examples=skip_bad_examples)


__all__ = [
    "ADE20K",
    "CAMVID",
    "COCOSTUFF10K",
    "DATASETS",
    "IGNORE_INDEX",
    "SCENES",
    "BadExampleError",
    "DatasetInfo",
    "EvalLoader",
    "FolderSource",
    "LayoutError",
    "ScenesSource",
    "TestTransform",
    "TrainLoader",
    "TrainTransform",
    "dataset_info",
    "make_eval_loader",
    "make_source",
    "make_train_loader",
    "test_transform",
    "train_transform",
]
