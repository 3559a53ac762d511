"""ResNetV1c-50/101 as mmseg's FCN / PSPNet / DeepLab use it (dilated, output stride 8), NNX.

mmseg ``ResNetV1c``: a deep stem of three 3x3 conv + BN + ReLU (3 -> 32 stride 2, 32 -> 32,
32 -> 64), 3x3 max pooling stride 2 (padding 1); bottleneck blocks in the PyTorch style
(the stride in the 3x3 conv): 1x1 -> 3x3 (stride, dilation, padding = dilation) -> 1x1 (4x
width), each conv without bias + BN, ReLU after the residual sum; a 1x1 conv + BN shortcut
(stride of the block) where the shape changes. The ``_d8`` setting: strides (1, 2, 1, 1),
dilations (1, 1, 2, 4) with contract dilation (the first block of a dilated stage uses half
the dilation), so the 4 maps are at 1/4, 1/8, 1/8, 1/8.

BatchNorm uses batch statistics when training; under ``jax.jit`` with a sharded batch they
are global (SyncBN semantics), as in ``layers.ConvBNReLU``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax.models import layers, stacking
from cbp_jax.models.layers import Dtype


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """Architecture of a ResNetV1c backbone (bottleneck blocks, expansion 4).

    ``drop_path_rate`` (stochastic depth on the residual branches, spread linearly) is 0 in
    mmseg's ResNet; it exists so that the configs' shared field has a meaning here too.
    """

    depths: tuple[int, ...] = (3, 4, 23, 3)
    stem_channels: int = 64
    base_channels: int = 64
    strides: tuple[int, ...] = (1, 2, 1, 1)
    dilations: tuple[int, ...] = (1, 1, 2, 4)
    contract_dilation: bool = True
    drop_path_rate: float = 0.0
    in_channels: int = 3


RESNET_VARIANTS = {
    "resnet50_v1c": dict(depths=(3, 4, 6, 3)),
    "resnet101_v1c": dict(depths=(3, 4, 23, 3)),
}

EXPANSION = 4


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """``nn.MaxPool2d(3, stride=2, padding=1)`` on (B, H, W, C) (padding never wins)."""
    return jax.lax.reduce_window(
        x,
        -jnp.inf,  # a Python scalar: JAX then knows the max monoid (and its gradient)
        jax.lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    )


class ConvBN(nnx.Module):
    """Conv (no bias, padding = dilation * (k // 2)) -> BatchNorm; no activation."""

    def __init__(self, din, dout, kernel_size, *, stride=1, dilation=1, dtype, rngs):
        self.conv = layers.Conv(
            din,
            dout,
            kernel_size,
            stride=stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
        )
        self.bn = layers.batch_norm(dout, dtype, rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not train)


class Bottleneck(nnx.Module):
    """relu(x' + DropPath(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))))), x' the
    shortcut (x, or conv 1x1 + BN when the stride or width changes)."""

    def __init__(self, din, planes, stride, dilation, dpr, dtype, rngs, scanned=False):
        dout = planes * EXPANSION
        self.conv1 = ConvBN(din, planes, 1, dtype=dtype, rngs=rngs)
        self.conv2 = ConvBN(
            planes, planes, 3, stride=stride, dilation=dilation, dtype=dtype, rngs=rngs
        )
        self.conv3 = ConvBN(planes, dout, 1, dtype=dtype, rngs=rngs)
        needs_projection = stride != 1 or din != dout
        self.downsample = (
            ConvBN(din, dout, 1, stride=stride, dtype=dtype, rngs=rngs)
            if needs_projection
            else None
        )
        self.drop_path = layers.DropPath(dpr, per_call=scanned, rngs=rngs)

    def __call__(self, x, *, train: bool, drop_rate=None):
        y = jax.nn.relu(self.conv1(x, train=train))
        y = jax.nn.relu(self.conv2(y, train=train))
        y = self.conv3(y, train=train)
        shortcut = x if self.downsample is None else self.downsample(x, train=train)
        return jax.nn.relu(shortcut + self.drop_path(y, train=train, rate=drop_rate))


class ResNetV1c(nnx.Module):
    """ResNetV1c encoder: images (B, H, W, 3) -> 4 maps of widths 256, 512, 1024, 2048.

    With the default strides and dilations the maps are at 1/4, 1/8, 1/8, 1/8 of the input
    (the sizes follow PyTorch's conv arithmetic: ceil(H / 2) after each stride-2 layer).

    Args:
      config: the architecture.
      dtype: compute dtype (parameters and BN statistics stay float32); None keeps float32.
      remat: recompute block activations in the backward pass (less memory): True, or a
        ``jax.checkpoint`` policy name of ``layers.REMAT_POLICIES`` (what each block keeps).
      scan_blocks: each stage's blocks after the first as one ``layers.BlockStack``
        (``stages[i]`` is then [first block, stack]), applied by ``jax.lax.scan``.
      rngs: parameter init and the 'dropout' stream (stochastic depth, if enabled).
    """

    FAMILY = "resnet"

    def __init__(
        self,
        config: ResNetConfig,
        *,
        dtype: Dtype = None,
        remat: bool | str = False,
        scan_blocks: bool = False,
        rngs: nnx.Rngs,
    ):
        layers.remat_policy(remat)  # a ValueError naming the valid values
        n = len(config.depths)
        if not len(config.strides) == len(config.dilations) == n:
            raise ValueError(
                f"ResNetConfig depths={config.depths}, strides={config.strides} and "
                f"dilations={config.dilations} must have one entry per stage."
            )
        self.config = config
        self.remat = remat
        self.scan_blocks = bool(scan_blocks)
        half = config.stem_channels // 2
        self.stem = nnx.List(
            [
                ConvBN(config.in_channels, half, 3, stride=2, dtype=dtype, rngs=rngs),
                ConvBN(half, half, 3, dtype=dtype, rngs=rngs),
                ConvBN(half, config.stem_channels, 3, dtype=dtype, rngs=rngs),
            ]
        )
        planes = [config.base_channels * 2**i for i in range(n)]
        self.dims = tuple(p * EXPANSION for p in planes)
        stages, din = [], config.stem_channels
        for i, dprs in enumerate(layers.drop_path_rates(config.drop_path_rate, config.depths)):
            dilation = config.dilations[i]
            first = dilation // 2 if dilation > 1 and config.contract_dilation else dilation
            scan = scan_blocks and stacking.stage_stack("resnet", len(dprs)) is not None
            blocks = []
            for j, rate in enumerate(dprs):
                blocks.append(
                    Bottleneck(
                        din if j == 0 else self.dims[i],
                        planes[i],
                        config.strides[i] if j == 0 else 1,
                        first if j == 0 else dilation,
                        rate,
                        dtype,
                        rngs,
                        scanned=scan and j > 0 and any(dprs[1:]),
                    )
                )
            if scan:  # the first (downsampling) block, then the identical ones stacked
                blocks = [blocks[0], layers.BlockStack(blocks[1:], dprs[1:])]
            stages.append(nnx.List(blocks))
            din = self.dims[i]
        self.stages = nnx.List(stages)

    def __call__(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """(B, H, W, 3) -> [(B, H/4, W/4, 256), (B, H/8, W/8, 512), ..., 2048] (d8)."""
        x = images
        for conv in self.stem:
            x = jax.nn.relu(conv(x, train=train))
        x = max_pool_3x3_s2(x)
        feats = []
        for blocks in self.stages:
            x = layers.run_blocks(blocks, x, train=train, remat=self.remat)
            feats.append(x)
        return feats
