"""Evaluation: mmseg-exact metrics, whole/slide inference with test-time resizing, reports.

The library takes a ``logits_fn`` callable and imports no model or data code (only the
shared resize op of ``cbp_jax.models.layers``):

    logits_fn(images (B, h, w, 3) float32) -> logits (B, h', w', N)

at any output resolution (SegFormer and UperNet give 1/4). Jit it yourself (``jax.jit`` over
the model state, or ``nnx.jit``); it is called with one shape per distinct input size.

Conventions follow mmsegmentation (0.x ``EncoderDecoder`` / 1.x ``SegTTAModel``):

- Logits are resized to the network input size, then to the original label size, with
  bilinear ``align_corners=False`` interpolation (no antialiasing), then argmax.
- Slide inference: windows on mmseg's grid, clamped to the image, logits summed and divided by
  the count of windows covering each pixel.
- Multi-scale / flip: the softmax probabilities at the original size are averaged (mmseg 0.x
  ``aug_test`` and 1.x ``SegTTAModel.merge_preds`` both do this). With ``scale`` set, ratio
  ``r`` resizes to ``(int(long * r), int(short * r))`` keeping the ratio (mmseg 0.x /
  NVlabs ``MultiScaleFlipAug``, where the published ms+flip numbers come from); with
  ``scale=None`` the ratio is relative to the given image (mmseg 1.x ``Resize(scale_factor)``).
- Metrics: per-class intersection / union / label / prediction areas accumulated over the
  whole data set in a confusion matrix; NaN-ignoring means, x 100.

Compilation: ``logits_fn`` compiles once per input shape it sees (one per crop size in slide
mode; whole mode sees every test size, which ``aligned=True`` buckets to multiples of 32), and
the small resize/argmax/confusion jits compile once per (input, label) shape pair.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from cbp_jax.models import layers

LogitsFn = Callable[[jax.Array], jax.Array]

INT32_MAX = 2**31 - 1
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _replicated_out(x: jax.Array) -> dict[str, Any]:
    """``out_sharding`` for a scatter over ``x``: replicated on meshes with Explicit axes
    (which cannot infer it), nothing otherwise."""
    mesh = jax.typeof(x).sharding.mesh
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return {"out_sharding": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}
    return {}


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def confusion_matrix_update(
    conf: jax.Array,
    labels: jax.Array,
    preds: jax.Array,
    *,
    num_classes: int,
    ignore_index: int = 255,
) -> jax.Array:
    """Adds one batch to a confusion matrix, inside jit.

    Pixels whose label is ``ignore_index`` or outside ``[0, num_classes)`` are dropped (they go
    to an extra segment that is sliced off). The batch counts are int32, so one call must see
    fewer than 2**31 pixels; ``ConfusionAccumulator`` flushes to an int64 host matrix before
    the running device matrix could overflow. Sharded inputs give the global matrix (XLA adds
    the all-reduce).

    Args:
      conf: (N, N) int running matrix, rows = label, columns = prediction.
      labels: (...) int labels, e.g. (B, H, W).
      preds: (...) int predictions, same shape as ``labels``.
      num_classes: N.
      ignore_index: the label value to drop.

    Returns:
      (N, N) ``conf`` plus this batch's counts, in ``conf``'s dtype.
    """
    n = num_classes
    labels = labels.reshape(-1).astype(jnp.int32)
    preds = preds.reshape(-1).astype(jnp.int32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < n) & (preds >= 0) & (preds < n)
    segment = jnp.where(valid, labels * n + preds, n * n)
    counts = jax.ops.segment_sum(
        jnp.ones_like(segment), segment, num_segments=n * n + 1, **_replicated_out(segment)
    )
    return conf + counts[: n * n].reshape(n, n).astype(conf.dtype)


@functools.partial(jax.jit, static_argnames=("num_classes", "ignore_index"))
def _update_from_scores(conf, labels, scores, *, num_classes, ignore_index):
    preds = jnp.argmax(scores, axis=-1)
    return confusion_matrix_update(
        conf, labels, preds, num_classes=num_classes, ignore_index=ignore_index
    )


class ConfusionAccumulator:
    """Data-set confusion matrix: int32 counts on device, flushed exactly into int64 on host.

    The device matrix is only read back when the pixels added since the last flush could
    exceed 2**31 - 1 (every ~2e9 pixels, i.e. never for ADE20K val's ~7e8), and at
    ``result()``. The pixel count is known from shapes, so deciding costs no transfer.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._host = np.zeros((num_classes, num_classes), np.int64)
        self._device = jnp.zeros((num_classes, num_classes), jnp.int32)
        self._pending = 0

    def _reserve(self, num_pixels: int) -> None:
        if num_pixels > INT32_MAX:
            raise ValueError(
                f"One update of {num_pixels} pixels exceeds int32; split the batch into "
                f"updates of fewer than {INT32_MAX} pixels."
            )
        if self._pending + num_pixels > INT32_MAX:
            self.flush()
        self._pending += num_pixels

    def update(self, labels: jax.Array, preds: jax.Array) -> None:
        """Adds (B, H, W) int ``labels`` and ``preds``."""
        self._reserve(math.prod(labels.shape))
        self._device = confusion_matrix_update(
            self._device,
            labels,
            preds,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )

    def update_from_scores(self, labels: jax.Array, scores: jax.Array) -> None:
        """Adds (B, H, W) ``labels`` and the argmax of (B, H, W, N) ``scores``."""
        self._reserve(math.prod(labels.shape))
        self._device = _update_from_scores(
            self._device,
            labels,
            scores,
            num_classes=self.num_classes,
            ignore_index=self.ignore_index,
        )

    def flush(self) -> None:
        """Moves the device counts into the host int64 matrix."""
        self._host += np.asarray(jax.device_get(self._device), np.int64)
        self._device = jnp.zeros_like(self._device)
        self._pending = 0

    def result(self) -> np.ndarray:
        """Returns the (N, N) int64 matrix (rows = label, columns = prediction)."""
        self.flush()
        return self._host.copy()


def sum_across_processes(conf: np.ndarray) -> np.ndarray:
    """Sums an int64 (N, N) confusion matrix over JAX processes (identity on one process).

    Without ``jax_enable_x64`` the gather would truncate to int32, so the counts travel as
    24-bit low and high int32 words; exact while every process count is below 2**55 and the
    number of processes below 128.
    """
    conf = np.asarray(conf, np.int64)
    if jax.process_count() == 1:
        return conf
    from jax.experimental import multihost_utils

    lo, hi = split_counts(conf)
    lo_all, hi_all = multihost_utils.process_allgather((lo, hi))
    return join_counts(np.asarray(lo_all).sum(0), np.asarray(hi_all).sum(0))


def split_counts(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Splits non-negative int64 counts into int32 (low 24 bits, the rest)."""
    conf = np.asarray(conf, np.int64)
    if conf.min(initial=0) < 0 or conf.max(initial=0) >= 2**55:
        raise ValueError("counts must lie in [0, 2**55) to be split into int32 words.")
    return (conf & (2**24 - 1)).astype(np.int32), (conf >> 24).astype(np.int32)


def join_counts(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Inverse of ``split_counts`` (also after summing the words separately)."""
    return np.asarray(lo, np.int64) + (np.asarray(hi, np.int64) << 24)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
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
        "mIoU": _nanmean(iou),
        "mAcc": _nanmean(acc),
        "mF1": _nanmean(f1),
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


def format_class_table(
    metrics: dict[str, Any],
    class_names: Sequence[str] | None = None,
    columns: Sequence[str] = ("IoU", "Acc", "F1"),
) -> str:
    """Per-class table (like mmseg's log) followed by the summary line; NaN shows as 'nan'."""
    n = len(metrics["IoU"])
    names = _class_names(class_names, n)
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


def _class_names(class_names: Sequence[str] | None, n: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(n)]
    if len(class_names) != n:
        raise ValueError(f"got {len(class_names)} class names for {n} classes; pass one per class.")
    return [str(s) for s in class_names]


# ---------------------------------------------------------------------------------------------
# Test-time sizes (mmcv semantics) and resizing
# ---------------------------------------------------------------------------------------------


def _scale_size(size_wh: tuple[int, int], factor: float) -> tuple[int, int]:
    w, h = size_wh
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


def rescale_size(size_hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv ``rescale_size`` keeping the ratio: the largest size within (long, short) edges.

    Args:
      size_hw: (H, W) of the image.
      scale: two edges, e.g. (2048, 512); the larger bounds the long side, the smaller the
        short side, whatever their order.

    Returns:
      (new_H, new_W), each ``int(side * factor + 0.5)`` with
      ``factor = min(long_edge / max(H, W), short_edge / min(H, W))``.
    """
    h, w = size_hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_w, new_h = _scale_size((w, h), factor)
    return new_h, new_w


def aligned_size(size_hw: tuple[int, int], size_divisor: int = 32) -> tuple[int, int]:
    """NVlabs ``AlignedResize``: each side rounded UP to a multiple of ``size_divisor``."""
    h, w = size_hw
    return (
        int(math.ceil(h / size_divisor)) * size_divisor,
        int(math.ceil(w / size_divisor)) * size_divisor,
    )


def eval_resize_sizes(
    size_hw: tuple[int, int],
    *,
    scale: tuple[int, int] | None = None,
    ratio: float = 1.0,
    aligned: bool = False,
    size_divisor: int = 32,
) -> list[tuple[int, int]]:
    """The successive bilinear resizes the test pipeline applies to an (H, W) image.

    ``scale`` set: keep-ratio resize to ``(int(long * ratio), int(short * ratio))`` (mmseg 0.x
    ``MultiScaleFlipAug``; ratio 1 is the single-scale ``Resize(scale)``). ``scale`` None and
    ``ratio != 1``: mmseg 1.x ``Resize(scale_factor=ratio, keep_ratio=True)``. ``aligned``
    then resizes that result again to the next multiple of ``size_divisor`` (NVlabs resizes
    twice). Sizes equal to the current size are left out.

    Returns:
      List of (h, w) targets, in order; empty when the image is used as is.
    """
    if ratio <= 0:
        raise ValueError(f"ratio must be positive, got {ratio}.")
    h, w = size_hw
    if scale is not None:
        long_e, short_e = max(scale), min(scale)
        target = rescale_size((h, w), (int(long_e * ratio), int(short_e * ratio)))
    elif ratio != 1.0:
        target = rescale_size((h, w), _scale_size((w, h), ratio))
    else:
        target = (h, w)
    sizes = [target] if target != (h, w) else []
    if aligned:
        final = aligned_size(target, size_divisor)
        if final != target:
            sizes.append(final)
    return sizes


# Bilinear resize like PyTorch ``F.interpolate(..., align_corners=False)`` and OpenCV
# ``INTER_LINEAR`` (half-pixel centres, no antialiasing), one compile per (shape, size).
resize_bilinear = jax.jit(layers.resize_bilinear, static_argnames=("size",))


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name} must be a positive int or (h, w) pair, got {v}.")
    return v


def _check_logits(logits: jax.Array, batch: int, num_classes: int | None) -> None:
    if logits.ndim != 4 or logits.shape[0] != batch:
        raise ValueError(
            f"logits_fn must return (B, h, w, N) logits with B={batch}, got shape "
            f"{tuple(logits.shape)}; return channels-last logits for the whole batch."
        )
    if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(
            f"logits_fn returned {logits.shape[-1]} channels but num_classes={num_classes}."
        )


def whole_inference(
    logits_fn: LogitsFn, images: jax.Array, *, num_classes: int | None = None
) -> jax.Array:
    """Runs ``logits_fn`` on whole (B, H, W, 3) images; returns (B, H, W, N) logits resized to
    the input size."""
    logits = logits_fn(images)
    _check_logits(logits, images.shape[0], num_classes)
    return resize_bilinear(logits, tuple(images.shape[1:3]))


def _grid_1d(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
    grids = max(size - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(grids):
        end = min(i * stride + crop, size)
        spans.append((max(end - crop, 0), end))
    return spans


def slide_windows(
    height: int, width: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """mmseg ``slide_inference``'s windows, in its loop order (rows outer).

    ``h_grids = max(H - crop_h + stride_h - 1, 0) // stride_h + 1`` (same for w); window
    ``(y1, y2, x1, x2)`` with ``y2 = min(i * stride_h + crop_h, H)``,
    ``y1 = max(y2 - crop_h, 0)``. Every window is ``min(crop, size)`` on each side.
    """
    (ch, cw), (sh, sw) = _pair(crop, "crop"), _pair(stride, "stride")
    return [
        (y1, y2, x1, x2)
        for y1, y2 in _grid_1d(height, ch, sh)
        for x1, x2 in _grid_1d(width, cw, sw)
    ]


def slide_count_map(
    height: int, width: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> np.ndarray:
    """(H, W) float32 number of slide windows covering each pixel (mmseg's ``count_mat``)."""
    (ch, cw), (sh, sw) = _pair(crop, "crop"), _pair(stride, "stride")
    rows = np.zeros(height, np.float32)
    cols = np.zeros(width, np.float32)
    for a, b in _grid_1d(height, ch, sh):
        rows[a:b] += 1
    for a, b in _grid_1d(width, cw, sw):
        cols[a:b] += 1
    return rows[:, None] * cols[None, :]


@functools.partial(jax.jit, static_argnames=("size", "pad_to"))
def _gather_windows(images, starts, *, size, pad_to):
    """(B, H, W, C), (K, 2) starts -> (K * B, *size, C), zero-padded bottom/right to pad_to."""
    b, _, _, c = images.shape

    def one(start):
        return jax.lax.dynamic_slice(images, (0, start[0], start[1], 0), (b, *size, c))

    crops = jax.vmap(one)(starts).reshape(-1, *size, c)
    if pad_to != size:
        crops = jnp.pad(crops, ((0, 0), (0, pad_to[0] - size[0]), (0, pad_to[1] - size[1]), (0, 0)))
    return crops


@functools.partial(jax.jit, static_argnames=("size", "model_size"), donate_argnums=(0,))
def _add_window(preds, win_logits, start, *, size, model_size):
    """preds[:, y1:y1+h, x1:x1+w] += win_logits resized to the model input, cropped to size."""
    win = resize_bilinear(win_logits, model_size)[:, : size[0], : size[1]]
    idx = (0, start[0], start[1], 0)
    cur = jax.lax.dynamic_slice(preds, idx, win.shape)
    return jax.lax.dynamic_update_slice(preds, cur + win.astype(preds.dtype), idx)


def slide_inference(
    logits_fn: LogitsFn,
    images: jax.Array,
    *,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int | None = None,
    window_batch: int = 1,
    pad_windows: bool = False,
) -> jax.Array:
    """mmseg sliding-window inference on (B, H, W, 3) images; returns (B, H, W, N) logits.

    Each window's logits are resized to the window size, summed into place and divided by the
    count map. All windows of an image have the same size, ``min(crop, H) x min(crop, W)``, so
    ``logits_fn`` sees one shape per image size, and exactly ``crop`` whenever the image is at
    least the crop (always for ADE20K resized to short side 512 with crop 512).

    Args:
      logits_fn: (k * B, h, w, 3) -> (k * B, h', w', N).
      images: (B, H, W, 3) float32.
      crop: window (h, w) or int.
      stride: step (h, w) or int.
      num_classes: checked against the logits when given.
      window_batch: windows per ``logits_fn`` call (k); the last call is filled up with copies
        of its last window so every call has the same shape.
      pad_windows: zero-pad windows smaller than ``crop`` (images smaller than the crop) to
        the crop size so ``logits_fn`` always sees one shape; the model then sees padding,
        which mmseg does not do (it runs the smaller window), so results differ slightly for
        such images. Default False: mmseg-exact.
    """
    b, h, w, _ = images.shape
    crop_hw = _pair(crop, "crop")
    windows = slide_windows(h, w, crop_hw, stride)
    win_size = (windows[0][1] - windows[0][0], windows[0][3] - windows[0][2])
    model_size = crop_hw if pad_windows else win_size
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1, got {window_batch}.")
    preds = None
    for i in range(0, len(windows), window_batch):
        chunk = windows[i : i + window_batch]
        starts = [(y1, x1) for y1, _, x1, _ in chunk]
        starts += [starts[-1]] * (window_batch - len(chunk))
        crops = _gather_windows(
            images, jnp.asarray(starts, jnp.int32), size=win_size, pad_to=model_size
        )
        logits = logits_fn(crops)
        _check_logits(logits, crops.shape[0], num_classes)
        if preds is None:
            preds = jnp.zeros((b, h, w, logits.shape[-1]), jnp.float32)
        for j, start in enumerate(starts[: len(chunk)]):
            preds = _add_window(
                preds,
                logits[j * b : (j + 1) * b],
                jnp.asarray(start, jnp.int32),
                size=win_size,
                model_size=model_size,
            )
    count = jnp.asarray(slide_count_map(h, w, crop_hw, stride))
    return preds / count[None, :, :, None]


@functools.partial(jax.jit, static_argnames=("size", "flip", "softmax"))
def _to_output(logits, *, size, flip, softmax):
    out = resize_bilinear(logits, size)
    if flip:
        out = out[:, :, ::-1]
    if softmax:
        out = jax.nn.softmax(out, axis=-1)
    return out


def inference(
    logits_fn: LogitsFn,
    images: jax.Array,
    *,
    out_size: tuple[int, int],
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scale: tuple[int, int] | None = None,
    aligned: bool = False,
    size_divisor: int = 32,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    num_classes: int | None = None,
    window_batch: int = 1,
    pad_windows: bool = False,
) -> jax.Array:
    """Test-time pipeline: resize, whole or slide inference, resize back, optional TTA.

    Args:
      logits_fn: (B, h, w, 3) -> (B, h', w', N) logits.
      images: (B, H, W, 3) float32 normalized images, as the data pipeline gives them.
      out_size: (H0, W0) original label size the scores are resized to.
      mode: "whole" or "slide".
      crop, stride: slide window and step (required for "slide").
      scale: keep-ratio test scale such as (2048, 512); None uses the images as given. The
        resize runs here on the normalized float image; mmseg resizes the uint8 image with
        OpenCV before normalizing (same bilinear formula, so they differ by uint8 rounding).
        Resize in the data pipeline instead and leave ``scale`` None to match that exactly.
      aligned: NVlabs AlignedResize (sides rounded up to ``size_divisor``).
      ratios: multi-scale ratios (see ``eval_resize_sizes``).
      flip: also run horizontally flipped images.
      num_classes: checked against the logits when given.
      window_batch, pad_windows: see ``slide_inference``.

    Returns:
      (B, H0, W0, N): logits for one view (ratios == (1.0,), no flip); otherwise the mean of
      the softmax probabilities of all views (mmseg's TTA). Argmax gives the prediction.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}.")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("mode='slide' needs crop and stride, e.g. crop=512, stride=341.")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got shape {tuple(images.shape)}.")
    ratios = tuple(float(r) for r in ratios)
    if not ratios:
        raise ValueError("ratios must hold at least one ratio, e.g. (1.0,).")
    out_size = (int(out_size[0]), int(out_size[1]))
    flips = (False, True) if flip else (False,)
    tta = len(ratios) * len(flips) > 1
    total = None
    for ratio in ratios:
        x = images
        for size in eval_resize_sizes(
            tuple(images.shape[1:3]),
            scale=scale,
            ratio=ratio,
            aligned=aligned,
            size_divisor=size_divisor,
        ):
            x = resize_bilinear(x, size)
        for f in flips:
            xf = x[:, :, ::-1] if f else x
            if mode == "whole":
                logits = whole_inference(logits_fn, xf, num_classes=num_classes)
            else:
                logits = slide_inference(
                    logits_fn,
                    xf,
                    crop=crop,
                    stride=stride,
                    num_classes=num_classes,
                    window_batch=window_batch,
                    pad_windows=pad_windows,
                )
            out = _to_output(logits, size=out_size, flip=f, softmax=tta)
            total = out if total is None else total + out
    return total / (len(ratios) * len(flips)) if tta else total


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


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


def evaluate(
    logits_fn: LogitsFn,
    examples: Iterable[dict[str, Any]],
    *,
    num_classes: int,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scale: tuple[int, int] | None = None,
    aligned: bool = False,
    size_divisor: int = 32,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    ignore_index: int = 255,
    window_batch: int = 1,
    pad_windows: bool = False,
    panel_dir: str | None = None,
    num_panels: int = 0,
    palette: np.ndarray | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Evaluates ``logits_fn`` over ``examples`` with mmseg-exact metrics.

    Each example is a dict with ``"image"`` float32 normalized (H, W, 3) or (B, H, W, 3) and
    ``"label"`` int (H0, W0) or (B, H0, W0) at the ORIGINAL size (images of one batch share
    one size). Labels are checked on host, then everything stays on device: the confusion
    matrix is read back once at the end (only panel images are fetched early).

    Args:
      logits_fn: (B, h, w, 3) -> (B, h', w', N) logits.
      examples: iterable of example dicts.
      num_classes: N.
      mode, crop, stride, scale, aligned, size_divisor, ratios, flip, window_batch,
        pad_windows: see ``inference``.
      ignore_index: label value left out of the metrics.
      panel_dir: where to write ``panel_XXXX.png`` (image | ground truth | prediction).
      num_panels: how many panels to write (the first images).
      palette: (N, 3) uint8 colours; ``default_palette(N)`` when None.
      mean, std: the normalization, undone for the panels.
      progress: show a tqdm progress bar.
      total: length for the progress bar when ``examples`` has no ``len``.

    Returns:
      ``metrics_from_confusion`` of the data-set matrix, plus ``num_images`` and ``panels``
      (the written paths).
    """
    from tqdm.auto import tqdm

    if num_panels and panel_dir is None:
        raise ValueError("num_panels > 0 needs panel_dir, the folder to write the PNGs to.")
    if total is None and hasattr(examples, "__len__"):
        total = len(examples)
    acc = ConfusionAccumulator(num_classes, ignore_index)
    num_images = 0
    panels: list[str] = []
    for example in tqdm(examples, total=total, desc="eval", disable=not progress):
        image, label = example["image"], example["label"]
        if image.ndim == 3:
            image, label = image[None], label[None]
        if label.ndim != 3 or label.shape[0] != image.shape[0]:
            raise ValueError(
                f"label must be (H, W) or (B, H, W) matching the image batch, got label shape "
                f"{tuple(label.shape)} for image shape {tuple(image.shape)}."
            )
        if isinstance(label, np.ndarray):
            check_labels(label, num_classes, ignore_index)
        image = jnp.asarray(image, jnp.float32)
        label = jnp.asarray(label)
        scores = inference(
            logits_fn,
            image,
            out_size=tuple(label.shape[1:3]),
            mode=mode,
            crop=crop,
            stride=stride,
            scale=scale,
            aligned=aligned,
            size_divisor=size_divisor,
            ratios=ratios,
            flip=flip,
            num_classes=num_classes,
            window_batch=window_batch,
            pad_windows=pad_windows,
        )
        acc.update_from_scores(label, scores)
        if len(panels) < num_panels:
            preds = np.asarray(jnp.argmax(scores, -1))
            for k in range(min(image.shape[0], num_panels - len(panels))):
                path = os.path.join(panel_dir, f"panel_{len(panels):04d}.png")
                save_panel(
                    path,
                    denormalize(np.asarray(image[k]), mean, std),
                    np.asarray(label[k]),
                    preds[k],
                    palette=palette,
                    num_classes=num_classes,
                    ignore_index=ignore_index,
                )
                panels.append(path)
        num_images += image.shape[0]
    metrics = metrics_from_confusion(acc.result())
    metrics["num_images"] = num_images
    metrics["panels"] = panels
    return metrics


# ---------------------------------------------------------------------------------------------
# Reports, panels and the paper's analyses
# ---------------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(
    path: str,
    metrics: dict[str, Any],
    class_names: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the metrics as JSON (NaN as null) and returns the written dict.

    Layout: ``summary`` (aAcc, mIoU, mAcc, mF1, num_images), ``per_class`` (name, IoU, Acc,
    Precision, F1, label and prediction pixels), ``confusion_matrix`` and ``extra`` (e.g.
    config, checkpoint step, ``prototype_analysis``, ``f1_by_frequency_groups``).
    """
    n = len(metrics["IoU"])
    names = _class_names(class_names, n)
    report = {
        "summary": {
            k: metrics[k] for k in ("aAcc", "mIoU", "mAcc", "mF1", "num_images") if k in metrics
        },
        "per_class": [
            {
                "class": names[i],
                "IoU": metrics["IoU"][i],
                "Acc": metrics["Acc"][i],
                "Precision": metrics["Precision"][i],
                "F1": metrics["F1"][i],
                "label_pixels": metrics["label_area"][i],
                "pred_pixels": metrics["pred_area"][i],
            }
            for i in range(n)
        ],
        "confusion_matrix": metrics.get("confusion_matrix"),
        "extra": extra or {},
    }
    report = _jsonable(report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
    return report


def default_palette(num_classes: int) -> np.ndarray:
    """(N, 3) uint8 PASCAL-VOC-style bit-interleaved colours for classes 0..N-1 (VOC index
    i + 1, so no class is black; black marks ignored pixels)."""
    pal = np.zeros((num_classes, 3), np.uint8)
    for i in range(num_classes):
        c, r, g, b = i + 1, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def colorize(label: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class map -> (H, W, 3) uint8; ignored and out-of-range pixels are black."""
    label = np.asarray(label)
    valid = (label != ignore_index) & (label >= 0) & (label < len(palette))
    out = np.zeros((*label.shape, 3), np.uint8)
    out[valid] = palette[label[valid]]
    return out


def denormalize(
    image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> np.ndarray:
    """(H, W, 3) normalized float -> uint8 RGB."""
    x = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def save_panel(
    path: str,
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    *,
    palette: np.ndarray | None = None,
    num_classes: int | None = None,
    ignore_index: int = 255,
    gap: int = 4,
) -> None:
    """Writes an (H0, 3 * W0 + 2 * gap) PNG: image | ground truth | prediction.

    Args:
      image: (H, W, 3) uint8 RGB at any size; resized (bilinear) to the label size.
      label, pred: (H0, W0) int class maps.
      palette: (N, 3) uint8; ``default_palette(num_classes)`` when None.
    """
    if palette is None:
        if num_classes is None:
            raise ValueError("save_panel needs a palette or num_classes to build one.")
        palette = default_palette(num_classes)
    h, w = label.shape
    img = Image.fromarray(np.asarray(image, np.uint8))
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    canvas = np.full((h, 3 * w + 2 * gap, 3), 255, np.uint8)
    canvas[:, :w] = np.asarray(img)
    canvas[:, w + gap : 2 * w + gap] = colorize(label, palette, ignore_index)
    canvas[:, 2 * w + 2 * gap :] = colorize(pred, palette, ignore_index)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(canvas).save(path)


def cosine_similarity_matrix(prototypes: np.ndarray) -> np.ndarray:
    """(N, C) -> (N, N) float64 cosine similarities of the rows."""
    w = np.asarray(prototypes, np.float64)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a prototype row has zero norm; cosine similarity is undefined.")
    u = w / norms
    return u @ u.T


def prototype_analysis(prototypes: jax.Array | np.ndarray) -> dict[str, float]:
    """Class separability (Eq. 8, ``cbp_jax.prototypes.class_separability``; 0 for CBP) and
    the largest off-diagonal |cos| and the row-norm range of an (N, C) classifier."""
    from cbp_jax.prototypes import class_separability

    cos = cosine_similarity_matrix(prototypes)
    off = cos[~np.eye(len(cos), dtype=bool)]
    norms = np.linalg.norm(np.asarray(prototypes, np.float64), axis=1)
    return {
        "class_separability": float(class_separability(jnp.asarray(prototypes, jnp.float32))),
        "max_abs_cos": float(np.abs(off).max()) if off.size else 0.0,
        "norm_min": float(norms.min()),
        "norm_max": float(norms.max()),
    }


def _diverging(v: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8 RGB: blue (-1), white (0), red (+1)."""
    v = np.clip(np.asarray(v, np.float64), -1.0, 1.0)[..., None]
    white = np.array([255.0, 255.0, 255.0])
    red = np.array([178.0, 24.0, 43.0])
    blue = np.array([33.0, 102.0, 172.0])
    rgb = np.where(v >= 0, white + v * (red - white), white + (-v) * (blue - white))
    return np.rint(rgb).astype(np.uint8)


def save_similarity_heatmap(
    path: str,
    prototypes: jax.Array | np.ndarray,
    *,
    indices: Sequence[int] | None = None,
    cell: int = 8,
) -> np.ndarray:
    """Fig. 6: the prototype cosine-similarity matrix as a PNG heatmap.

    Cell (i, j) of ``cell x cell`` pixels is coloured blue (-1) / white (0) / red (+1). The
    paper shows a random subset of ADE20K's 150 classes: pass ``indices``.

    Args:
      path: the PNG to write.
      prototypes: (N, C) classifier rows.
      indices: the classes to show, in order; all when None.
      cell: pixels per matrix cell.

    Returns:
      The (n, n) cosine matrix that was drawn; the image is (n * cell, n * cell).
    """
    cos = cosine_similarity_matrix(prototypes)
    if indices is not None:
        idx = np.asarray(indices, np.int64)
        cos = cos[np.ix_(idx, idx)]
    img = np.repeat(np.repeat(_diverging(cos), cell, 0), cell, 1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(img).save(path)
    return cos


def class_pixel_counts(
    labels: Iterable[np.ndarray], num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(N,) int64 labelled-pixel count per class over an iterable of label maps (for the
    training-set frequencies of Fig. 5)."""
    counts = np.zeros(num_classes, np.int64)
    for lab in labels:
        lab = np.asarray(lab).reshape(-1)
        lab = lab[(lab != ignore_index) & (lab >= 0) & (lab < num_classes)]
        counts += np.bincount(lab, minlength=num_classes)[:num_classes]
    return counts


def f1_by_frequency_groups(
    f1: np.ndarray,
    pixel_counts: np.ndarray,
    *,
    num_groups: int = 3,
    group_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Fig. 5: per-class F1 averaged within groups of classes sorted by training frequency.

    Classes are sorted by ascending training pixel count (rarest first; ties keep class order)
    and split into ``num_groups`` groups of equal size (``np.array_split``: the first groups
    take one more class when N does not divide). The paper uses 15 groups of 10 on ADE20K.

    Args:
      f1: (N,) per-class F1 (NaN for classes with no pixels are left out of the means).
      pixel_counts: (N,) training pixel count per class.
      num_groups: how many groups.
      group_names: one name per group; default ``("rare", "common", "frequent")`` for 3
        groups, else ``"group_i"``.
      class_names: optional names listed in each group.

    Returns:
      One dict per group, rarest first: ``name``, ``classes`` (indices), ``class_names``,
      ``min_pixels``, ``max_pixels``, ``mean_f1`` (NaN-ignoring).
    """
    f1 = np.asarray(f1, np.float64)
    counts = np.asarray(pixel_counts, np.int64)
    if f1.shape != counts.shape or f1.ndim != 1:
        raise ValueError(f"f1 {f1.shape} and pixel_counts {counts.shape} must both be (N,).")
    if not 1 <= num_groups <= len(f1):
        raise ValueError(f"num_groups must be in [1, {len(f1)}], got {num_groups}.")
    if group_names is None:
        if num_groups == 3:
            group_names = ("rare", "common", "frequent")
        else:
            group_names = [f"group_{i}" for i in range(num_groups)]
    if len(group_names) != num_groups:
        raise ValueError(f"got {len(group_names)} group names for {num_groups} groups.")
    names = _class_names(class_names, len(f1))
    order = np.argsort(counts, kind="stable")
    groups = []
    for name, idx in zip(group_names, np.array_split(order, num_groups), strict=True):
        groups.append(
            {
                "name": name,
                "classes": idx.tolist(),
                "class_names": [names[i] for i in idx],
                "min_pixels": int(counts[idx].min()),
                "max_pixels": int(counts[idx].max()),
                "mean_f1": _nanmean(f1[idx]),
            }
        )
    return groups
