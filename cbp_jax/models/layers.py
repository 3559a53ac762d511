"""Building blocks shared by the encoders and heads (channels last, (B, H, W, C)).

Pure functions first (resize, adaptive pooling, depthwise conv), NNX modules on top.
Resizing and pooling follow PyTorch exactly (``F.interpolate(mode="bilinear",
align_corners=False)`` and ``nn.AdaptiveAvgPool2d``), written as small interpolation
matrices contracted with the spatial axes: exact, static-shaped and fast on every backend.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Dtype = jnp.dtype | type | None

DWCONV_IMPLS = ("auto", "xla", "shifted")

trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02)
conv_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


# ----------------------------------------------------------------------------- pure functions


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


def resolve_dwconv_impl(impl: str) -> str:
    """Picks the depthwise-conv formulation: 'shifted' on CPU, XLA's grouped conv elsewhere.

    XLA:CPU's grouped convolution is several times slower than the shifted-slices sum
    (docs/benchmarks.md); on GPU/TPU the native depthwise kernels are the fast path.
    """
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"dwconv_impl={impl!r} is not one of {DWCONV_IMPLS}.")
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "xla"
    return impl


def _shifted_sum(xp: jax.Array, taps: jax.Array, h: int, w: int) -> jax.Array:
    """sum_ij xp[:, i:i+h, j:j+w, :] * taps[i, j]: a stride-1 depthwise correlation (k, k, C)."""
    k = taps.shape[0]
    acc_dtype = jnp.promote_types(xp.dtype, jnp.float32)
    y = jnp.zeros((xp.shape[0], h, w, xp.shape[-1]), acc_dtype)
    for i in range(k):
        for j in range(k):
            y = y + (xp[:, i : i + h, j : j + w, :] * taps[i, j]).astype(acc_dtype)
    return y.astype(xp.dtype)


def _pad_hw(x: jax.Array, p: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted_depthwise(x: jax.Array, taps: jax.Array, padding: int) -> jax.Array:
    """Stride-1 depthwise conv of (B, H, W, C) with taps (k, k, C) as a sum of shifted slices."""
    k = taps.shape[0]
    h, w = x.shape[1] + 2 * padding - k + 1, x.shape[2] + 2 * padding - k + 1
    return _shifted_sum(_pad_hw(x, padding), taps, h, w)


def _shifted_depthwise_fwd(x, taps, padding):
    return _shifted_depthwise(x, taps, padding), (x, taps)


def _shifted_depthwise_bwd(padding, residuals, g):
    """Input grad: the same shifted sum over the padded cotangent with flipped taps (one fused
    loop, where autodiff of the forward materializes k*k padded copies). Tap grads: one
    variadic reduction for all k*k taps over (B, H), keeping (W, C) contiguous, then a sum
    over W (XLA:CPU, (4, 64, 64, 128), k = 3: 19-28 ms against 51-54 ms reducing over
    (B, H, W) at once, which was itself 2x faster than k*k separate reductions)."""
    x, taps = residuals
    k = taps.shape[0]
    h, w = g.shape[1], g.shape[2]
    gx = _shifted_sum(_pad_hw(g, k - 1 - padding), taps[::-1, ::-1], x.shape[1], x.shape[2])
    xp = _pad_hw(x, padding)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    products = [
        (xp[:, i : i + h, j : j + w, :] * g).astype(acc_dtype) for i in range(k) for j in range(k)
    ]
    zeros = [jnp.zeros((), acc_dtype)] * len(products)
    sums = jax.lax.reduce(products, zeros, _add_pairs, (0, 1))  # k*k x (W, C)
    dtaps = jnp.stack(sums).sum(1).reshape(taps.shape).astype(taps.dtype)
    return gx, dtaps


def _add_pairs(a, b):
    return [u + v for u, v in zip(a, b, strict=True)]


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def depthwise_conv2d(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, *, padding: int, impl: str
) -> jax.Array:
    """Stride-1 depthwise conv of (B, H, W, C) with kernel (k, k, 1, C), symmetric padding.

    ``impl='xla'`` uses ``lax.conv_general_dilated`` with ``feature_group_count=C``;
    ``impl='shifted'`` sums k*k shifted slices of the padded input times per-channel
    weights, accumulating in float32, with a hand-written backward pass (XLA:CPU's grouped
    convolution measured 3-7x slower forward + backward; docs/benchmarks.md). Both give the
    same values and gradients (tested).
    """
    kernel = kernel.astype(x.dtype)
    if impl == "xla":
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(1, 1),
            padding=((padding, padding), (padding, padding)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=x.shape[-1],
        )
    elif impl == "shifted":
        y = _shifted_depthwise(x, kernel[:, :, 0, :], padding)
    else:
        raise ValueError(f"depthwise conv impl={impl!r}; use 'xla' or 'shifted'.")
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(..., Cin) @ (Cin, Cout) -> (..., Cout) as one 2-D matmul over the flattened leading axes.

    The flattening is for the backward pass: the kernel gradient then contracts a single
    axis. Contracting (B, H, W) at once made XLA:CPU transpose the cotangent into a copy
    before the matmul: (4, 64, 64, 32) -> 256 forward + backward 47 ms against 17 ms
    flattened (docs/benchmarks.md).
    """
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def _dense_dot_general(lhs, rhs, dimension_numbers, precision=None, out_sharding=None):
    """``nnx.Linear``'s product (last axis of ``lhs`` with the first of ``rhs``) as ``dense``."""
    plain = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
    if not plain or precision is not None or out_sharding is not None:
        raise NotImplementedError(f"dense: {dimension_numbers=}, {precision=}, {out_sharding=}")
    return dense(lhs, rhs)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, ``jax.nn.gelu(x, approximate=False)``, keeping only ``x`` for the
    backward pass: autodiff of the erf form keeps three maps of x's size (its product,
    erfc and exp), a MixFFN's hidden map three times over (docs/benchmarks.md, change 11)."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
    return gelu(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * math.sqrt(0.5)))  # erf: one fusible XLA op
    pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((g * (cdf + x32 * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int | tuple[int, ...] = -1) -> jax.Array:
    """``jax.nn.softmax`` whose backward pass keeps only the output ``y``, which attention
    keeps anyway for its product with the values: dx = y * (g - sum(g * y)). Autodiff of
    jax.nn.softmax keeps the exponentials as a second map of the scores' size."""
    return jax.nn.softmax(x, axis=axis)


def _softmax_fwd(x, axis):
    y = jax.nn.softmax(x, axis=axis)
    return y, y


def _softmax_bwd(axis, y, g):
    return (y * (g - jnp.sum(g * y, axis=axis, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_last(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis of ``x`` (..., C) with ``scale``, ``bias`` (C,): statistics
    in float32, the result in x's dtype. The backward pass keeps x and the per-row mean and
    1/std, as PyTorch does; autodiff of the same formula keeps three maps of x's size."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True) + eps)
    y = (x32 - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, residuals, g):
    x, mean, rstd, scale = residuals
    xhat = (x.astype(jnp.float32) - mean) * rstd
    g32 = g.astype(jnp.float32)
    rows = tuple(range(x.ndim - 1))
    dxhat = g32 * scale.astype(jnp.float32)
    dx = rstd * (
        dxhat
        - jnp.mean(dxhat, axis=-1, keepdims=True)
        - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
    )
    dscale = jnp.sum(g32 * xhat, axis=rows).astype(scale.dtype)
    dbias = jnp.sum(g32, axis=rows).astype(scale.dtype)
    return dx.astype(x.dtype), dscale, dbias


layer_norm_last.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def drop_path(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Stochastic depth: zero whole samples of (B, ...) with probability ``rate``, rescale."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def run_blocks(blocks, x: jax.Array, *, train: bool, remat: bool) -> jax.Array:
    """Applies ``blocks`` in order. With ``remat`` each block keeps only its input for the
    backward pass and recomputes the rest in it (``nnx.remat``)."""
    for block in blocks:
        if remat:
            x = nnx.remat(lambda b, y: b(y, train=train))(block, x)
        else:
            x = block(x, train=train)
    return x


# ----------------------------------------------------------------------------- modules


class DepthwiseConv(nnx.Module):
    """Depthwise k x k conv, stride 1, padding k // 2, with bias; kernel (k, k, 1, C)."""

    def __init__(
        self, channels: int, kernel_size: int, *, impl: str = "auto", dtype: Dtype = None, rngs
    ):
        fan_out = kernel_size * kernel_size  # PyTorch-style fan_out of a depthwise conv
        std = math.sqrt(2.0 / fan_out)
        self.kernel = nnx.Param(
            std * jax.random.normal(rngs.params(), (kernel_size, kernel_size, 1, channels))
        )
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.padding = kernel_size // 2
        self.impl = resolve_dwconv_impl(impl)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return depthwise_conv2d(
            x, self.kernel[...], self.bias[...], padding=self.padding, impl=self.impl
        )


class DropPath(nnx.Module):
    """Stochastic depth on the residual branch; identity at eval or with rate 0."""

    def __init__(self, rate: float, *, rngs):
        self.rate = float(rate)
        self.rngs = rngs["dropout"].fork() if self.rate > 0 else nnx.data(None)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        return drop_path(x, self.rate, self.rngs())


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` over the last axis (same parameters and state) computed by
    :func:`layer_norm_last`, whose backward pass keeps one map of the input's size."""

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or jnp.result_type(x, self.scale[...])
        return layer_norm_last(x.astype(dtype), self.scale[...], self.bias[...], self.epsilon)


def layer_norm(dim: int, eps: float, dtype: Dtype, rngs) -> LayerNorm:
    """LayerNorm over the last axis, float32 parameters."""
    return LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def linear(din: int, dout: int, dtype: Dtype, rngs, *, use_bias: bool = True) -> nnx.Linear:
    """Linear with truncated-normal(0.02) kernel (in, out) and zero bias, applied as ``dense``."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        kernel_init=trunc_normal_02,
        dtype=dtype,
        dot_general=_dense_dot_general,
        rngs=rngs,
    )


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
) -> jax.Array:
    """PyTorch ``Conv2d`` of (B, H, W, Cin) with kernel (k, k, Cin, Cout), symmetric padding.

    The formulation follows the shape (docs/benchmarks.md has the measurements):

    - 1x1, stride 1, no padding (SegFormer/UperNet laterals and fuse layers): one matmul over
      channels (``dense``). XLA:CPU's 1x1 ``conv_general_dilated`` measured 2.4x slower
      forward+backward.
    - kernel == stride, no padding (patchify: ConvNeXt stem and downsampling, MiT spatial
      reduction): non-overlapping k x k patches reshaped and contracted in one einsum; rows
      and columns past the last whole patch are dropped, as PyTorch does.
    - anything else (dilated convs included): ``lax.conv_general_dilated``.
    """
    k = kernel.shape[0]
    kernel = kernel.astype(x.dtype)
    undilated = dilation == 1 or k == 1
    if k == 1 and stride == 1 and padding == 0:
        y = dense(x, kernel[0, 0])
    elif undilated and k == stride and padding == 0:
        b, h, w, c = x.shape
        ho, wo = h // k, w // k
        patches = x[:, : ho * k, : wo * k].reshape(b, ho, k, wo, k, c)
        y = jnp.einsum("bhiwjc,ijco->bhwo", patches, kernel)
    else:
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            rhs_dilation=(dilation, dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


class Conv(nnx.Module):
    """``nn.Conv2d`` with explicit symmetric padding and dilation: kernel (k, k, in, out),
    optional bias.

    Parameters are float32 and named as ``nnx.Conv``'s (``kernel``, ``bias``); the forward
    pass is :func:`conv2d`, which picks the fastest exact formulation for the shape.
    """

    def __init__(
        self,
        din: int,
        dout: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        use_bias: bool = True,
        dtype: Dtype = None,
        rngs,
    ):
        shape = (kernel_size, kernel_size, din, dout)
        self.kernel = nnx.Param(conv_fan_out(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dout,), jnp.float32)) if use_bias else nnx.data(None)
        self.stride, self.padding, self.dilation, self.dtype = stride, padding, dilation, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, din) -> (B, H', W', dout)."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        bias = None if self.bias is None else self.bias[...]
        return conv2d(
            x,
            self.kernel[...],
            bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
        )


class ConvBNReLU(nnx.Module):
    """mmcv ConvModule: conv (no bias) -> BatchNorm -> ReLU.

    BatchNorm statistics are means over every non-channel axis of the array it sees; under
    ``jax.jit`` with a batch sharded by NamedSharding that array is the global batch, so the
    statistics are global (SyncBN semantics) without an ``axis_name``. Momentum 0.1 in
    PyTorch's convention (flax ``momentum=0.9``), eps 1e-5.
    """

    def __init__(
        self,
        din: int,
        dout: int,
        kernel_size: int = 1,
        *,
        padding: int | None = None,
        dtype: Dtype = None,
        rngs,
    ):
        pad = kernel_size // 2 if padding is None else padding
        self.conv = Conv(
            din, dout, kernel_size, padding=pad, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.bn = batch_norm(dout, dtype, rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(B, H, W, din) -> (B, H, W, dout)."""
        return self.norm_act(self.conv(x), train=train)

    def norm_act(self, y: jax.Array, *, train: bool) -> jax.Array:
        """BatchNorm -> ReLU of a conv output ``y`` (B, H, W, dout)."""
        return jax.nn.relu(self.bn(y, use_running_average=not train))


def batch_norm(dim: int, dtype: Dtype, rngs) -> nnx.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 -> flax 0.9, eps 1e-5)."""
    return nnx.BatchNorm(
        dim,
        momentum=0.9,
        epsilon=1e-5,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )
