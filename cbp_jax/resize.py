"""Exact PyTorch resizing and pooling of channels-last maps, as pure functions.

``resize_bilinear`` is ``F.interpolate(mode="bilinear", align_corners=False)`` (no
antialiasing) and ``adaptive_avg_pool`` is ``nn.AdaptiveAvgPool2d``: each written as small
interpolation taps or matrices applied along the spatial axes, exact and static-shaped on
every backend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear resize along one axis (align_corners=False, no antialiasing): for
    each output index the two source indices ``lo``, ``hi`` and the weight ``frac`` of
    ``hi`` (float64)."""
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, src - lo


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of ``bilinear_taps``: the resize as a matrix."""
    lo, hi, frac = bilinear_taps(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m.astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _resize_axis(x: jax.Array, n_out: int, axis: int) -> jax.Array:
    """Bilinear resize along ``axis`` as two gathers and a lerp, work linear in the output;
    its backward pass is one product with the resize matrix's transpose (autodiff of the
    gathers would scatter-add, which XLA:CPU runs slower)."""
    lo, hi, frac = bilinear_taps(x.shape[axis], n_out)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w = jnp.asarray(frac.reshape(shape), x.dtype)
    return jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w


def _resize_axis_fwd(x, n_out, axis):
    return _resize_axis(x, n_out, axis), x.shape[axis]


def _resize_axis_bwd(n_out, axis, n_in, g):
    m = jnp.asarray(bilinear_matrix(n_in, n_out), g.dtype)  # (n_out, n_in)
    return (jnp.moveaxis(jnp.tensordot(m, g, axes=(0, axis)), 0, axis),)


_resize_axis.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def resize_bilinear(
    x: jax.Array, size: tuple[int, int], *, axes: tuple[int, int] = (1, 2)
) -> jax.Array:
    """Bilinear resize of the two spatial ``axes`` to ``size``, as PyTorch with
    ``align_corners=False``: (B, H, W, C) -> (B, h, w, C) by default, or e.g. channels-first
    (B, C, H, W) with ``axes=(2, 3)``.

    No antialiasing (``jax.image.resize`` antialiases when downsampling; PyTorch does not).
    Each non-minor axis is resized by gathering its two source rows (``_resize_axis``), in
    work linear in the output: the dense (n_out, n_in) matrix products this replaced cost
    seconds per ADE20K-sized image at 150 classes in evaluation. The minor axis (W of
    channels-first logits) stays a product with the resize matrix: XLA:CPU's gather along
    it made the 150-class 512x512 train step 1.6x slower (docs/benchmarks.md).
    """
    for axis, n_out in zip((a % x.ndim for a in axes), size, strict=True):
        n_out, n_in = int(n_out), x.shape[axis]
        if n_out == n_in:
            continue
        if axis < x.ndim - 1:
            x = _resize_axis(x, n_out, axis)
        else:  # the minor axis: XLA:CPU gathers along it element by element; a matmul
            x = x @ jnp.asarray(bilinear_matrix(n_in, n_out).T, x.dtype)
    return x


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging weights with PyTorch's bins floor(i*n/s) .. ceil((i+1)*n/s)."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m.astype(np.float32)


def adaptive_avg_pool(x: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """``nn.AdaptiveAvgPool2d(size)`` on (B, H, W, C) -> (B, s, s, C); bins may overlap."""
    sh, sw = (size, size) if isinstance(size, int) else size
    mh = jnp.asarray(_adaptive_pool_matrix(x.shape[1], sh), x.dtype)
    mw = jnp.asarray(_adaptive_pool_matrix(x.shape[2], sw), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", mh, x)
    return jnp.einsum("pw,bowc->bopc", mw, x)
