"""Mix Transformer (MiT-B0..B5), the SegFormer encoder, in Flax NNX.

Follows NVlabs/SegFormer (see docs/reference.md): overlapping patch embeddings with
explicit symmetric padding, efficient attention with spatial reduction, Mix-FFN with a
3x3 depthwise conv and exact GELU, linearly spread stochastic depth, a LayerNorm at the
end of every stage. Channels last: images (B, H, W, 3) -> 4 maps (B, H/4, W/4, C1) ...
(B, H/32, W/32, C4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax.models import kernels, layers, stacking
from cbp_jax.models.layers import Dtype


@dataclasses.dataclass(frozen=True)
class MiTConfig:
    """Architecture of a Mix Transformer.

    ``norm_eps`` is the LayerNorm eps in blocks and stage norms, ``patch_norm_eps`` the one
    in patch-embedding and spatial-reduction norms (None: same as ``norm_eps``). mmseg uses
    1e-6 for both (the default here), NVlabs 1e-6 / 1e-5, HF transformers 1e-5 / 1e-5.
    """

    embed_dims: tuple[int, ...] = (32, 64, 160, 256)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    norm_eps: float = 1e-6
    patch_norm_eps: float | None = None
    in_channels: int = 3


MIT_VARIANTS = {
    "mit_b0": dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "mit_b1": dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "mit_b2": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "mit_b3": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "mit_b4": dict(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "mit_b5": dict(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
}


class OverlapPatchEmbed(nnx.Module):
    """Conv (kernel k, stride s, padding k // 2) then LayerNorm: (B, H, W, Cin) -> (B, h, w, C)."""

    def __init__(self, din, dim, patch_size, stride, eps, dtype, rngs):
        self.proj = layers.Conv(
            din, dim, patch_size, stride=stride, padding=patch_size // 2, dtype=dtype, rngs=rngs
        )
        self.norm = layers.layer_norm(dim, eps, dtype, rngs)

    def __call__(self, x):
        return self.norm(self.proj(x))


class EfficientAttention(nnx.Module):
    """Multi-head self-attention whose keys/values come from a map reduced by ``sr``."""

    def __init__(self, dim, num_heads, sr_ratio, eps, dtype, rngs):
        if dim % num_heads:
            raise ValueError(f"MiT stage width {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.q = layers.linear(dim, dim, dtype, rngs)
        self.k = layers.linear(dim, dim, dtype, rngs)
        self.v = layers.linear(dim, dim, dtype, rngs)
        self.proj = layers.linear(dim, dim, dtype, rngs)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = layers.Conv(dim, dim, sr_ratio, stride=sr_ratio, dtype=dtype, rngs=rngs)
            self.sr_norm = layers.layer_norm(dim, eps, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        n, d = self.num_heads, c // self.num_heads
        # Only the channel axis is split or merged (no reshape across spatial axes), so this
        # also traces under explicitly sharded batches.
        # The scale goes on q, as in PyTorch's SDPA: on the scores, XLA:CPU materializes a
        # scores-sized broadcast of it that lives until the backward pass.
        q = self.q(x).reshape(b, h, w, n, d) * (d**-0.5)
        kv = self.sr_norm(self.sr(x)) if self.sr_ratio > 1 else x
        hk, wk = kv.shape[1], kv.shape[2]
        k = self.k(kv).reshape(b, hk, wk, n, d)
        v = self.v(kv).reshape(b, hk, wk, n, d)
        scores = jnp.einsum("bhwnd,bijnd->bnhwij", q, k)
        attn = kernels.softmax(scores.astype(jnp.float32), (-2, -1)).astype(v.dtype)
        out = jnp.einsum("bnhwij,bijnd->bhwnd", attn, v).reshape(b, h, w, c)
        return self.proj(out)


class MixFFN(nnx.Module):
    """Linear(C, rC) -> depthwise 3x3 conv -> exact GELU -> Linear(rC, C)."""

    def __init__(self, dim, hidden, dwconv_impl, dtype, rngs):
        self.fc1 = layers.linear(dim, hidden, dtype, rngs)
        self.dwconv = layers.DepthwiseConv(hidden, 3, impl=dwconv_impl, dtype=dtype, rngs=rngs)
        self.fc2 = layers.linear(hidden, dim, dtype, rngs)

    def __call__(self, x):
        return self.fc2(kernels.gelu(self.dwconv(self.fc1(x))))


class MiTBlock(nnx.Module):
    """x + DropPath(attn(LN(x))); x + DropPath(mixffn(LN(x)))."""

    def __init__(
        self, dim, num_heads, sr_ratio, mlp_ratio, dpr, cfg, dwconv_impl, dtype, rngs, scanned=False
    ):
        patch_eps = cfg.norm_eps if cfg.patch_norm_eps is None else cfg.patch_norm_eps
        self.norm1 = layers.layer_norm(dim, cfg.norm_eps, dtype, rngs)
        self.attn = EfficientAttention(dim, num_heads, sr_ratio, patch_eps, dtype, rngs)
        self.norm2 = layers.layer_norm(dim, cfg.norm_eps, dtype, rngs)
        self.mlp = MixFFN(dim, dim * mlp_ratio, dwconv_impl, dtype, rngs)
        self.drop_path = layers.DropPath(dpr, per_call=scanned, rngs=rngs)

    def __call__(self, x, *, train: bool, drop_rate=None):
        x = x + self.drop_path(self.attn(self.norm1(x)), train=train, rate=drop_rate)
        return x + self.drop_path(self.mlp(self.norm2(x)), train=train, rate=drop_rate)


class MiTStage(nnx.Module):
    """Patch embedding, blocks (a ``layers.BlockStack`` with ``scan``), LayerNorm."""

    def __init__(self, s, din, dpr: Sequence[float], cfg, dwconv_impl, dtype, rngs, scan=False):
        dim = cfg.embed_dims[s]
        patch_eps = cfg.norm_eps if cfg.patch_norm_eps is None else cfg.patch_norm_eps
        self.patch_embed = OverlapPatchEmbed(
            din, dim, cfg.patch_sizes[s], cfg.strides[s], patch_eps, dtype, rngs
        )
        scan = scan and stacking.stage_stack("mit", len(dpr)) is not None
        blocks = [
            MiTBlock(
                dim,
                cfg.num_heads[s],
                cfg.sr_ratios[s],
                cfg.mlp_ratio,
                rate,
                cfg,
                dwconv_impl,
                dtype,
                rngs,
                scanned=scan and any(dpr),
            )
            for rate in dpr
        ]
        self.blocks = layers.BlockStack(blocks, dpr) if scan else nnx.List(blocks)
        self.norm = layers.layer_norm(dim, cfg.norm_eps, dtype, rngs)
        self.remat = False

    def __call__(self, x, *, train: bool):
        x = self.patch_embed(x)
        x = layers.run_blocks(self.blocks, x, train=train, remat=self.remat)
        return self.norm(x)


class MixTransformer(nnx.Module):
    """MiT encoder: images (B, H, W, 3) -> list of 4 maps (B, H/2^(s+2), W/2^(s+2), C_s).

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

    FAMILY = "mit"

    def __init__(
        self,
        config: MiTConfig,
        *,
        dtype: Dtype = None,
        dwconv_impl: str = "auto",
        remat: bool | str = False,
        scan_blocks: bool = False,
        rngs: nnx.Rngs,
    ):
        layers.remat_policy(remat)  # a ValueError naming the valid values
        n = len(config.depths)
        for field in ("embed_dims", "num_heads", "sr_ratios", "patch_sizes", "strides"):
            if len(getattr(config, field)) != n:
                raise ValueError(
                    f"MiTConfig.{field}={getattr(config, field)} needs {n} entries, one per "
                    f"stage of depths={config.depths}."
                )
        self.config = config
        self.dims = tuple(config.embed_dims)
        self.scan_blocks = bool(scan_blocks)
        stages, din = [], config.in_channels
        rates = layers.drop_path_rates(config.drop_path_rate, config.depths)
        for s, dpr in enumerate(rates):
            stages.append(MiTStage(s, din, dpr, config, dwconv_impl, dtype, rngs, scan_blocks))
            din = config.embed_dims[s]
        for stage in stages:
            stage.remat = remat
        self.stages = nnx.List(stages)

    def __call__(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """(B, H, W, 3) -> [(B, H/4, W/4, C1), ..., (B, H/32, W/32, C4)]."""
        feats, x = [], images
        for stage in self.stages:
            x = stage(x, train=train)
            feats.append(x)
        return feats
