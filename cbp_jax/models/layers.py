"""NNX modules shared by the encoders and heads (channels last, (B, H, W, C)).

Their arithmetic is in ``cbp_jax.models.kernels``; parameters are float32 and named as the
matching ``flax.nnx`` modules' are, so checkpoints and weight maps see familiar names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax import sharding
from cbp_jax.models import kernels

Dtype = jnp.dtype | type | None

trunc_normal_02 = nnx.initializers.truncated_normal(stddev=0.02)
conv_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


# Named ``jax.checkpoint`` policies ``remat`` may name (``jax.checkpoint_policies.<name>``).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
# The attribute of a :class:`BlockStack` holding the stacked blocks ("stacked"): a parameter
# path with this component has a leading axis of one entry per block (or group of blocks),
# which the partition rules and the optimizer's 1-D test know (``sharding.STACKED``).
STACKED = sharding.STACKED


def remat_policy(remat: bool | str | None) -> tuple[bool, Callable | None]:
    """``(enabled, jax.checkpoint policy)`` of a ``remat`` setting: False / "" / None off;
    True the whole block recomputed (policy None, i.e. ``nothing_saveable``); a name of
    :data:`REMAT_POLICIES` that ``jax.checkpoint_policies`` policy."""
    if remat is None or remat is False or remat == "":
        return False, None
    if remat is True:
        return True, None
    if isinstance(remat, str) and remat in REMAT_POLICIES:
        return True, getattr(jax.checkpoint_policies, remat)
    raise ValueError(
        f"remat={remat!r}: use False or '' (off), True (recompute each block, as "
        f"'nothing_saveable') or a jax.checkpoint policy name: {', '.join(REMAT_POLICIES)}."
    )


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    """Stochastic-depth rates spread linearly from 0 to ``rate`` over all blocks, per stage."""
    total = sum(depths)
    rates = [rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(depths[:s]) for s in range(len(depths))]
    return [rates[start : start + depth] for start, depth in zip(starts, depths, strict=True)]


def run_blocks(blocks, x: jax.Array, *, train: bool, remat: bool | str) -> jax.Array:
    """Applies ``blocks`` (a :class:`BlockStack`, or a sequence of blocks and stacks) in order.

    With ``remat`` (see :func:`remat_policy`) each block keeps only what the policy saves for
    the backward pass and recomputes the rest in it (``nnx.remat``); a stack applies the
    policy to its scanned body.
    """
    if isinstance(blocks, BlockStack):
        return blocks(x, train=train, remat=remat)
    enabled, policy = remat_policy(remat)
    for block in blocks:
        if isinstance(block, BlockStack):
            x = block(x, train=train, remat=remat)
        elif enabled:
            x = nnx.remat(lambda b, y: b(y, train=train), policy=policy)(block, x)
        else:
            x = block(x, train=train)
    return x


def stack_modules(units: Sequence[nnx.Module]) -> nnx.Module:
    """One module of ``units``' structure whose every variable is the ``units``' stacked
    along a new leading axis; the units must be identical modules (same graph)."""
    graphdef, state = nnx.split(units[0])
    states = [state]
    for i, unit in enumerate(units[1:], 1):
        other, unit_state = nnx.split(unit)
        if other != graphdef:
            raise ValueError(
                f"stack_modules: unit {i} ({type(unit).__name__}) is not the same module as "
                "unit 0 (a static attribute differs, e.g. a drop-path rate or a window "
                "shift); only identical blocks stack."
            )
        states.append(unit_state)
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


# ----------------------------------------------------------------------------- modules


class BlockStack(nnx.Module):
    """Identical blocks applied in order by one ``jax.lax.scan``.

    The blocks' variables are stacked along a leading axis (:func:`stack_modules`, so the
    stack starts from the values of the blocks it is given); with ``group`` > 1 each scan
    step applies ``group`` consecutive blocks (Swin's window + shifted-window pair), stacked
    as an ``nnx.List``. The drop-path rate of each block is scanned data: blocks built for a
    stack take it with each call (``DropPath(rate, per_call=True)``).

    Args:
      blocks: the blocks, in order; ``len(blocks)`` a multiple of ``group``.
      rates: each block's drop-path rate.
      group: blocks per scan step.
    """

    def __init__(self, blocks: Sequence[nnx.Module], rates: Sequence[float], *, group: int = 1):
        if len(blocks) != len(rates) or not blocks or len(blocks) % group:
            raise ValueError(
                f"BlockStack: {len(blocks)} blocks, {len(rates)} rates, group={group}; give "
                "one rate per block and a positive multiple of group blocks."
            )
        units = (
            list(blocks)
            if group == 1
            else [nnx.List(blocks[i : i + group]) for i in range(0, len(blocks), group)]
        )
        self.stacked = stack_modules(units)  # the STACKED attribute
        self.group = group
        self.rates = tuple(float(r) for r in rates) if any(r > 0 for r in rates) else None

    def __call__(self, x: jax.Array, *, train: bool, remat: bool | str = False) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C): every block in order, ``remat`` on the scanned body."""
        graphdef, params, rest = nnx.split(self.stacked, nnx.Param, ...)
        rates = None
        if self.rates is not None:
            rates = jnp.asarray(self.rates, jnp.float32).reshape(-1, self.group)

        def body(y, step):
            unit_params, unit_rest, unit_rates = step
            unit = nnx.merge(graphdef, unit_params, unit_rest)
            for j, block in enumerate(unit if self.group > 1 else [unit]):
                kwargs = {} if unit_rates is None else {"drop_rate": unit_rates[j]}
                y = block(y, train=train, **kwargs)
            # Training moves BatchNorm statistics and drop-path random streams.
            return y, (nnx.split(unit, nnx.Param, ...)[2] if train else None)

        enabled, policy = remat_policy(remat)
        if enabled:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        x, new_rest = jax.lax.scan(body, x, (params, rest, rates))
        if train:
            nnx.update(self.stacked, new_rest)
        return x


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
    """Stochastic depth on the residual branch; identity at eval or with rate 0.

    Args:
      rate: the probability of dropping a sample's branch.
      per_call: the rate comes with each call instead (a block of a :class:`BlockStack`,
        whose rates are scanned data); ``rate`` then only says whether the block gets a
        stream of its own (rate > 0) or a fixed one that draws nothing from ``rngs``, so that
        stacked blocks are identical modules and the model starts as the unrolled one.
      rngs: the 'dropout' stream is forked from it when the block can drop.
    """

    def __init__(self, rate: float, *, per_call: bool = False, rngs):
        self.rate = None if per_call else float(rate)
        if rate > 0:
            self.rngs = rngs["dropout"].fork()
        elif per_call:  # its stacked siblings' structure (and tag), no draw from ``rngs``
            self.rngs = nnx.RngStream(jax.random.key(0), tag=rngs["dropout"].tag)
        else:
            self.rngs = nnx.data(None)

    def __call__(
        self, x: jax.Array, *, train: bool, rate: jax.Array | float | None = None
    ) -> jax.Array:
        """``x`` (B, ...) with whole samples zeroed at ``self.rate`` (or ``rate`` when built
        ``per_call``) and the rest rescaled by 1 / (1 - rate)."""
        if self.rate is not None:
            if not train or self.rate == 0.0:
                return x
            return kernels.drop_path(x, self.rate, self.rngs())
        if rate is None:
            raise ValueError("DropPath(per_call=True) needs the rate with each call.")
        if not train:
            return x
        return kernels.drop_path(x, rate, self.rngs())


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
