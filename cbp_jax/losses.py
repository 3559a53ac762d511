"""Segmentation losses: pixel cross-entropy and the Online Centroid Contrastive Loss (OCCL).

Pure functions over channels-last arrays; they run under ``jax.jit`` and on batches sharded
over devices (the centroid sums are ``segment_sum`` reductions, made global by XLA). Inside
``shard_map`` / ``pmap``, where each device sees its own slice of the batch, pass the mapped
axis as ``axis_name``: the sums and counts are then ``psum``-med, so every device computes the
loss of the whole batch.
Exact reading: ``docs/method.md`` section 2 (Eqs. 3-6 of the paper).
"""

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cbp_jax import metrics, resize

VIEWS = ("batch_halves", "random_pixels", "objects")


def _require_integer_labels(labels: jax.Array, name: str = "labels") -> None:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must have an integer dtype; got {labels.dtype}.")


CE_AVERAGES = ("labelled", "all")


def _global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
    """``x`` summed over the devices of ``axis_name`` (unchanged without one)."""
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def pixel_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    ignore_index: int = 255,
    *,
    average: str = "labelled",
    axis: int = -1,
    axis_name: str | None = None,
) -> jax.Array:
    """Softmax cross-entropy summed over labelled pixels, divided per ``average``.

    ``average="labelled"``: the mean over labelled pixels (0, not NaN, when none is).
    ``average="all"``: the sum divided by ALL pixels, ignored ones included, as mmseg's
    ``CrossEntropyLoss`` does by default (``avg_non_ignore=False``, the setting of the SegFormer
    and UperNet recipes the paper trained with); the loss then shrinks with the share of
    ignored pixels, which sets its balance against OCCL and the auxiliary head.

    Args:
      logits: class scores with the N classes on ``axis``: ``(..., N)`` by default, or e.g.
        ``(B, N, H, W)`` with ``axis=1`` (faster on CPU for small N: the pixels, not the
        classes, are then the contiguous axis; docs/benchmarks.md).
      labels: integer class ids, ``logits``' shape without ``axis``; ``ignore_index`` marks
        unlabelled pixels.
      average: ``"labelled"`` or ``"all"``.
      axis_name: the ``shard_map`` / ``pmap`` axis the batch is split over: sum and
        denominator are then those of the whole batch.
    """
    axis = axis % logits.ndim
    if logits.shape[:axis] + logits.shape[axis + 1 :] != labels.shape:
        raise ValueError(
            f"logits {logits.shape} (classes on axis {axis}) and labels {labels.shape} must "
            "agree on every other axis; resize the logits to the label size first."
        )
    nll_sum = _global_sum(labelled_nll_sum(logits, labels, ignore_index, axis), axis_name)
    return nll_sum / ce_denominator(labels, ignore_index, average, axis_name)


def labelled_nll_sum(
    logits: jax.Array, labels: jax.Array, ignore_index: int = 255, axis: int = -1
) -> jax.Array:
    """The float32 sum of :func:`pixel_nll` over the pixels not marked ``ignore_index``."""
    _require_integer_labels(labels)
    nll = pixel_nll(logits.astype(jnp.float32), labels, axis % logits.ndim)
    return jnp.sum(jnp.where(labels != ignore_index, nll, 0.0))


