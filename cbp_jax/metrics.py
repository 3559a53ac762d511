"""mmseg's segmentation metrics from a data-set confusion matrix accumulated on device.

Per image, pixels labelled ``ignore_index`` are dropped; intersection, prediction and label
areas are accumulated over the WHOLE data set (rows = label, columns = prediction); then
IoU = I / (P + L - I), Acc = I / L, aAcc = sum I / sum L, and mIoU / mAcc are NaN-ignoring
means, x 100. Inputs may be global arrays sharded over a mesh of several processes: the
per-batch counts are replicated, so every process reads the same data-set matrix.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

INT32_MAX = 2**31 - 1


def valid_label_mask(labels: jax.Array, num_classes: int, ignore_index: int = 255) -> jax.Array:
    """Pixels that count: labels in ``[0, num_classes)`` and not ``ignore_index``."""
    return (labels != ignore_index) & (labels >= 0) & (labels < num_classes)


def _replicated(counts: jax.Array) -> jax.Array:
    """``counts`` replicated over the context mesh, if any, so every process can read it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.explicit_axes:
        return counts
    return jax.lax.with_sharding_constraint(counts, PartitionSpec())


def _replicated_out(x: jax.Array) -> dict[str, Any]:
    """``out_sharding`` for a scatter over ``x``: replicated on meshes with Explicit axes
    (which cannot infer it), nothing otherwise."""
    mesh = jax.typeof(x).sharding.mesh
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return {"out_sharding": NamedSharding(mesh, PartitionSpec())}
    return {}


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def confusion_matrix_update(
    conf: jax.Array,
    labels: jax.Array,
    preds: jax.Array,
    *,
    num_classes: int,
    ignore_index: int = 255,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Adds one batch to a confusion matrix, inside jit.

    Pixels whose label is ``ignore_index`` or outside ``[0, num_classes)``, and every pixel of
    an image whose ``valid`` is False (the padding of a global batch), are dropped. The batch
    counts are int32, so one call must see fewer than 2**31 pixels; ``ConfusionAccumulator``
    flushes to an int64 host matrix before the running device matrix could overflow. Sharded
    inputs give the global matrix (XLA adds the all-reduce).

    Args:
      conf: (N, N) int running matrix, rows = label, columns = prediction.
      labels: (B, ...) int labels, e.g. (B, H, W).
      preds: (B, ...) int predictions, same shape as ``labels``.
      num_classes: N.
      ignore_index: the label value to drop.
      valid: optional (B,) bool; False drops the whole image.

    Returns:
      (N, N) ``conf`` plus this batch's counts, in ``conf``'s dtype.
    """
    n = num_classes
    keep = valid_label_mask(labels, n, ignore_index) & (preds >= 0) & (preds < n)
    if valid is not None:
        keep &= valid.reshape(valid.shape + (1,) * (labels.ndim - valid.ndim))
    segment = jnp.where(keep, labels.astype(jnp.int32) * n + preds.astype(jnp.int32), n * n)
    segment = segment.reshape(-1)
    counts = jax.ops.segment_sum(
        jnp.ones_like(segment), segment, num_segments=n * n + 1, **_replicated_out(segment)
    )
    return conf + _replicated(counts[: n * n].reshape(n, n).astype(conf.dtype))


def _add_batch(conf, num_images, labels, preds, valid, *, num_classes, ignore_index):
    conf = confusion_matrix_update(
        conf, labels, preds, num_classes=num_classes, ignore_index=ignore_index, valid=valid
    )
    seen = labels.shape[0] if valid is None else jnp.sum(valid.astype(jnp.int32))
    return conf, num_images + _replicated(jnp.asarray(seen, jnp.int32))


_update_from_preds = jax.jit(_add_batch, static_argnames=("num_classes", "ignore_index"))


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def _update_from_scores(conf, num_images, labels, scores, valid, *, num_classes, ignore_index):
    preds = jnp.argmax(scores, axis=-1)
    return _add_batch(
        conf, num_images, labels, preds, valid, num_classes=num_classes, ignore_index=ignore_index
    )


def _replicated_sharding(x) -> jax.sharding.Sharding | None:
    """Where a matrix that adds up ``x``'s batches lives: replicated over ``x``'s devices."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding


class ConfusionAccumulator:
    """Data-set confusion matrix: int32 counts on device, flushed exactly into int64 on host.

    The device matrix is only read back when the pixels added since the last flush could
    exceed 2**31 - 1 (every ~2e9 pixels, i.e. never for ADE20K val's ~7e8), and at
    ``result()``. The pixel count is known from shapes, so deciding costs no transfer. Also
    counts the images it saw (the ``valid`` ones), on device.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._host = np.zeros((num_classes, num_classes), np.int64)
        self._host_images = 0
        self._device = self._device_images = None
        self._pending = 0

    def _reserve(self, labels: jax.Array) -> None:
        num_pixels = math.prod(labels.shape)
        if num_pixels > INT32_MAX:
            raise ValueError(
                f"One update of {num_pixels} pixels exceeds int32; split the batch into "
                f"updates of fewer than {INT32_MAX} pixels."
            )
        if self._pending + num_pixels > INT32_MAX:
            self.flush()
        self._pending += num_pixels
        if self._device is None:
            where = _replicated_sharding(labels)
            n = self.num_classes
            self._device = jnp.zeros((n, n), jnp.int32, device=where)
            self._device_images = jnp.zeros((), jnp.int32, device=where)

    def update(self, labels: jax.Array, preds: jax.Array, valid: jax.Array | None = None) -> None:
        """Adds (B, H, W) int ``labels`` and ``preds``; images whose optional (B,) ``valid``
        is False count nothing."""
        self._add(_update_from_preds, labels, preds, valid)

    def update_from_scores(
        self, labels: jax.Array, scores: jax.Array, valid: jax.Array | None = None
    ) -> None:
        """Adds (B, H, W) ``labels`` and the argmax of (B, H, W, N) ``scores``; images whose
        optional (B,) ``valid`` is False count nothing."""
        self._add(_update_from_scores, labels, scores, valid)

    def _add(self, update, labels, preds_or_scores, valid) -> None:
        self._reserve(labels)
        self._device, self._device_images = update(
            self._device,
            self._device_images,
            labels,
            preds_or_scores,
            valid,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )

    def wait(self) -> None:
        """Blocks until every update so far has run on its devices (no transfer)."""
        jax.block_until_ready((self._device, self._device_images))

    def flush(self) -> None:
        """Moves the device counts into the host int64 matrix (the only read back)."""
        if self._device is None:
            return
        self._host += np.asarray(jax.device_get(self._device), np.int64)
        self._host_images += int(jax.device_get(self._device_images))
        self._device = self._device_images = None
        self._pending = 0

    @property
    def num_images(self) -> int:
        """Images added so far (reads the device counter)."""
        self.flush()
        return self._host_images

    def result(self) -> np.ndarray:
        """Returns the (N, N) int64 matrix (rows = label, columns = prediction)."""
        self.flush()
        return self._host.copy()


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def nanmean(x: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN when there is none."""
    x = np.asarray(x, np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def metrics_from_confusion(conf: np.ndarray) -> dict[str, Any]:
    """mmseg's metrics from a data-set confusion matrix, in percent.

    Per class (NaN where undefined): ``IoU`` = I / (P + L - I) (NaN when the union is 0),
    ``Acc`` = recall = I / L (NaN when the class is absent from the labels), ``Precision`` =
    I / P, ``F1`` = 2I / (P + L) (NaN when both are 0; a class predicted but never right gets 0,
    where mmseg's ``Fscore`` from precision and recall would give NaN). ``mIoU``, ``mAcc``,
    ``mF1`` are NaN-ignoring means; ``aAcc`` = sum I / sum L.

    Args:
      conf: (N, N) counts, rows = label, columns = prediction.

    Returns:
      Dict with (N,) float64 arrays ``IoU``, ``Acc``, ``Precision``, ``F1``, int64
      ``intersect``, ``union``, ``label_area``, ``pred_area``; floats ``mIoU``, ``mAcc``,
      ``mF1``, ``aAcc``; and ``confusion_matrix`` (int64).
    """
    conf = np.asarray(conf, np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"conf must be a square (N, N) matrix, got shape {conf.shape}.")
    intersect = np.diag(conf).copy()
    label_area = conf.sum(1)
    pred_area = conf.sum(0)
    union = label_area + pred_area - intersect
    iou = 100 * _safe_div(intersect, union)
    acc = 100 * _safe_div(intersect, label_area)
    precision = 100 * _safe_div(intersect, pred_area)
    f1 = 100 * _safe_div(2 * intersect, label_area + pred_area)
    total = label_area.sum()
    return {
        "mIoU": nanmean(iou),
        "mAcc": nanmean(acc),
        "mF1": nanmean(f1),
        "aAcc": float(100 * intersect.sum() / total) if total else float("nan"),
        "IoU": iou,
        "Acc": acc,
        "Precision": precision,
        "F1": f1,
        "intersect": intersect,
        "union": union,
        "label_area": label_area,
        "pred_area": pred_area,
        "confusion_matrix": conf,
    }


def check_labels(labels: np.ndarray, num_classes: int, ignore_index: int = 255) -> None:
    """Raises if host ``labels`` hold values outside ``[0, num_classes)`` and ``ignore_index``."""
    labels = np.asarray(labels)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values = np.unique(labels[bad])[:10].tolist()
        raise ValueError(
            f"labels hold values {values} outside [0, {num_classes}) and ignore_index "
            f"{ignore_index}. Check reduce_zero_label (ADE20K / COCO-Stuff map 0 -> 255 and "
            f"l -> l - 1 exactly once) and num_classes."
        )


def class_names_or_indices(class_names: Sequence[str] | None, n: int) -> list[str]:
    """``class_names`` as strings (checked to be N of them), or "0".."N-1"."""
    if class_names is None:
        return [str(i) for i in range(n)]
    if len(class_names) != n:
        raise ValueError(f"got {len(class_names)} class names for {n} classes; pass one per class.")
    return [str(s) for s in class_names]


def format_class_table(
    metrics: dict[str, Any],
    class_names: Sequence[str] | None = None,
    columns: Sequence[str] = ("IoU", "Acc", "F1"),
) -> str:
    """Per-class table (like mmseg's log) followed by the summary line; NaN shows as 'nan'."""
    names = class_names_or_indices(class_names, len(metrics["IoU"]))
    width = max([5] + [len(s) for s in names])
    lines = [f"| {'Class':<{width}} | " + " | ".join(f"{c:>9}" for c in columns) + " |"]
    lines.append("|" + "-" * (width + 2) + "|" + "|".join("-" * 11 for _ in columns) + "|")
    for i, name in enumerate(names):
        vals = " | ".join(f"{metrics[c][i]:9.2f}" for c in columns)
        lines.append(f"| {name:<{width}} | {vals} |")
    lines.append(
        f"aAcc {metrics['aAcc']:.2f}  mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  "
        f"mF1 {metrics['mF1']:.2f}"
    )
    return "\n".join(lines)
