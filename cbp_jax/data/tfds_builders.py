"""TFDS builders for ADE20K-150 and COCO-Stuff-10K from a manual directory.

Importing this module registers the builders ``ade20k150`` and ``coco_stuff10k``
(the catalog's ``scene_parse150`` is the 2017 instance-challenge data, not
ADE20K-150). Preparing writes ArrayRecord files with the images' and labels'
original bytes and needs no TensorFlow; reading uses ``tfds.data_source`` (no
TensorFlow either)::

    python -m cbp_jax.data prepare-tfds --dataset ade20k --manual-dir ADE --data-dir TFDS
    source = make_source("ade20k", "TFDS", "val", format="tfds")

Labels are stored raw (single-channel PNG) and mapped at read time by
``TfdsSource``, exactly like the folder sources.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from etils import epath

from cbp_jax import storage
from cbp_jax.data import sources as src_lib

_FEATURES = dict(
    image=dict(shape=(None, None, 3), encoding_format="jpeg"),
    label=dict(shape=(None, None, 1), encoding_format="png"),
)


def _features():
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(**_FEATURES["image"]),
            "label": tfds.features.Image(**_FEATURES["label"]),
            "name": tfds.features.Text(),
        }
    )


class _SegBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images and raw label PNGs with their original bytes."}
    DATASET = ""  # cbp_jax data set name
    SPLITS: dict[str, str] = {}  # TFDS split -> folder split

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's default looks the module up through `importlib_resources`, which this
        # environment lacks; the builders live in this file.
        return epath.Path(__file__)

    def __init__(self, *, file_format="array_record", **kwargs):
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=_features(),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {s: self._generate_examples(root, folder) for s, folder in self.SPLITS.items()}

    def _generate_examples(self, root: str, split: str):
        images, labels, names = src_lib.folder_paths(self.DATASET, root, split)
        for image, label, name in zip(images, labels, names, strict=True):
            yield name, {"image": image, "label": label, "name": name}


class Ade20k150(_SegBuilder):
    """ADE20K SceneParsing-150 (ADEChallengeData2016): 20,210 train, 2,000 val."""

    DATASET = "ade20k"
    SPLITS = {"train": "train", "validation": "val"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu/) and "
        "unzip it; the manual dir is the folder holding ADEChallengeData2016/ (or it)."
    )


class CocoStuff10k(_SegBuilder):
    """COCO-Stuff-10K in mmseg's converted layout: 9,000 train, 1,000 test."""

    DATASET = "cocostuff10k"
    SPLITS = {"train": "train", "test": "test"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download cocostuff-10k-v1.1.zip, convert it with `python -m cbp_jax.data "
        "convert-cocostuff10k --raw DIR --out OUT`; the manual dir is OUT."
    )


BUILDERS = {"ade20k": Ade20k150, "cocostuff10k": CocoStuff10k}
TFDS_SPLITS = {"ade20k": {"train": "train", "val": "validation", "validation": "validation"}}
TFDS_SPLITS["cocostuff10k"] = {"train": "train", "test": "test", "val": "test"}


def prepare(dataset: str, manual_dir: str, data_dir: str) -> None:
    """Prepares the TFDS data of ``dataset`` ("ade20k" or "cocostuff10k") in ``data_dir``
    (local, or ``gs://``: prepared in a local folder, then copied)."""
    if dataset not in BUILDERS:
        raise ValueError(f"no TFDS builder for {dataset!r}; use one of {sorted(BUILDERS)}")
    with storage.staged(data_dir) as local:  # array_record writes local files only
        builder = BUILDERS[dataset](data_dir=local)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )


class TfdsSource:
    """A prepared TFDS split read with ``tfds.data_source``; same examples as folders."""

    def __init__(self, dataset: str, data_dir: str, split: str, skip_bad_examples: bool = False):
        if dataset not in BUILDERS:
            raise ValueError(f"no TFDS builder for {dataset!r}; use one of {sorted(BUILDERS)}")
        if split not in TFDS_SPLITS[dataset]:
            raise ValueError(
                f"{dataset}: unknown split {split!r}; use {sorted(TFDS_SPLITS[dataset])}"
            )
        self.info = src_lib.INFOS[dataset]
        self.split = split
        self.skip_bad_examples = skip_bad_examples
        name = BUILDERS[dataset].name
        skip = tfds.decode.SkipDecoding()
        try:
            self._ds = tfds.data_source(
                name,
                split=TFDS_SPLITS[dataset][split],
                data_dir=os.fspath(storage.path(data_dir)),  # local or gs://
                download=False,
                decoders={"image": skip, "label": skip},
            )
        except Exception as e:  # noqa: BLE001 -- tfds raises several types here
            raise src_lib.LayoutError(
                f"cannot open TFDS {name} split {split!r} in {data_dir}: {e}. Prepare it with "
                f"`python -m cbp_jax.data prepare-tfds --dataset {dataset} --manual-dir DIR "
                f"--data-dir {data_dir}`"
            ) from e
        self._where = f"tfds:{name}/{split}"

    num_classes = property(lambda self: self.info.num_classes)
    class_names = property(lambda self: self.info.class_names)
    palette = property(lambda self: self.info.palette)

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> dict:
        record = self._ds[int(index)]
        name = record["name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        where = f"{self._where}[{int(index)}] ({name})"
        return src_lib.make_example(record["image"], record["label"], name, self.info, where, where)

    def __repr__(self) -> str:
        return f"TfdsSource({self.info.name}, split={self.split!r}, n={len(self)})"
