"""Test-time inference: mmseg's whole / slide modes, test-time resizing, multi-scale + flip.

Takes a ``logits_fn`` callable and imports no model code (only the shared resize op of
``cbp_jax.models.layers`` and the test sizes of ``cbp_jax.data.transforms``):

    logits_fn(images (B, h, w, 3) float32) -> logits (B, h', w', N)

at any output resolution (SegFormer and UperNet give 1/4). Jit it yourself; it is called with
one shape per distinct input size. Images may be global arrays sharded over a mesh (batch axis
first): every step here keeps that sharding.

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

Compilation: ``logits_fn`` compiles once per input shape it sees (one per crop size in slide
mode; whole mode sees every test size, which ``aligned=True`` buckets to multiples of 32), and
the small resize jits once per (input, output) shape pair.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from cbp_jax import resize
from cbp_jax.data.transforms import aligned_size, rescale_size

LogitsFn = Callable[[jax.Array], jax.Array]


def _scale_size(size_wh: tuple[int, int], factor: float) -> tuple[int, int]:
    w, h = size_wh
    return int(w * float(factor) + 0.5), int(h * float(factor) + 0.5)


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
resize_bilinear = jax.jit(resize.resize_bilinear, static_argnames=("size",))


# ---------------------------------------------------------------------------------------------
# Inference
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """How :func:`inference` runs: the keyword arguments it takes besides the images.

    Built from a run's ``config.eval`` by :meth:`from_config`, and checked when built, so a
    bad value stops a run before anything compiles. ``dataclasses.asdict(settings)`` gives
    :func:`inference`'s keywords.
    """

    mode: str = "whole"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scale: tuple[int, int] | None = None
    aligned: bool = False
    size_divisor: int = 32
    ratios: tuple[float, ...] = (1.0,)
    flip: bool = False
    window_batch: int = 1
    pad_windows: bool = False

    def __post_init__(self):
        if self.mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {self.mode!r}.")
        if self.mode == "slide" and (self.crop is None or self.stride is None):
            raise ValueError("mode='slide' needs crop and stride, e.g. crop=512, stride=341.")
        if not self.ratios:
            raise ValueError("ratios must hold at least one ratio, e.g. (1.0,).")
        bad = [r for r in self.ratios if not float(r) > 0]
        if bad:
            raise ValueError(f"ratios must be positive, got {tuple(self.ratios)}.")

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        """The settings of ``config.eval`` (mode, slide crop and stride, ratios, flip); the
        test resize itself is the data pipeline's (``config.data.test_scale``)."""
        e = config.eval
        slide = e.mode == "slide"
        return cls(
            mode=e.mode,
            crop=tuple(e.crop) if slide else None,
            stride=tuple(e.stride) if slide else None,
            ratios=tuple(float(r) for r in e.ratios),
            flip=bool(e.flip),
        )


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name} must be a positive int or (h, w) pair, got {v}.")
    return v


def _batch_sharding(images: jax.Array) -> NamedSharding | None:
    """The sharding of ``images``' batch axis, for other (B, ...) arrays; None off a mesh."""
    sharding = getattr(images, "sharding", None)
    if not isinstance(sharding, NamedSharding):
        return None
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(spec[0] if spec else None))


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
            images, np.asarray(starts, np.int32), size=win_size, pad_to=model_size
        )
        logits = logits_fn(crops)
        _check_logits(logits, crops.shape[0], num_classes)
        if preds is None:
            preds = jnp.zeros(
                (b, h, w, logits.shape[-1]), jnp.float32, device=_batch_sharding(images)
            )
        for j, start in enumerate(starts[: len(chunk)]):
            preds = _add_window(
                preds,
                logits[j * b : (j + 1) * b],
                np.asarray(start, np.int32),
                size=win_size,
                model_size=model_size,
            )
    count = slide_count_map(h, w, crop_hw, stride)
    return preds / count[None, :, :, None]


@functools.partial(jax.jit, static_argnames=("size", "flip", "softmax"))
def _to_output(logits, *, size, flip, softmax):
    out = resize_bilinear(logits, size)
    if flip:
        out = out[:, :, ::-1]
    if softmax:
        out = jax.nn.softmax(out, axis=-1)
    return out


