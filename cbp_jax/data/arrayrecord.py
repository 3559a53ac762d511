"""Prepared data for pods: ArrayRecord shards of encoded examples, read with grain.

A split is ``<dir>/<split>-SSSSS-of-NNNNN.array_record`` plus ``<dir>/<split>.json``
(data set name, split, example count, whether labels are raw or already train ids).
One record is one example::

    b"CBP1" | uint32 LE len(name), len(image), len(label) | name utf-8 | image | label

with the image and label files' bytes as they are (JPEG/PNG, never re-encoded);
generated sources (scenes) are stored as PNG. Reading decodes and maps the label
exactly like the folder sources, so a shard and its folder give equal examples.
"""

from __future__ import annotations

import json
import logging
import os
import struct

import cv2
import grain
import numpy as np

from cbp_jax import storage
from cbp_jax.data import sources as src_lib

log = logging.getLogger(__name__)

MAGIC = b"CBP1"
_HEADER = struct.Struct("<III")
_TRAIN_IDS = "train_ids"
_RAW = "raw"


def encode_record(name: str, image_bytes: bytes, label_bytes: bytes) -> bytes:
    """One example -> record bytes (see the module docstring)."""
    name_b = name.encode()
    header = _HEADER.pack(len(name_b), len(image_bytes), len(label_bytes))
    return MAGIC + header + name_b + image_bytes + label_bytes


def decode_record(record: bytes, where: str) -> tuple[str, bytes, bytes]:
    """Record bytes -> (name, image bytes, label bytes); ``BadExampleError`` if corrupt."""
    if record[:4] != MAGIC or len(record) < 4 + _HEADER.size:
        raise src_lib.BadExampleError(where, "not a cbp_jax record (bad magic)")
    n, i, lab = _HEADER.unpack_from(record, 4)
    start = 4 + _HEADER.size
    if len(record) != start + n + i + lab:
        raise src_lib.BadExampleError(where, f"truncated record ({len(record)} bytes)")
    name = record[start : start + n].decode()
    image = record[start + n : start + n + i]
    return name, image, record[start + n + i :]


def _png(array: np.ndarray) -> bytes:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def write_arrayrecord(
    source, out_dir: str, *, examples_per_shard: int = 1000, check: bool = True
) -> dict:
    """Writes a source's split as ArrayRecord shards into ``out_dir`` (local or ``gs://``:
    written locally, then copied); returns the metadata written.

    Folder sources store their files' bytes and raw labels; other sources
    (scenes) store PNG-encoded examples with train-id labels. With ``check``,
    every example is decoded and its labels validated first: a bad one raises
    ``BadExampleError`` naming the file, or is left out and counted when
    ``source.skip_bad_examples`` is set.
    """
    with storage.staged(out_dir) as local:  # array_record writes local files only
        os.makedirs(local, exist_ok=True)
        return _write_shards(source, local, examples_per_shard, check)


def _write_shards(source, out_dir: str, examples_per_shard: int, check: bool) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    n = len(source)
    num_shards = max(1, -(-n // examples_per_shard))
    split = source.split
    files = [f"{split}-{s:05d}-of-{num_shards:05d}.array_record" for s in range(num_shards)]
    has_files = hasattr(source, "image_paths")
    written, bad = 0, []
    writer, shard = None, -1
    for i in range(n):
        if i // examples_per_shard != shard:
            if writer is not None:
                writer.close()
            shard = i // examples_per_shard
            writer = ArrayRecordWriter(os.path.join(out_dir, files[shard]), "group_size:1")
        try:
            if has_files:
                if check:
                    source[i]
                image_b = storage.path(source.image_paths[i]).read_bytes()
                label_b = storage.path(source.label_paths[i]).read_bytes()
                name = source.names[i]
            else:
                ex = source[i]
                name, image_b, label_b = ex["name"], _png(ex["image"]), _png(ex["label"])
        except src_lib.BadExampleError as e:
            if not source.skip_bad_examples:
                raise
            bad.append(str(e))
            log.warning("left out of the shards: %s", e)
            continue
        writer.write(encode_record(name, image_b, label_b))
        written += 1
    if writer is not None:
        writer.close()
    meta = {
        "format": "cbp_jax.seg.v1",
        "dataset": source.info.name,
        "split": split,
        "num_examples": written,
        "num_bad_left_out": len(bad),
        "labels": _RAW if has_files else _TRAIN_IDS,
        "files": files,
    }
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _info(name: str) -> src_lib.DatasetInfo:
    from cbp_jax.data.scenes import SCENES

    infos = {**src_lib.INFOS, SCENES.name: SCENES}
    if name not in infos:
        raise ValueError(f"unknown data set {name!r} in shard metadata; known: {sorted(infos)}")
    return infos[name]


class ArrayRecordSource:
    """A split written by ``write_arrayrecord``; same examples as its folder source."""

    def __init__(self, directory: str, split: str, skip_bad_examples: bool = False):
        meta_path = os.path.join(directory, f"{split}.json")
        if not storage.path(meta_path).is_file():
            found = sorted(p.name for p in storage.path(directory).glob("*.json"))
            raise src_lib.LayoutError(
                f"no ArrayRecord split {split!r} in {directory}: {meta_path} is missing "
                f"(metadata files there: {found}); write it with `python -m cbp_jax.data "
                "write-arrayrecord`"
            )
        self.meta = json.loads(storage.path(meta_path).read_text())
        self.info = _info(self.meta["dataset"])
        self.split = split
        self.skip_bad_examples = skip_bad_examples
        paths = [os.path.join(directory, p) for p in self.meta["files"]]
        missing = [p for p in paths if not storage.path(p).is_file()]
        if missing:
            raise src_lib.LayoutError(
                f"ArrayRecord shards listed in {meta_path} are missing: {missing}"
            )
        self._paths = paths
        self._reader = grain.sources.ArrayRecordDataSource(paths)
        if len(self._reader) != self.meta["num_examples"]:
            raise src_lib.LayoutError(
                f"{directory}: shards hold {len(self._reader)} records but {meta_path} says "
                f"{self.meta['num_examples']}; rewrite the split"
            )
        if self.meta["labels"] == _TRAIN_IDS:
            # Labels already hold train ids: allow exactly 0..N-1 and 255.
            self._lut = np.full(256, -1, np.int16)
            self._lut[: self.info.num_classes] = np.arange(self.info.num_classes)
            self._lut[src_lib.IGNORE_INDEX] = src_lib.IGNORE_INDEX
        else:
            self._lut = self.info.lut

    num_classes = property(lambda self: self.info.num_classes)
    class_names = property(lambda self: self.info.class_names)
    palette = property(lambda self: self.info.palette)

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, index: int) -> dict:
        where = f"{os.path.dirname(self._paths[0])}/{self.split}[{int(index)}]"
        name, image_b, label_b = decode_record(self._reader[int(index)], where)
        where = f"{where} ({name})"
        return src_lib.make_example(image_b, label_b, name, self.info, where, where, self._lut)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.info.name}, split={self.split!r}, n={len(self)})"
