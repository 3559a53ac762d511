"""Decode heads: SegFormer (mmseg 1.x and original/HF variants), UperNet, FCN.

Every head maps the encoder's list of maps [(B, H/4, W/4, C1), ...] to the per-pixel
features the classifier sees, *after* the head's dropout: (B, h, w, D). The classifier
(CBP or learned) is not part of the head; ``segmentor.Segmentor`` adds it.
BatchNorm layers use batch statistics when ``train=True`` (global over a sharded batch
under jit) and running statistics otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax import resize
from cbp_jax.models import kernels, layers
from cbp_jax.models.layers import ConvBNReLU, Dtype


def fuse_before_upsampling(
    kernel: jax.Array, maps: Sequence[jax.Array], size: tuple[int, int]
) -> jax.Array:
    """``conv1x1(concat([upsample(m) for m in maps]), kernel)`` without the concatenation.

    Bilinear resizing acts on each channel alone and a 1x1 conv on each pixel alone, so they
    commute: each map meets its slice of the fuse kernel at its own resolution and only the
    D-wide products are upsampled and summed. Same values up to float rounding, and the fuse
    matmuls of stages 2-4 shrink by 4, 16 and 64 times (the fuse layer was the most expensive
    op of the SegFormer train step; docs/benchmarks.md).

    Args:
      kernel: (1, 1, sum of map widths, D) fuse kernel, input channels in ``maps`` order.
      maps: [(B, h_s, w_s, C_s)].
      size: (H, W) to upsample to.

    Returns:
      (B, H, W, D).
    """
    out, start = None, 0
    for m in maps:
        width = m.shape[-1]
        y = resize.resize_bilinear(kernels.conv2d(m, kernel[:, :, start : start + width]), size)
        out = y if out is None else out + y
        start += width
    return out


class SegFormerHead(nnx.Module):
    """mmseg 1.x SegformerHead: per-stage 1x1 ConvModule to D, upsample to 1/4, concat
    c1..c4, 1x1 fuse ConvModule, Dropout2d. Output (B, H/4, W/4, D).
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        width: int = 256,
        *,
        dropout: float = 0.1,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        self.width = width
        self.convs = nnx.List([ConvBNReLU(d, width, 1, dtype=dtype, rngs=rngs) for d in in_dims])
        self.fuse = ConvBNReLU(width * len(in_dims), width, 1, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
        stage_maps = [conv(f, train=train) for conv, f in zip(self.convs, feats, strict=True)]
        x = fuse_before_upsampling(self.fuse.conv.kernel[...], stage_maps, feats[0].shape[1:3])
        x = self.fuse.norm_act(x, train=train)
        return self.dropout(x, deterministic=not train)


class SegFormerMLPHead(nnx.Module):
    """Original NVlabs / HF all-MLP head: per-stage Linear(C_i, D), upsample to 1/4, concat
    c4..c1, 1x1 conv 4D -> D without bias, BatchNorm, ReLU, dropout. Output (B, H/4, W/4, D).
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        width: int = 256,
        *,
        dropout: float = 0.1,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        self.width = width
        self.linear_c = nnx.List([layers.linear(d, width, dtype, rngs) for d in in_dims])
        self.linear_fuse = layers.Conv(
            width * len(in_dims), width, 1, use_bias=False, dtype=dtype, rngs=rngs
        )
        self.bn = layers.batch_norm(width, dtype, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
        stage_maps = [lin(f) for lin, f in zip(self.linear_c, feats, strict=True)]
        kernel = self.linear_fuse.kernel[...]  # concatenation order c4, c3, c2, c1
        x = fuse_before_upsampling(kernel, stage_maps[::-1], feats[0].shape[1:3])
        x = jax.nn.relu(self.bn(x, use_running_average=not train))
        return self.dropout(x, deterministic=not train)


class UperNetHead(nnx.Module):
    """UperNet (mmseg UPerHead): PPM on the last map, FPN over all, 3x3 fuse, Dropout2d.

    PPM: adaptive average pooling to each scale with PyTorch's (overlapping) bins, 1x1
    ConvModule, bilinear upsample, concat with the input, 3x3 bottleneck. Laterals 1x1,
    top-down sum with bilinear upsampling, 3x3 FPN convs, all levels upsampled to 1/4,
    3x3 fuse over len(in_dims) * D channels. Output (B, H/4, W/4, D).
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        width: int = 512,
        *,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        self.width = width
        self.pool_scales = tuple(pool_scales)
        top = in_dims[-1]
        self.psp = nnx.List(
            [ConvBNReLU(top, width, 1, dtype=dtype, rngs=rngs) for _ in self.pool_scales]
        )
        self.bottleneck = ConvBNReLU(
            top + len(self.pool_scales) * width, width, 3, dtype=dtype, rngs=rngs
        )
        self.lateral = nnx.List(
            [ConvBNReLU(d, width, 1, dtype=dtype, rngs=rngs) for d in in_dims[:-1]]
        )
        self.fpn = nnx.List(
            [ConvBNReLU(width, width, 3, dtype=dtype, rngs=rngs) for _ in in_dims[:-1]]
        )
        self.fpn_bottleneck = ConvBNReLU(len(in_dims) * width, width, 3, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
        top = feats[-1]
        psp = [top]
        for scale, block in zip(self.pool_scales, self.psp, strict=True):
            pooled = block(resize.adaptive_avg_pool(top, scale), train=train)
            psp.append(resize.resize_bilinear(pooled, top.shape[1:3]))
        lats = [conv(f, train=train) for conv, f in zip(self.lateral, feats[:-1], strict=True)]
        lats.append(self.bottleneck(jnp.concatenate(psp, axis=-1), train=train))
        for i in range(len(lats) - 1, 0, -1):
            lats[i - 1] = lats[i - 1] + resize.resize_bilinear(lats[i], lats[i - 1].shape[1:3])
        outs = [conv(lat, train=train) for conv, lat in zip(self.fpn, lats[:-1], strict=True)]
        outs.append(lats[-1])
        size = outs[0].shape[1:3]
        outs = [outs[0]] + [resize.resize_bilinear(o, size) for o in outs[1:]]
        x = self.fpn_bottleneck(jnp.concatenate(outs, axis=-1), train=train)
        return self.dropout(x, deterministic=not train)


class FCNHead(nnx.Module):
    """mmseg FCNHead on one encoder map: ``num_convs`` 3x3 ConvModules, optional concat of
    the input + 3x3 ConvModule, Dropout2d. Output (B, h_i, w_i, D) at that map's size.

    UperNet's auxiliary head is ``FCNHead(in_index=2, width=256, num_convs=1,
    concat_input=False)``; the classic FCN head is ``num_convs=2, concat_input=True``.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        width: int = 256,
        *,
        in_index: int = 2,
        num_convs: int = 1,
        concat_input: bool = False,
        kernel_size: int = 3,
        dropout: float = 0.1,
        dtype: Dtype = None,
        rngs: nnx.Rngs,
    ):
        if num_convs < 1:
            raise ValueError(f"FCNHead num_convs={num_convs}; use at least 1.")
        self.width = width
        self.in_index = in_index
        din = in_dims[in_index]
        self.convs = nnx.List(
            [
                ConvBNReLU(din if i == 0 else width, width, kernel_size, dtype=dtype, rngs=rngs)
                for i in range(num_convs)
            ]
        )
        self.concat_input = concat_input
        if concat_input:
            self.conv_cat = ConvBNReLU(din + width, width, kernel_size, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, broadcast_dims=(1, 2), rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
        x = inp = feats[self.in_index]
        for conv in self.convs:
            x = conv(x, train=train)
        if self.concat_input:
            x = self.conv_cat(jnp.concatenate([inp, x], axis=-1), train=train)
        return self.dropout(x, deterministic=not train)