def ce_denominator(
    labels: jax.Array, ignore_index: int, average: str, axis_name: str | None = None
) -> jax.Array:
    """What :func:`pixel_cross_entropy` divides the summed NLL by for ``average``: the
    labelled pixels (at least 1) or all of them (over the devices of ``axis_name``)."""
    if average not in CE_AVERAGES:
        raise ValueError(f"average={average!r} is not one of {CE_AVERAGES}.")
    if average == "all":
        return _global_sum(jnp.asarray(labels.size, jnp.float32), axis_name)
    labelled = _global_sum(jnp.sum(labels != ignore_index, dtype=jnp.float32), axis_name)
    return jnp.maximum(labelled, 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pixel_nll(logits: jax.Array, labels: jax.Array, axis: int) -> jax.Array:
    """-log softmax(logits)[label] per pixel, the classes on ``axis`` (non-negative):
    ``logits`` without that axis. Labels outside [0, N) pick no logit (their gradient,
    if any, is the softmax alone); mask them out of the sum.

    The backward pass is one element-wise map, ``g * (softmax - onehot)``. The class sums
    of the forward pass follow the layout: where the classes are not the minor axis of a
    CPU array (the channels-first logits of ``upsampled_cross_entropy``) they are folded
    in slice by slice, since XLA:CPU hands a reduction over a non-minor axis to YNNPACK,
    several times slower than the slices (docs/benchmarks.md); elsewhere they are plain
    reductions.
    """
    return _pixel_nll_fwd(logits, labels, axis)[0]


def _pixel_nll_fwd(logits, labels, axis):
    labels = labels.astype(jnp.int32)
    if axis == logits.ndim - 1:
        lse, picked = _lse_and_pick(logits, labels, axis)
    else:  # chosen for the platform the program is compiled for
        lse, picked = jax.lax.platform_dependent(
            logits,
            labels,
            cpu=functools.partial(_lse_and_pick_by_slices, axis=axis),
            default=functools.partial(_lse_and_pick, axis=axis),
        )
    return lse - picked, (logits, labels, lse)


def _lse_and_pick(logits, labels, axis):
    """(logsumexp over ``axis``, the logit at ``labels``) as plain reductions."""
    with jax.named_scope("class_sums"):
        top = jnp.max(logits, axis=axis, keepdims=True)
        lse = jnp.squeeze(top, axis) + jnp.log(jnp.sum(jnp.exp(logits - top), axis=axis))
        picked = jnp.sum(jnp.where(_onehot(labels, logits.shape, axis), logits, 0.0), axis=axis)
    return lse, picked


def _onehot(labels, shape, axis):
    classes = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    return classes == jnp.expand_dims(labels, axis)


def _pixel_nll_bwd(axis, residuals, g):
    logits, labels, lse = residuals
    onehot = _onehot(labels, logits.shape, axis).astype(logits.dtype)
    softmax = jnp.exp(logits - jnp.expand_dims(lse, axis))
    return jnp.expand_dims(g, axis) * (softmax - onehot), None


pixel_nll.defvjp(_pixel_nll_fwd, _pixel_nll_bwd)


@jax.named_scope("class_sums_by_slices")
def _lse_and_pick_by_slices(logits, labels, axis):
    """(logsumexp over ``axis``, the logit at ``labels``), reading one class slice at a time."""
    n = logits.shape[axis]

    def slice_at(c):
        return jax.lax.dynamic_index_in_dim(logits, c, axis, keepdims=False)

    top = jax.lax.fori_loop(1, n, lambda c, m: jnp.maximum(m, slice_at(c)), slice_at(0))

    def add_class(c, carry):
        total, picked = carry
        z = slice_at(c)
        return total + jnp.exp(z - top), jnp.where(labels == c, z, picked)

    zeros = jnp.zeros_like(top)
    total, picked = jax.lax.fori_loop(0, n, add_class, (zeros, zeros))
    return top + jnp.log(total), picked


def ce_band_bytes(platform: str | None = None) -> int:
    """The most float32 upsampled logits :func:`upsampled_cross_entropy` makes at once on
    ``platform`` (default: JAX's default backend; the train step itself picks per platform
    it is compiled for).

    On CPU, bands of a few MB stay in cache and beat the whole upsampled map
    (``python bench/models.py --ce-bands``, docs/benchmarks.md). Elsewhere each band is a few
    kernel launches, so bands only bound the memory (not measured on an accelerator).
    """
    return 4 * 2**20 if (platform or jax.default_backend()) == "cpu" else 256 * 2**20


def upsampled_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    ignore_index: int = 255,
    average: str = "all",
    band_bytes: int | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Pixel CE of ``logits`` (B, h, w, N) bilinearly upsampled to ``labels`` (B, H, W),
    averaged as :func:`pixel_cross_entropy` says for ``average``.

    mmseg's order (resize the logits, then the loss), computed channels-first so that the
    resize and the softmax run along contiguous pixel rows instead of N-wide class vectors.
    Where the float32 upsampled logits would exceed ``band_bytes`` (default
    :func:`ce_band_bytes` of the platform compiled for) they are made a band of rows at a
    time (:func:`_banded_nll_sum`), so that neither pass holds them, or their gradient,
    whole (for SegFormer-B5's batch of 2 at 512x512 with 150 classes, 300 MB each).
    """
    logits = jnp.moveaxis(logits, -1, 1)  # (B, N, h, w)
    if band_bytes is not None:
        nll_sum = _upsampled_nll_sum(logits, labels, ignore_index, band_bytes)
    else:
        by_platform = {
            p: functools.partial(
                _upsampled_nll_sum, ignore_index=ignore_index, band_bytes=ce_band_bytes(p)
            )
            for p in ("cpu", "default")
        }
        if _band_rows(logits, labels, ce_band_bytes("cpu")) == _band_rows(
            logits, labels, ce_band_bytes("default")
        ):
            nll_sum = by_platform["cpu"](logits, labels)
        else:
            nll_sum = jax.lax.platform_dependent(
                logits, labels, cpu=by_platform["cpu"], default=by_platform["default"]
            )
    nll_sum = _global_sum(nll_sum, axis_name)
    return nll_sum / ce_denominator(labels, ignore_index, average, axis_name)


def _band_rows(logits, labels, band_bytes: int) -> int:
    """Output rows per band of channels-first ``logits`` (B, N, h, w) upsampled to
    ``labels`` (B, H, W): at least 1, at most H (one band)."""
    b, n = logits.shape[:2]
    height, width = labels.shape[1:3]
    return min(height, max(1, band_bytes // (b * n * width * 4)))


def _upsampled_nll_sum(logits, labels, ignore_index, band_bytes):
    """The NLL summed over the labelled pixels of ``logits`` (B, N, h, w) upsampled to
    ``labels`` (B, H, W), in bands of at most ``band_bytes`` of float32."""
    b, _, h, _ = logits.shape
    height, width = labels.shape[1:3]
    rows = _band_rows(logits, labels, band_bytes)
    if rows == height:
        logits = resize.resize_bilinear(logits, (height, width), axes=(2, 3))
        return labelled_nll_sum(logits, labels, ignore_index, axis=1)
    bands = -(-height // rows)
    pad = bands * rows - height  # rows past the image: labelled ignore_index, so not scored
    lo, hi, frac = (
        np.pad(t, (0, pad)).reshape(bands, rows) for t in resize.bilinear_taps(h, height)
    )
    band_labels = jnp.pad(labels, ((0, 0), (0, pad), (0, 0)), constant_values=ignore_index)
    band_labels = jnp.moveaxis(band_labels.reshape(b, bands, rows, width), 1, 0)
    band_taps = (jnp.asarray(lo), jnp.asarray(hi), jnp.asarray(frac, jnp.float32))
    return _banded_nll_sum(logits, band_taps, band_labels, ignore_index)


def _band_nll_sum(logits, taps, labels, ignore_index):
    """NLL summed over one band: ``logits`` (B, N, h, w) upsampled at the band's R output
    rows, whose source rows and weights are ``taps`` = (lo, hi, frac), each (R,), and
    scored on ``labels`` (B, R, W)."""
    lo, hi, frac = taps
    frac = frac[:, None].astype(logits.dtype)
    band = jnp.take(logits, lo, axis=2) * (1 - frac) + jnp.take(logits, hi, axis=2) * frac
    band = resize.resize_bilinear(band, labels.shape[1:], axes=(2, 3))  # W only: the rows are made
    return labelled_nll_sum(band, labels, ignore_index, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _banded_nll_sum(logits, band_taps, band_labels, ignore_index):
    """The NLL summed band by band (a scan over the leading axis of ``band_taps`` and
    ``band_labels``). Each band's gradient is taken in the same loop step, while its
    upsampled logits exist, and summed into a (B, N, h, w) gradient that is the only
    residual: no band is made twice, none outlives its step. (A call without a gradient
    does that work too; only the train step's loss calls it.)"""
    return _banded_nll_sum_fwd(logits, band_taps, band_labels, ignore_index)[0]


def _banded_nll_sum_fwd(logits, band_taps, band_labels, ignore_index):
    def step(grad, band):
        taps, labels = band
        nll_sum, vjp = jax.vjp(lambda z: _band_nll_sum(z, taps, labels, ignore_index), logits)
        (band_grad,) = vjp(jnp.ones_like(nll_sum))
        return grad + band_grad.astype(jnp.float32), nll_sum

    grad0 = jnp.zeros_like(logits, jnp.float32)  # sharded as the logits, also explicitly
    grad, sums = jax.lax.scan(step, grad0, (band_taps, band_labels))
    return jnp.sum(sums), grad.astype(logits.dtype)


def _banded_nll_sum_bwd(ignore_index, grad, g):
    return (g * grad).astype(grad.dtype), None, None


_banded_nll_sum.defvjp(_banded_nll_sum_fwd, _banded_nll_sum_bwd)


def view_assignment(
    labels: jax.Array,
    views: str = "batch_halves",
    key: jax.Array | None = None,
    axis_name: str | None = None,
    view_map: jax.Array | None = None,
) -> jax.Array:
    """Which of the two views each pixel belongs to: ``(B, H, W)`` int32 in {0, 1}.

    ``"batch_halves"``: images ``0 .. B/2-1`` form view 0, the rest view 1 (B even); with
    ``axis_name`` the halves are those of the whole batch, device ``d`` holding images
    ``d*B .. (d+1)*B-1``. ``"random_pixels"``: each pixel falls in either view with
    probability 1/2 (needs ``key``; folded with the device index under ``axis_name``).
    ``"objects"``: the paper's split, half the objects of each class per view, made on the
    host (``cbp_jax.data.views``) and given as ``view_map`` ``(B, H, W)`` in {0, 1}.
    """
    if views == "objects":
        if view_map is None or view_map.shape != labels.shape:
            raise ValueError(
                f"views='objects' needs the batch's view map (B, H, W) like the labels "
                f"{labels.shape}; got {None if view_map is None else view_map.shape}. The "
                "loader makes it with cbp_jax.data.views.WithObjectViews (batch['views'])."
            )
        return view_map.astype(jnp.int32)
    b = labels.shape[0]
    devices = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    device = 0 if axis_name is None else jax.lax.axis_index(axis_name)
    if views == "batch_halves":
        if (b * devices) % 2:
            raise ValueError(
                f"views='batch_halves' needs an even batch; got labels {labels.shape} "
                f"(B={b * devices} over {devices} device(s)). Use an even (global) batch size "
                "or views='random_pixels'."
            )
        image = device * b + jnp.arange(b)  # index in the whole batch
        view_of_image = (image >= b * devices // 2).astype(jnp.int32)
        return jnp.broadcast_to(view_of_image[:, None, None], labels.shape)
    if views == "random_pixels":
        if key is None:
            raise ValueError(
                "views='random_pixels' needs a PRNG key: pass key=jax.random.key(...)."
            )
        if axis_name is not None:
            key = jax.random.fold_in(key, device)
        return jax.random.bernoulli(key, 0.5, labels.shape).astype(jnp.int32)
    raise ValueError(f"views={views!r} is not one of {VIEWS}.")


def _replicated_segment_sum(data: jax.Array, segment_ids: jax.Array, num_segments: int):
    """``segment_sum`` whose (small) result is replicated, also under explicit-sharding meshes.

    With auto (or no) mesh axes XLA inserts the cross-device reduction itself; explicit axes
    need the output sharding spelled out, which ``auto_axes`` does.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.explicit_axes:
        return jax.ops.segment_sum(data, segment_ids, num_segments=num_segments)
    return jax.sharding.auto_axes(
        lambda d, s: jax.ops.segment_sum(d, s, num_segments=num_segments),
        out_sharding=jax.sharding.PartitionSpec(),
    )(data, segment_ids)


def view_centroids(
    features: jax.Array,
    labels: jax.Array,
    view_ids: jax.Array,
    num_classes: int,
    ignore_index: int = 255,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Eq. 3: per-view, per-class mean feature, with ``segment_sum`` over flattened pixels.

    Args:
      features: ``(B, H, W, C)``.
      labels: ``(B, H, W)`` int; ``ignore_index`` and ids outside [0, N) are left out.
      view_ids: ``(B, H, W)`` int in {0, 1}.
      num_classes: N.
      axis_name: the ``shard_map`` / ``pmap`` axis the batch is split over: sums and counts
        are then those of the whole batch.

    Returns:
      ``(centroids, counts)``: ``(2, N, C)`` float32 means (0 where a class is absent) and
      ``(2, N)`` float32 pixel counts.
    """
    c = features.shape[-1]
    labels = labels.reshape(-1)
    valid = metrics.valid_label_mask(labels, num_classes, ignore_index)
    trash = 2 * num_classes  # one extra segment collects the unlabelled pixels
    segment = jnp.where(valid, view_ids.reshape(-1) * num_classes + labels, trash)
    flat = features.reshape(-1, c).astype(jnp.float32)
    sums = _replicated_segment_sum(flat, segment, trash + 1)[:trash]
    counts = _replicated_segment_sum(jnp.ones_like(segment, jnp.float32), segment, trash + 1)
    sums, counts = _global_sum((sums, counts[:trash]), axis_name)
    centroids = sums / jnp.maximum(counts, 1.0)[:, None]
    return centroids.reshape(2, num_classes, c), counts.reshape(2, num_classes)


def category_centroids(
    features: jax.Array,
    labels: jax.Array,
    num_classes: int,
    ignore_index: int = 255,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-class mean feature over the whole batch: ``((N, C) float32, (N,) bool present)``."""
    view_ids = jnp.zeros_like(labels, jnp.int32)
    centroids, counts = view_centroids(
        features, labels, view_ids, num_classes, ignore_index, axis_name
    )
    return centroids[0], counts[0] > 0


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / ||x||`` over the last axis; zero vectors stay zero (no NaN, finite gradients)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


class OCCLTerms(NamedTuple):
    """The two OCCL components, each averaged over the two views.

    ``centroid`` = (L_v(1) + L_v(2)) / 2 (Eq. 4); ``category`` = (L_c(1) + L_c(2)) / 2 (Eq. 5).
    Eq. 6 is ``centroid_weight * centroid + category_weight * category``.
    """

    centroid: jax.Array
    category: jax.Array


def _check_occl_inputs(features, labels, prototypes, tau):
    if features.ndim != 4:
        raise ValueError(f"features must be (B, H, W, C); got shape {features.shape}.")
    if labels.shape != features.shape[:3]:
        raise ValueError(
            f"labels {labels.shape} must match features {features.shape} in (B, H, W); "
            "nearest-downsample the labels to the feature resolution first."
        )
    _require_integer_labels(labels)
    if prototypes.ndim != 2 or prototypes.shape[1] != features.shape[-1]:
        raise ValueError(
            f"prototypes {prototypes.shape} must be (N, C) with C = feature width "
            f"{features.shape[-1]}; build them with dim={features.shape[-1]}."
        )
    if not tau > 0:
        raise ValueError(f"tau must be positive; got {tau}.")


def occl_terms(
    features: jax.Array,
    labels: jax.Array,
    prototypes: jax.Array,
    *,
    tau: float = 0.07,
    views: str = "batch_halves",
    ignore_index: int = 255,
    key: jax.Array | None = None,
    axis_name: str | None = None,
    view_map: jax.Array | None = None,
) -> OCCLTerms:
    """The centroid (Eq. 4) and category (Eq. 5) terms of OCCL; see :func:`occl`."""
    _check_occl_inputs(features, labels, prototypes, tau)
    num_classes = prototypes.shape[0]
    view_ids = view_assignment(labels, views, key, axis_name, view_map)
    centroids, counts = view_centroids(
        features, labels, view_ids, num_classes, ignore_index, axis_name
    )
    present = counts > 0  # (2, N)
    valid = present[0] & present[1]  # (N,)

    queries = l2_normalize(centroids)  # (2, N, C) view centroids
    keys = jax.lax.stop_gradient(l2_normalize(centroids.mean(axis=0)))  # (N, C) category
    protos = jax.lax.stop_gradient(l2_normalize(prototypes.astype(jnp.float32)))

    # Centroid loss: positive <v_i1, v_i2>, negatives <v_ix, sg(s_j)> over valid j != i.
    positive = jnp.sum(queries[0] * queries[1], axis=-1) / tau  # (N,)
    negatives = jnp.einsum("xic,jc->xij", queries, keys) / tau  # (2, N, N)
    negative_mask = valid[None, :] & ~jnp.eye(num_classes, dtype=bool)  # (N, N), over j
    logits = jnp.concatenate(
        [
            jnp.broadcast_to(positive, (2, num_classes))[..., None],
            jnp.where(negative_mask[None], negatives, -jnp.inf),
        ],
        axis=-1,
    )  # (2, N, 1 + N)
    centroid_nll = jax.nn.logsumexp(logits, axis=-1) - positive[None]  # (2, N)
    centroid = 0.5 * (_masked_mean(centroid_nll[0], valid) + _masked_mean(centroid_nll[1], valid))

    # Category loss: softmax over all N prototypes, target the own class.
    proto_logits = jnp.einsum("xic,jc->xij", queries, protos) / tau  # (2, N, N)
    category_nll = jax.nn.logsumexp(proto_logits, axis=-1) - jnp.diagonal(
        proto_logits, axis1=1, axis2=2
    )  # (2, N)
    category = 0.5 * (
        _masked_mean(category_nll[0], present[0]) + _masked_mean(category_nll[1], present[1])
    )
    return OCCLTerms(centroid=centroid, category=category)


def occl(
    features: jax.Array,
    labels: jax.Array,
    prototypes: jax.Array,
    *,
    tau: float = 0.07,
    centroid_weight: float = 1.0,
    category_weight: float = 0.1,
    views: str = "batch_halves",
    ignore_index: int = 255,
    key: jax.Array | None = None,
    axis_name: str | None = None,
    view_map: jax.Array | None = None,
) -> jax.Array:
    """Online Centroid Contrastive Loss, Eq. 6 (a scalar; 0 when no class qualifies).

    View centroids (queries), category centroids (stop-gradient keys) and prototypes are
    L2-normalized before every dot product. The prototypes are fixed targets: no gradient
    reaches them through this loss.

    Args:
      features: ``(B, H, W, C)`` decode-head features (what the classifier sees).
      labels: ``(B, H, W)`` int labels at the feature resolution.
      prototypes: ``(N, C)`` class prototypes.
      tau: temperature.
      centroid_weight: lambda, the weight of the centroid term (Eq. 4).
      category_weight: phi, the weight of the category term (Eq. 5).
      views: ``"batch_halves"``, ``"random_pixels"`` (needs ``key``) or ``"objects"`` (needs
        ``view_map``); see :func:`view_assignment`.
      ignore_index: label of unlabelled pixels.
      key: PRNG key for ``views="random_pixels"``.
      axis_name: the ``shard_map`` / ``pmap`` axis the batch is split over: the centroids
        are then those of the whole batch, and every device gets the same loss.
      view_map: ``(B, H, W)`` views in {0, 1} at the labels' resolution, for
        ``views="objects"``.
    """
    terms = occl_terms(
        features,
        labels,
        prototypes,
        tau=tau,
        views=views,
        ignore_index=ignore_index,
        key=key,
        axis_name=axis_name,
        view_map=view_map,
    )
    return centroid_weight * terms.centroid + category_weight * terms.category


def nearest_downsample(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of ``(B, H, W)`` labels to ``size = (h, w)``.

    Matches PyTorch ``F.interpolate(mode="nearest")``: source index ``floor(i * H / h)``.
    """
    b, h_in, w_in = labels.shape
    h, w = size
    rows = np.floor(np.arange(h) * (h_in / h)).astype(np.int32)
    cols = np.floor(np.arange(w) * (w_in / w)).astype(np.int32)
    return labels[:, rows][:, :, cols]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the train step computes (static)."""

    num_classes: int
    occl: bool = True
    tau: float = 0.07
    centroid_weight: float = 1.0
    category_weight: float = 0.1
    views: str = "batch_halves"
    aux_weight: float = 0.4
    ce_average: str = "all"  # "all" pixels (mmseg's default) | "labelled" ones
    ignore_index: int = 255
    seed: int = 0  # for views="random_pixels"

    def __post_init__(self):
        if self.ce_average not in CE_AVERAGES:
            raise ValueError(
                f"config.loss.ce_average={self.ce_average!r}; use one of {CE_AVERAGES}."
            )

    @classmethod
    def from_config(cls, config: Any) -> "LossConfig":
        """From ``config.loss`` (every field but these three), ``config.data.num_classes``
        and ``config.seed``."""
        outside = ("num_classes", "ignore_index", "seed")
        fields = [f.name for f in dataclasses.fields(cls) if f.name not in outside]
        return cls(
            num_classes=config.data.num_classes,
            seed=config.seed,
            **{name: config.loss[name] for name in fields},
        )


def segmentation_loss(
    out: dict[str, jax.Array],
    labels: jax.Array,
    prototypes: jax.Array,
    cfg: LossConfig,
    key: jax.Array | None = None,
    axis_name: str | None = None,
    view_map: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Eq. 7: pixel CE on upsampled logits + OCCL on the head features (+ auxiliary CE).

    Args:
      out: the segmentor's output (``logits``, ``features``, optional ``aux_logits``).
      labels: ``(B, H, W)`` int32 at the input resolution.
      prototypes: ``(N, C)`` the classifier's class weights (targets of OCCL's category term).
      key: PRNG key for ``views="random_pixels"``.
      axis_name: the ``shard_map`` / ``pmap`` axis the batch is split over, if any.
      view_map: ``(B, H, W)`` views at the input resolution, for ``views="objects"``
        (downsampled with the labels).
    """
    ce = upsampled_cross_entropy(
        out["logits"], labels, cfg.ignore_index, cfg.ce_average, axis_name=axis_name
    )
    metrics = {"ce": ce}
    total = ce
    if cfg.occl:
        features = out["features"]
        small = nearest_downsample(labels, features.shape[1:3])
        if view_map is not None:
            view_map = nearest_downsample(view_map, features.shape[1:3])
        terms = occl_terms(
            features,
            small,
            prototypes,
            tau=cfg.tau,
            views=cfg.views,
            ignore_index=cfg.ignore_index,
            key=key,
            axis_name=axis_name,
            view_map=view_map,
        )
        total += cfg.centroid_weight * terms.centroid + cfg.category_weight * terms.category
        metrics |= {"occl_centroid": terms.centroid, "occl_category": terms.category}
    if "aux_logits" in out:
        aux = upsampled_cross_entropy(
            out["aux_logits"], labels, cfg.ignore_index, cfg.ce_average, axis_name=axis_name
        )
        total += cfg.aux_weight * aux
        metrics["aux_ce"] = aux
    return total, metrics
