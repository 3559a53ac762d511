"""Array functions the model layers are built from, several with hand-written gradients.

Each one computes exactly what its plain JAX form computes; the custom VJPs keep fewer
activations for the backward pass, and the convolution forms are chosen per shape and
platform for speed (``docs/benchmarks.md`` has the measurements behind each choice).
"""

import functools
import math

import jax
import jax.numpy as jnp

DWCONV_IMPLS = ("auto", "xla", "shifted")


def check_dwconv_impl(impl: str) -> str:
    """``impl`` if it names a depthwise-conv formulation: 'auto' (chosen for the platform the
    program is compiled for: 'shifted' on CPU, XLA's grouped conv elsewhere), 'xla' or
    'shifted'.

    XLA:CPU's grouped convolution is several times slower than the shifted-slices sum
    (docs/benchmarks.md); on GPU/TPU the native depthwise kernels are the fast path.
    """
    if impl not in DWCONV_IMPLS:
        raise ValueError(f"dwconv_impl={impl!r} is not one of {DWCONV_IMPLS}.")
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
    over W: on XLA:CPU faster than reducing over (B, H, W) at once, which in turn beats k*k
    separate reductions (docs/benchmarks.md)."""
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
    ``impl='auto'`` picks per platform compiled for (:func:`check_dwconv_impl`);
    ``impl='shifted'`` sums k*k shifted slices of the padded input times per-channel
    weights, accumulating in float32, with a hand-written backward pass (XLA:CPU's grouped
    convolution measured 3-7x slower forward + backward; docs/benchmarks.md). Both give the
    same values and gradients (tested).
    """
    kernel = kernel.astype(x.dtype)
    xla = functools.partial(_xla_depthwise, padding=padding)
    shifted = functools.partial(_shifted_depthwise_conv, padding=padding)
    if impl == "auto":
        y = jax.lax.platform_dependent(x, kernel, cpu=shifted, default=xla)
    elif impl in ("xla", "shifted"):
        y = {"xla": xla, "shifted": shifted}[impl](x, kernel)
    else:
        raise ValueError(f"depthwise conv impl={impl!r}; use one of {DWCONV_IMPLS}.")
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


@jax.named_scope("dwconv_xla")
def _xla_depthwise(x, kernel, padding):
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


@jax.named_scope("dwconv_shifted")
def _shifted_depthwise_conv(x, kernel, padding):
    return _shifted_depthwise(x, kernel[:, :, 0, :], padding)


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(..., Cin) @ (Cin, Cout) -> (..., Cout) as one 2-D matmul over the flattened leading axes.

    The flattening is for the backward pass: the kernel gradient then contracts a single
    axis. Contracting (B, H, W) at once made XLA:CPU transpose the cotangent into a copy
    before the matmul (docs/benchmarks.md).
    """
    return (x.reshape(-1, x.shape[-1]) @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, out_sharding=None):
    """``nnx.Linear``'s product (last axis of ``lhs`` with the first of ``rhs``) as ``dense``."""
    plain = dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ()))
    if not plain or precision is not None or out_sharding is not None:
        raise NotImplementedError(f"dense: {dimension_numbers=}, {precision=}, {out_sharding=}")
    return dense(lhs, rhs)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, ``jax.nn.gelu(x, approximate=False)``, keeping only ``x`` for the
    backward pass: autodiff of the erf form keeps three maps of x's size (its product,
    erfc and exp), a MixFFN's hidden map three times over (docs/benchmarks.md)."""
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
    """Stochastic depth: zero whole samples of (B, ...) with probability ``rate`` (a float,
    or a float32 scalar array: a scanned block's), rescale; the output has ``x``'s dtype."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    if not isinstance(keep, float):  # an array would promote a bfloat16 x to float32
        keep = keep.astype(x.dtype)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


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
