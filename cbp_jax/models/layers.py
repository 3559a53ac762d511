"""NNX modules shared by the encoders and heads (channels last, (B, H, W, C)).

Their arithmetic is in ``cbp_jax.models.kernels``; parameters are float32 and named as the
matching ``flax.nnx`` modules' are, so checkpoints and weight maps see familiar names.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax.models import kernels

Dtype = jnp.dtype | type | None

trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02)
conv_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


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
        self.impl = kernels.check_dwconv_impl(impl)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        if self.dtype is not None:
            x = x.astype(self.dtype)
        return kernels.depthwise_conv2d(
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
        return kernels.drop_path(x, self.rate, self.rngs())


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` over the last axis (same parameters and state) computed by
    :func:`kernels.layer_norm_last`, whose backward pass keeps one map of the input's size."""

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or jnp.result_type(x, self.scale[...])
        return kernels.layer_norm_last(
            x.astype(dtype), self.scale[...], self.bias[...], self.epsilon
        )


def layer_norm(dim: int, eps: float, dtype: Dtype, rngs) -> LayerNorm:
    """LayerNorm over the last axis, float32 parameters."""
    return LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def linear(din: int, dout: int, dtype: Dtype, rngs, *, use_bias: bool = True) -> nnx.Linear:
    """Linear with truncated-normal(0.02) kernel (in, out) and zero bias, applied as
    ``kernels.dense``."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        kernel_init=trunc_normal_02,
        dtype=dtype,
        dot_general=kernels.dense_dot_general,
        rngs=rngs,
    )


class Conv(nnx.Module):
    """``nn.Conv2d`` with explicit symmetric padding and dilation: kernel (k, k, in, out),
    optional bias.

    Parameters are float32 and named as ``nnx.Conv``'s (``kernel``, ``bias``); the forward
    pass is :func:`kernels.conv2d`, which picks the fastest exact formulation for the shape.
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
        return kernels.conv2d(
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
