"""ConvNeXt T/S/B/L in its segmentation form (a LayerNorm on each of the 4 outputs), Flax NNX.

Stem conv 4x4 stride 4 + LayerNorm; before stages 2-4 a LayerNorm + conv 2x2 stride 2;
block = depthwise 7x7 -> LayerNorm -> Linear(C, 4C) -> exact GELU -> Linear(4C, C) ->
layer scale -> DropPath + residual. LayerNorm eps 1e-6 throughout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax.models import kernels, layers, stacking
from cbp_jax.models.layers import Dtype


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """Architecture of a ConvNeXt backbone (segmentation form)."""

    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (3, 3, 9, 3)
    drop_path_rate: float = 0.4
    layer_scale_init: float = 1e-6
    norm_eps: float = 1e-6
    kernel_size: int = 7
    in_channels: int = 3


CONVNEXT_VARIANTS = {
    "convnext_tiny": dict(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), drop_path_rate=0.4),
    "convnext_small": dict(dims=(96, 192, 384, 768), depths=(3, 3, 27, 3), drop_path_rate=0.3),
    "convnext_base": dict(dims=(128, 256, 512, 1024), depths=(3, 3, 27, 3), drop_path_rate=0.4),
    "convnext_large": dict(dims=(192, 384, 768, 1536), depths=(3, 3, 27, 3), drop_path_rate=0.4),
}


class ConvNeXtBlock(nnx.Module):
    """Depthwise conv, LayerNorm, MLP with exact GELU, layer scale ``gamma``, residual."""

    def __init__(self, dim, dpr, cfg, dwconv_impl, dtype, rngs, scanned=False):
        self.dwconv = layers.DepthwiseConv(
            dim, cfg.kernel_size, impl=dwconv_impl, dtype=dtype, rngs=rngs
        )
        self.norm = layers.layer_norm(dim, cfg.norm_eps, dtype, rngs)
        self.fc1 = layers.linear(dim, 4 * dim, dtype, rngs)
        self.fc2 = layers.linear(4 * dim, dim, dtype, rngs)
        self.gamma = nnx.Param(jnp.full((dim,), cfg.layer_scale_init, jnp.float32))
        self.drop_path = layers.DropPath(dpr, per_call=scanned, rngs=rngs)

    def __call__(self, x, *, train: bool, drop_rate=None):
        y = self.fc2(kernels.gelu(self.fc1(self.norm(self.dwconv(x)))))
        y = y * self.gamma[...].astype(y.dtype)
        return x + self.drop_path(y, train=train, rate=drop_rate)


class ConvNeXtStage(nnx.Module):
    """Optional downsampling (LayerNorm + conv 2x2 stride 2), then blocks (a
    ``layers.BlockStack`` with ``scan``)."""

    def __init__(self, din, dim, downsample, dprs, cfg, dwconv_impl, dtype, rngs, scan=False):
        self.downsample = downsample
        if downsample:
            self.down_norm = layers.layer_norm(din, cfg.norm_eps, dtype, rngs)
            self.down_conv = layers.Conv(din, dim, 2, stride=2, dtype=dtype, rngs=rngs)
        scan = scan and stacking.stage_stack("convnext", len(dprs)) is not None
        blocks = [
            ConvNeXtBlock(dim, r, cfg, dwconv_impl, dtype, rngs, scanned=scan and any(dprs))
            for r in dprs
        ]
        self.blocks = layers.BlockStack(blocks, dprs) if scan else nnx.List(blocks)
        self.remat = False

    def __call__(self, x, *, train: bool):
        if self.downsample:
            x = self.down_conv(self.down_norm(x))
        return layers.run_blocks(self.blocks, x, train=train, remat=self.remat)


class ConvNeXt(nnx.Module):
    """ConvNeXt encoder: images (B, H, W, 3) -> 4 normalized maps (B, H/4, W/4, C1) ... C4.

    Args:
      config: the architecture.
      dtype: compute dtype (parameters stay float32); None keeps float32.
      dwconv_impl: 'auto' (shifted slices on CPU, XLA grouped conv elsewhere), 'xla',
        'shifted'.
      remat: recompute block activations in the backward pass (less memory on GPU/TPU;
        XLA:CPU merges the recomputation back): True, or a ``jax.checkpoint`` policy name
        of ``layers.REMAT_POLICIES`` (what each block keeps).
      scan_blocks: each stage's blocks as one ``layers.BlockStack`` (parameters stacked,
        applied by ``jax.lax.scan``; ``cbp_jax.models.stacking`` converts the layouts).
      rngs: parameter init and the 'dropout' stream for stochastic depth.
    """

    FAMILY = "convnext"

    def __init__(
        self,
        config: ConvNeXtConfig,
        *,
        dtype: Dtype = None,
        dwconv_impl: str = "auto",
        remat: bool | str = False,
        scan_blocks: bool = False,
        rngs: nnx.Rngs,
    ):
        layers.remat_policy(remat)  # a ValueError naming the valid values
        if len(config.dims) != len(config.depths):
            raise ValueError(
                f"ConvNeXtConfig dims={config.dims} and depths={config.depths} differ in length."
            )
        self.config = config
        self.dims = tuple(config.dims)
        self.scan_blocks = bool(scan_blocks)
        self.stem_conv = layers.Conv(
            config.in_channels, config.dims[0], 4, stride=4, dtype=dtype, rngs=rngs
        )
        self.stem_norm = layers.layer_norm(config.dims[0], config.norm_eps, dtype, rngs)
        stages = []
        for i, dprs in enumerate(layers.drop_path_rates(config.drop_path_rate, config.depths)):
            din = config.dims[max(i - 1, 0)]
            stages.append(
                ConvNeXtStage(
                    din,
                    config.dims[i],
                    i > 0,
                    dprs,
                    config,
                    dwconv_impl,
                    dtype,
                    rngs,
                    scan_blocks,
                )
            )
        for stage in stages:
            stage.remat = remat
        self.stages = nnx.List(stages)
        self.out_norms = nnx.List(
            [layers.layer_norm(d, config.norm_eps, dtype, rngs) for d in config.dims]
        )

    def __call__(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """(B, H, W, 3) -> [(B, H/4, W/4, C1), ..., (B, H/32, W/32, C4)]."""
        x = self.stem_norm(self.stem_conv(images))
        feats = []
        for stage, norm in zip(self.stages, self.out_norms, strict=True):
            x = stage(x, train=train)
            feats.append(norm(x))
        return feats
