"""Swin Transformer T/S/B/L in its segmentation form (mmseg ``SwinTransformer``), Flax NNX.

Patch embedding conv 4x4 stride 4 (the image padded bottom/right to a multiple of 4) +
LayerNorm; per stage, blocks alternating window and shifted-window attention (shift =
window // 2, cyclic roll, the -100 mask between regions that the roll made neighbours) with
a learned relative position bias; the token map is padded bottom/right with zeros to a
multiple of the window after the block's first LayerNorm and cropped back after attention.
Block = x + DropPath(attn(LN(x))); x + DropPath(MLP(LN(x))) with exact GELU. Between stages,
patch merging: pad to even size, concatenate the 2x2 neighbours in the official order
(x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]), LayerNorm(4C), Linear(4C, 2C)
without bias. A LayerNorm on each of the 4 outputs (taken before the merging). LayerNorm
eps 1e-5 everywhere (mmseg and transformers).

Unlike transformers, a window never shrinks to a map smaller than it: the map is padded up
to the window, as mmseg does (the two agree whenever every map is larger than the window).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbp_jax.models import kernels, layers, stacking
from cbp_jax.models.layers import Dtype


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """Architecture of a Swin Transformer backbone; stage widths are embed_dim * 2**i."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    mlp_ratio: int = 4
    drop_path_rate: float = 0.3
    norm_eps: float = 1e-5
    in_channels: int = 3


# mmseg's ADE20K UperNet configs: T/S with the 224 ImageNet-1k checkpoints (window 7), B/L
# with the 384 ImageNet-22k ones (window 12); drop-path 0.3 for all.
SWIN_VARIANTS = {
    "swin_tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "swin_base": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12
    ),
    "swin_large": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12
    ),
}


# ----------------------------------------------------------------------------- pure functions


def relative_position_index(window: int) -> np.ndarray:
    """(w*w, w*w) row of the bias table for each (query, key) pair of a w x w window."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N), >= 0
    return rel[0] * (2 * window - 1) + rel[1]


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """(H/w, W/w, w*w, w*w) additive mask of the shifted windows: 0 inside a region, -100
    between positions the cyclic roll brought together. ``height`` and ``width`` are
    multiples of ``window``."""

    def regions(n):
        r = np.zeros(n, np.int64)
        r[n - window :] = 1
        r[n - shift :] = 2
        return r

    labels = regions(height)[:, None] * 3 + regions(width)[None, :]  # (H, W)
    labels = labels.reshape(height // window, window, width // window, window)
    labels = labels.transpose(0, 2, 1, 3).reshape(height // window, width // window, -1)
    diff = labels[..., :, None] != labels[..., None, :]
    return np.where(diff, -100.0, 0.0).astype(np.float32)


def window_partition(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/w, W/w, w*w, C); H and W are multiples of ``window``."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // window, w // window, window * window, c)


def window_merge(windows: jax.Array, window: int) -> jax.Array:
    """Inverse of :func:`window_partition`: (B, H/w, W/w, w*w, C) -> (B, H, W, C)."""
    b, nh, nw, _, c = windows.shape
    x = windows.reshape(b, nh, nw, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * window, nw * window, c)


def pad_bottom_right(x: jax.Array, multiple: int) -> jax.Array:
    """Zero-pads (B, H, W, C) at the bottom and right up to multiples of ``multiple``."""
    ph, pw = -x.shape[1] % multiple, -x.shape[2] % multiple
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    return x


# ----------------------------------------------------------------------------- modules


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside each window, with a relative position bias.

    The bias table ((2w - 1)^2, heads) is learned; the index into it is a constant.
    """

    def __init__(self, dim, num_heads, window, dtype, rngs):
        if dim % num_heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.window = window
        self.q = layers.linear(dim, dim, dtype, rngs)
        self.k = layers.linear(dim, dim, dtype, rngs)
        self.v = layers.linear(dim, dim, dtype, rngs)
        self.proj = layers.linear(dim, dim, dtype, rngs)
        table = layers.trunc_normal_02(rngs.params(), ((2 * window - 1) ** 2, num_heads))
        self.relative_position_bias_table = nnx.Param(table)

    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """(B, nh, nw, N, C) window tokens, mask (nh, nw, N, N) or None -> (B, nh, nw, N, C)."""
        b, nh, nw, n, c = x.shape
        heads, d = self.num_heads, c // self.num_heads
        q = self.q(x).reshape(b, nh, nw, n, heads, d)
        k = self.k(x).reshape(b, nh, nw, n, heads, d)
        v = self.v(x).reshape(b, nh, nw, n, heads, d)
        scores = jnp.einsum("bijnhd,bijmhd->bijhnm", q, k).astype(jnp.float32) * (d**-0.5)
        index = relative_position_index(self.window).reshape(-1)
        bias = self.relative_position_bias_table[...][index].reshape(n, n, heads)
        scores = scores + bias.transpose(2, 0, 1)
        if mask is not None:
            scores = scores + jnp.asarray(mask)[:, :, None]
        attn = kernels.softmax(scores, -1).astype(v.dtype)
        out = jnp.einsum("bijhnm,bijmhd->bijnhd", attn, v).reshape(b, nh, nw, n, c)
        return self.proj(out)