def _views(logits_fn, images, settings: Settings, num_classes):
    """``(logits (B, h, w, N) at the network's input size, flipped)`` of every test view."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be (B, H, W, 3), got shape {tuple(images.shape)}.")
    for ratio in settings.ratios:
        x = images
        for size in eval_resize_sizes(
            tuple(images.shape[1:3]),
            scale=settings.scale,
            ratio=float(ratio),
            aligned=settings.aligned,
            size_divisor=settings.size_divisor,
        ):
            x = resize_bilinear(x, size)
        for f in (False, True) if settings.flip else (False,):
            xf = x[:, :, ::-1] if f else x
            if settings.mode == "whole":
                yield whole_inference(logits_fn, xf, num_classes=num_classes), f
            else:
                yield (
                    slide_inference(
                        logits_fn,
                        xf,
                        crop=settings.crop,
                        stride=settings.stride,
                        num_classes=num_classes,
                        window_batch=settings.window_batch,
                        pad_windows=settings.pad_windows,
                    ),
                    f,
                )


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
      the softmax probabilities of all views (mmseg's TTA). Argmax gives the prediction; at
      a large ``out_size`` :func:`classes` gives it without this array.
    """
    settings = Settings(
        mode=mode,
        crop=crop,
        stride=stride,
        scale=scale,
        aligned=aligned,
        size_divisor=size_divisor,
        ratios=tuple(ratios),
        flip=flip,
        window_batch=window_batch,
        pad_windows=pad_windows,
    )
    out_size = (int(out_size[0]), int(out_size[1]))
    views = list(_views(logits_fn, images, settings, num_classes))
    tta = len(views) > 1
    total = None
    for logits, f in views:
        out = _to_output(logits, size=out_size, flip=f, softmax=tta)
        total = out if total is None else total + out
    return total / len(views) if tta else total


@functools.partial(jax.jit, static_argnames=("width", "flip", "softmax"))
def _rows_to_output(logits, lo, hi, frac, *, width, flip, softmax):
    """Rows ``lo``/``hi``/``frac`` (R,) of :func:`_to_output`: the same ops on those rows."""
    w = frac.astype(logits.dtype)[None, :, None, None]
    rows = jnp.take(logits, lo, axis=1) * (1 - w) + jnp.take(logits, hi, axis=1) * w
    return _to_output(rows, size=(rows.shape[1], width), flip=flip, softmax=softmax)


def classes(
    logits_fn: LogitsFn,
    images: jax.Array,
    *,
    out_size: tuple[int, int],
    band_bytes: int = 256 << 20,
    **settings,
) -> np.ndarray:
    """``argmax(inference(...), -1)`` in bands of output rows: memory bounded by
    ``band_bytes`` per band instead of the (B, H0, W0, N) scores (14 GB for a 24-megapixel
    image at 150 classes).

    Each band takes its rows of the bilinear resize (the same taps and ops as the whole
    resize, so the classes equal :func:`inference`'s argmax) and, with TTA, sums the
    views' softmax for those rows only. Compiles once per band height, width and view shape.

    Args:
      logits_fn, images, out_size, settings: as :func:`inference` (``settings``: the
        fields of :class:`Settings` and ``num_classes``).
      band_bytes: the float32 scores of one band, at most (at least one row per band).

    Returns:
      int32 (B, H0, W0) class ids, in host memory.
    """
    num_classes = settings.pop("num_classes", None)
    views = list(_views(logits_fn, images, Settings(**settings), num_classes))
    h0, w0 = (int(v) for v in out_size)
    batch, n = images.shape[0], views[0][0].shape[-1]
    band = int(max(1, min(h0, band_bytes // (4 * batch * w0 * n))))
    out = np.empty((batch, h0, w0), np.int32)
    tta = len(views) > 1
    for start in range(0, h0, band):
        stop = min(start + band, h0)
        total = None
        for logits, f in views:
            lo, hi, frac = (
                np.resize(v[start:stop], band) for v in resize.bilinear_taps(logits.shape[1], h0)
            )  # the last band repeats its rows to keep one shape
            rows = _rows_to_output(
                logits, lo, hi, frac.astype(np.float32), width=w0, flip=f, softmax=tta
            )
            total = rows if total is None else total + rows
        if tta:
            total = total / len(views)
        out[:, start:stop] = np.asarray(jnp.argmax(total, -1))[:, : stop - start]
    return out