class SwinMLP(nnx.Module):
    """Linear(C, rC) -> exact GELU -> Linear(rC, C)."""

    def __init__(self, dim, hidden, dtype, rngs):
        self.fc1 = layers.linear(dim, hidden, dtype, rngs)
        self.fc2 = layers.linear(hidden, dim, dtype, rngs)

    def __call__(self, x):
        return self.fc2(kernels.gelu(self.fc1(x)))


class SwinBlock(nnx.Module):
    """(Shifted-)window attention and MLP, each pre-LayerNorm with DropPath + residual."""

    def __init__(self, dim, num_heads, shift, dpr, cfg, dtype, rngs, scanned=False):
        self.window = cfg.window_size
        self.shift = cfg.window_size // 2 if shift else 0
        self.norm1 = layers.layer_norm(dim, cfg.norm_eps, dtype, rngs)
        self.attn = WindowAttention(dim, num_heads, cfg.window_size, dtype, rngs)
        self.norm2 = layers.layer_norm(dim, cfg.norm_eps, dtype, rngs)
        self.mlp = SwinMLP(dim, dim * cfg.mlp_ratio, dtype, rngs)
        self.drop_path = layers.DropPath(dpr, per_call=scanned, rngs=rngs)

    def _attention(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C): pad, roll, attend per window, unroll, crop."""
        h, w = x.shape[1], x.shape[2]
        x = pad_bottom_right(x, self.window)
        mask = None
        if self.shift:
            x = jnp.roll(x, (-self.shift, -self.shift), axis=(1, 2))
            mask = shifted_window_mask(x.shape[1], x.shape[2], self.window, self.shift)
        x = window_merge(self.attn(window_partition(x, self.window), mask), self.window)
        if self.shift:
            x = jnp.roll(x, (self.shift, self.shift), axis=(1, 2))
        return x[:, :h, :w]

    def __call__(self, x, *, train: bool, drop_rate=None):
        x = x + self.drop_path(self._attention(self.norm1(x)), train=train, rate=drop_rate)
        return x + self.drop_path(self.mlp(self.norm2(x)), train=train, rate=drop_rate)


class PatchMerging(nnx.Module):
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C): 2x2 neighbours, LayerNorm, Linear."""

    def __init__(self, dim, eps, dtype, rngs):
        self.norm = layers.layer_norm(4 * dim, eps, dtype, rngs)
        self.reduction = layers.linear(4 * dim, 2 * dim, dtype, rngs, use_bias=False)

    def __call__(self, x):
        x = pad_bottom_right(x, 2)
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )
        return self.reduction(self.norm(x))


class SwinStage(nnx.Module):
    """Blocks (even: window attention, odd: shifted) then, except last, patch merging.

    With ``scan`` and an even depth the blocks are a ``layers.BlockStack`` of (window,
    shifted window) pairs."""

    def __init__(self, dim, num_heads, dprs, downsample, cfg, dtype, rngs, scan=False):
        scan = scan and stacking.stage_stack("swin", len(dprs)) is not None
        blocks = [
            SwinBlock(dim, num_heads, j % 2 == 1, r, cfg, dtype, rngs, scanned=scan and any(dprs))
            for j, r in enumerate(dprs)
        ]
        self.blocks = layers.BlockStack(blocks, dprs, group=2) if scan else nnx.List(blocks)
        self.downsample = PatchMerging(dim, cfg.norm_eps, dtype, rngs) if downsample else None
        self.remat = False

    def __call__(self, x, *, train: bool):
        return layers.run_blocks(self.blocks, x, train=train, remat=self.remat)


class SwinTransformer(nnx.Module):
    """Swin encoder: images (B, H, W, 3) -> 4 normalized maps (B, H/4, W/4, C) ... (8C).

    Args:
      config: the architecture.
      dtype: compute dtype (parameters stay float32); None keeps float32.
      remat: recompute block activations in the backward pass (less memory): True, or a
        ``jax.checkpoint`` policy name of ``layers.REMAT_POLICIES`` (what each block keeps).
      scan_blocks: each stage of even depth as one ``layers.BlockStack`` of (window,
        shifted window) pairs, applied by ``jax.lax.scan`` (an odd depth stays unrolled).
      rngs: parameter init and the 'dropout' stream for stochastic depth.
    """

    FAMILY = "swin"

    def __init__(
        self,
        config: SwinConfig,
        *,
        dtype: Dtype = None,
        remat: bool | str = False,
        scan_blocks: bool = False,
        rngs: nnx.Rngs,
    ):
        layers.remat_policy(remat)  # a ValueError naming the valid values
        if len(config.depths) != len(config.num_heads):
            raise ValueError(
                f"SwinConfig depths={config.depths} and num_heads={config.num_heads} differ in "
                "length; give one head count per stage."
            )
        if config.window_size < 2:
            raise ValueError(f"SwinConfig window_size={config.window_size}; use at least 2.")
        self.config = config
        self.dims = tuple(config.embed_dim * 2**i for i in range(len(config.depths)))
        self.patch_size = config.patch_size
        self.scan_blocks = bool(scan_blocks)
        self.patch_embed_proj = layers.Conv(
            config.in_channels,
            config.embed_dim,
            config.patch_size,
            stride=config.patch_size,
            dtype=dtype,
            rngs=rngs,
        )
        self.patch_embed_norm = layers.layer_norm(config.embed_dim, config.norm_eps, dtype, rngs)
        rates = layers.drop_path_rates(config.drop_path_rate, config.depths)
        stages = []
        for i, (dprs, heads) in enumerate(zip(rates, config.num_heads, strict=True)):
            last = i == len(config.depths) - 1
            stages.append(
                SwinStage(self.dims[i], heads, dprs, not last, config, dtype, rngs, scan_blocks)
            )
        for stage in stages:
            stage.remat = remat
        self.stages = nnx.List(stages)
        self.out_norms = nnx.List(
            [layers.layer_norm(d, config.norm_eps, dtype, rngs) for d in self.dims]
        )

    def __call__(self, images: jax.Array, *, train: bool = False) -> list[jax.Array]:
        """(B, H, W, 3) -> [(B, ceil(H/4), ceil(W/4), C), ..., (B, ~H/32, ~W/32, 8C)]."""
        x = self.patch_embed_norm(self.patch_embed_proj(pad_bottom_right(images, self.patch_size)))
        feats = []
        for stage, norm in zip(self.stages, self.out_norms, strict=True):
            x = stage(x, train=train)
            feats.append(norm(x))
            if stage.downsample is not None:
                x = stage.downsample(x)
        return feats
