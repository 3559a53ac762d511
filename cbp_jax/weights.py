"""Pretrained checkpoint conversion: PyTorch state dicts -> cbp_jax encoders and segmentors.

``load_pretrained(module, path)`` reads a checkpoint (``.safetensors``, ``.bin``, ``.pth``,
``.pt``, an HF ``save_pretrained`` folder, or a Hugging Face hub id), detects its format
from the keys, maps every tensor with a regex key map (transposing Linear (out, in) ->
(in, out) and conv (O, I, kh, kw) -> (kh, kw, I, O)), checks every shape, and writes the
values into the module's variables. Formats:

- HF transformers SegFormer: ``SegformerModel``, ``SegformerForImageClassification``,
  ``SegformerForSemanticSegmentation`` (v4 names, which transformers 5 still writes, and the
  5.x in-memory names), with or without the ``segformer.`` prefix;
- NVlabs ``mit_b*.pth`` (ImageNet) and NVlabs/mmseg-0.x SegFormer checkpoints;
- mmseg 1.x MiT (``layers.{s}.{0,1,2}``) and its SegformerHead;
- HF ConvNeXt: ``ConvNextModel``, ``ConvNextBackbone``, ``ConvNextForImageClassification``,
  and ``UperNetForSemanticSegmentation`` (ConvNeXt backbone, UperNet + auxiliary heads);
- timm and Facebook ConvNeXt (incl. Facebook's segmentation backbone with ``norm{i}``), and
  mmpretrain's (mmseg UperNet-ConvNeXt checkpoints), with mmseg UPerHead / FCNHead;
- HF Swin: ``SwinModel``, ``SwinBackbone``, ``SwinForImageClassification`` and
  ``UperNetForSemanticSegmentation`` (Swin backbone), v4 names (what transformers 5 writes);
- official Swin (microsoft/Swin-Transformer ImageNet ``.pth``, and the Swin-Transformer-
  Semantic-Segmentation UperNet checkpoints) and mmseg 1.x Swin (``stages.{i}``, ``w_msa``,
  patch merging in ``nn.Unfold`` order, re-ordered here), with mmseg UPerHead / FCNHead;
  ``relative_position_index`` / ``attn_mask`` buffers are constants here and are dropped (a
  window size that differs from the checkpoint's fails on the bias tables' shapes);
- mmcv / mmseg ``ResNetV1c`` (``open-mmlab://resnet101_v1c`` and mmseg FCN checkpoints, with
  the FCN head and auxiliary head). torchvision's ResNet (one 7x7 stem conv) is recognized and
  refused with the reason: its stem cannot become V1c's three 3x3 convs.

Never a silent partial load: a checkpoint tensor that maps to nothing, or a module variable
that gets no value, raises an error listing them. The only variables allowed to stay freshly
initialized are whole parts that the checkpoint legitimately lacks: the decode head, the
classifier, the auxiliary head and classifier, and the ConvNeXt / Swin 4 output norms
(absent from ImageNet checkpoints). A one-screen summary says what was loaded and what is fresh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cbp_jax.models.convnext import ConvNeXt
from cbp_jax.models.mit import MixTransformer
from cbp_jax.models.resnet import ResNetV1c
from cbp_jax.models.segmentor import Segmentor
from cbp_jax.models.swin import SwinTransformer

# Parts of a segmentor that may stay freshly initialized when the checkpoint has none of them.
FRESH_OK = ("head", "classifier", "aux_head", "aux_classifier", "encoder.out_norms")

# ----------------------------------------------------------------------------- transforms


def _linear(w):
    return w.T


def _conv(w):
    return w.transpose(2, 3, 1, 0)


def _conv1x1_as_linear(w):
    return w[:, :, 0, 0].T


def _same(w):
    return w


_UNFOLD_TO_OFFICIAL = [0, 2, 1, 3]  # its own inverse


def _unfold_linear(w):
    """mmseg's PatchMerging Linear (out, 4C), input in ``nn.Unfold`` order (channel-major,
    then the 2x2 offsets row-major) -> (4C, out) in the official order (offset-major:
    (0, 0), (1, 0), (0, 1), (1, 1))."""
    out, four_c = w.shape
    w = w.reshape(out, four_c // 4, 4).transpose(0, 2, 1)[:, _UNFOLD_TO_OFFICIAL, :]
    return w.reshape(out, four_c).T


def _unfold_vector(v):
    """mmseg's PatchMerging LayerNorm (4C,) in ``nn.Unfold`` order -> the official order."""
    return v.reshape(-1, 4).T[_UNFOLD_TO_OFFICIAL].reshape(-1)


def _split(n: int, i: int, fn: Callable) -> Callable:
    def f(w):
        return fn(np.split(w, n, axis=0)[i])

    return f


# ----------------------------------------------------------------------------- key maps

Rule = tuple[re.Pattern, list[tuple[str | Callable, Callable]]]


def _rules(*groups: Iterable[tuple[str, list]]) -> list[Rule]:
    return [(re.compile(src), dst) for g in groups for src, dst in g]


class _minus1:  # noqa: N801 - reads as a function in the rule tables
    """Destination whose first ``{}`` is the first regex group minus 1 (1-based sources)."""

    def __init__(self, template: str):
        self.template = template

    def __add__(self, suffix: str) -> _minus1:
        return _minus1(self.template + suffix)

    def __call__(self, m: re.Match) -> str:
        g = m.groups()
        return self.template.format(int(g[0]) - 1, *g[1:])


def LIN(src, dst):  # noqa: N802
    return [
        (src + r"\.weight", [(dst + ".kernel", _linear)]),
        (src + r"\.bias", [(dst + ".bias", _same)]),
    ]


def LIN1x1(src, dst):  # noqa: N802
    """A 1x1 conv in the checkpoint, a Linear here."""
    return [
        (src + r"\.weight", [(dst + ".kernel", _conv1x1_as_linear)]),
        (src + r"\.bias", [(dst + ".bias", _same)]),
    ]


def CONV(src, dst):  # noqa: N802
    return [
        (src + r"\.weight", [(dst + ".kernel", _conv)]),
        (src + r"\.bias", [(dst + ".bias", _same)]),
    ]


def LN(src, dst):  # noqa: N802
    return [
        (src + r"\.weight", [(dst + ".scale", _same)]),
        (src + r"\.bias", [(dst + ".bias", _same)]),
    ]


def BN(src, dst):  # noqa: N802
    return [
        (src + r"\.weight", [(dst + ".scale", _same)]),
        (src + r"\.bias", [(dst + ".bias", _same)]),
        (src + r"\.running_mean", [(dst + ".mean", _same)]),
        (src + r"\.running_var", [(dst + ".var", _same)]),
        (src + r"\.num_batches_tracked", []),
    ]


def CONVBN(src, dst, conv="conv", bn="bn"):  # noqa: N802
    """mmcv ConvModule (conv without bias + BN) -> ConvBNReLU."""
    return CONV(rf"{src}\.{conv}", dst + ".conv") + BN(rf"{src}\.{bn}", dst + ".bn")


def PARAM(src, dst):  # noqa: N802
    return [(src, [(dst, _same)])]


def _fmt(dst, m):
    return dst(m) if callable(dst) else dst.format(*m.groups())


B = r"(\d+)"

# HF transformers SegFormer encoder, v4 names (also what transformers 5 writes to disk).
HF_MIT_V4 = _rules(
    CONV(rf"encoder\.patch_embeddings\.{B}\.proj", "stages.{}.patch_embed.proj"),
    LN(rf"encoder\.patch_embeddings\.{B}\.layer_norm", "stages.{}.patch_embed.norm"),
    LN(rf"encoder\.block\.{B}\.{B}\.layer_norm_1", "stages.{}.blocks.{}.norm1"),
    LN(rf"encoder\.block\.{B}\.{B}\.layer_norm_2", "stages.{}.blocks.{}.norm2"),
    LIN(rf"encoder\.block\.{B}\.{B}\.attention\.self\.query", "stages.{}.blocks.{}.attn.q"),
    LIN(rf"encoder\.block\.{B}\.{B}\.attention\.self\.key", "stages.{}.blocks.{}.attn.k"),
    LIN(rf"encoder\.block\.{B}\.{B}\.attention\.self\.value", "stages.{}.blocks.{}.attn.v"),
    CONV(rf"encoder\.block\.{B}\.{B}\.attention\.self\.sr", "stages.{}.blocks.{}.attn.sr"),
    LN(
        rf"encoder\.block\.{B}\.{B}\.attention\.self\.layer_norm",
        "stages.{}.blocks.{}.attn.sr_norm",
    ),
    LIN(rf"encoder\.block\.{B}\.{B}\.attention\.output\.dense", "stages.{}.blocks.{}.attn.proj"),
    LIN(rf"encoder\.block\.{B}\.{B}\.mlp\.dense1", "stages.{}.blocks.{}.mlp.fc1"),
    CONV(rf"encoder\.block\.{B}\.{B}\.mlp\.dwconv\.dwconv", "stages.{}.blocks.{}.mlp.dwconv"),
    LIN(rf"encoder\.block\.{B}\.{B}\.mlp\.dense2", "stages.{}.blocks.{}.mlp.fc2"),
    LN(rf"encoder\.layer_norm\.{B}", "stages.{}.norm"),
)
# transformers 5.x in-memory names (a raw ``model.state_dict()``).
HF_MIT_V5 = _rules(
    CONV(rf"stages\.{B}\.patch_embeddings\.proj", "stages.{}.patch_embed.proj"),
    LN(rf"stages\.{B}\.patch_embeddings\.layer_norm", "stages.{}.patch_embed.norm"),
    LN(rf"stages\.{B}\.blocks\.{B}\.layernorm_before", "stages.{}.blocks.{}.norm1"),
    LN(rf"stages\.{B}\.blocks\.{B}\.layernorm_after", "stages.{}.blocks.{}.norm2"),
    LIN(rf"stages\.{B}\.blocks\.{B}\.attention\.q_proj", "stages.{}.blocks.{}.attn.q"),
    LIN(rf"stages\.{B}\.blocks\.{B}\.attention\.k_proj", "stages.{}.blocks.{}.attn.k"),
    LIN(rf"stages\.{B}\.blocks\.{B}\.attention\.v_proj", "stages.{}.blocks.{}.attn.v"),
    CONV(
        rf"stages\.{B}\.blocks\.{B}\.attention\.sequence_reduction\.sequence_reduction",
        "stages.{}.blocks.{}.attn.sr",
    ),
    LN(
        rf"stages\.{B}\.blocks\.{B}\.attention\.sequence_reduction\.layer_norm",
        "stages.{}.blocks.{}.attn.sr_norm",
    ),
    LIN(rf"stages\.{B}\.blocks\.{B}\.attention\.o_proj", "stages.{}.blocks.{}.attn.proj"),
    LIN(rf"stages\.{B}\.blocks\.{B}\.mlp\.fc1", "stages.{}.blocks.{}.mlp.fc1"),
    CONV(rf"stages\.{B}\.blocks\.{B}\.mlp\.dwconv\.dwconv", "stages.{}.blocks.{}.mlp.dwconv"),
    LIN(rf"stages\.{B}\.blocks\.{B}\.mlp\.fc2", "stages.{}.blocks.{}.mlp.fc2"),
    LN(rf"stages\.{B}\.layer_norm", "stages.{}.norm"),
)
HF_SEGFORMER_HEAD = _rules(
    LIN(rf"decode_head\.(?:linear_c|linear_projections)\.{B}\.proj", "head.linear_c.{}"),
    CONV(r"decode_head\.linear_fuse", "head.linear_fuse"),
    BN(r"decode_head\.batch_norm", "head.bn"),
    LIN1x1(r"decode_head\.classifier", "classifier.linear"),
)
# NVlabs mit_b*.pth; NVlabs (mmseg 0.x) SegFormer checkpoints add ``backbone.`` + this head.
NVLABS_MIT = _rules(
    CONV(r"patch_embed(\d)\.proj", _minus1("stages.{}.patch_embed.proj")),
    LN(r"patch_embed(\d)\.norm", _minus1("stages.{}.patch_embed.norm")),
    LN(rf"block(\d)\.{B}\.norm1", _minus1("stages.{}.blocks.{}.norm1")),
    LN(rf"block(\d)\.{B}\.norm2", _minus1("stages.{}.blocks.{}.norm2")),
    LIN(rf"block(\d)\.{B}\.attn\.q", _minus1("stages.{}.blocks.{}.attn.q")),
    [
        (
            rf"block(\d)\.{B}\.attn\.kv\.{p}",
            [
                (_minus1("stages.{}.blocks.{}.attn.k." + n), _split(2, 0, fn)),
                (_minus1("stages.{}.blocks.{}.attn.v." + n), _split(2, 1, fn)),
            ],
        )
        for p, n, fn in (("weight", "kernel", _linear), ("bias", "bias", _same))
    ],
    CONV(rf"block(\d)\.{B}\.attn\.sr", _minus1("stages.{}.blocks.{}.attn.sr")),
    LN(rf"block(\d)\.{B}\.attn\.norm", _minus1("stages.{}.blocks.{}.attn.sr_norm")),
    LIN(rf"block(\d)\.{B}\.attn\.proj", _minus1("stages.{}.blocks.{}.attn.proj")),
    LIN(rf"block(\d)\.{B}\.mlp\.fc1", _minus1("stages.{}.blocks.{}.mlp.fc1")),
    CONV(rf"block(\d)\.{B}\.mlp\.dwconv\.dwconv", _minus1("stages.{}.blocks.{}.mlp.dwconv")),
    LIN(rf"block(\d)\.{B}\.mlp\.fc2", _minus1("stages.{}.blocks.{}.mlp.fc2")),
    LN(r"norm(\d)", _minus1("stages.{}.norm")),
)
NVLABS_SEGFORMER_HEAD = _rules(
    LIN(r"decode_head\.linear_c(\d)\.proj", _minus1("head.linear_c.{}")),
    CONV(r"decode_head\.linear_fuse\.conv", "head.linear_fuse"),
    BN(r"decode_head\.linear_fuse\.bn", "head.bn"),
    LIN1x1(r"decode_head\.linear_pred", "classifier.linear"),
)
MMSEG_MIT = _rules(
    CONV(rf"layers\.{B}\.0\.projection", "stages.{}.patch_embed.proj"),
    LN(rf"layers\.{B}\.0\.norm", "stages.{}.patch_embed.norm"),
    LN(rf"layers\.{B}\.1\.{B}\.norm1", "stages.{}.blocks.{}.norm1"),
    LN(rf"layers\.{B}\.1\.{B}\.norm2", "stages.{}.blocks.{}.norm2"),
    [
        (
            rf"layers\.{B}\.1\.{B}\.attn\.attn\.in_proj_{p}",
            [
                (f"stages.{{}}.blocks.{{}}.attn.{x}.{n}", _split(3, i, fn))
                for i, x in enumerate("qkv")
            ],
        )
        for p, n, fn in (("weight", "kernel", _linear), ("bias", "bias", _same))
    ],
    LIN(rf"layers\.{B}\.1\.{B}\.attn\.attn\.out_proj", "stages.{}.blocks.{}.attn.proj"),
    CONV(rf"layers\.{B}\.1\.{B}\.attn\.sr", "stages.{}.blocks.{}.attn.sr"),
    LN(rf"layers\.{B}\.1\.{B}\.attn\.norm", "stages.{}.blocks.{}.attn.sr_norm"),
    LIN1x1(rf"layers\.{B}\.1\.{B}\.ffn\.layers\.0", "stages.{}.blocks.{}.mlp.fc1"),
    CONV(rf"layers\.{B}\.1\.{B}\.ffn\.layers\.1", "stages.{}.blocks.{}.mlp.dwconv"),
    LIN1x1(rf"layers\.{B}\.1\.{B}\.ffn\.layers\.4", "stages.{}.blocks.{}.mlp.fc2"),
    LN(rf"layers\.{B}\.2", "stages.{}.norm"),
)
MMSEG_SEGFORMER_HEAD = _rules(
    CONVBN(rf"decode_head\.convs\.{B}", "head.convs.{}"),
    CONVBN(r"decode_head\.fusion_conv", "head.fuse"),
    LIN1x1(r"decode_head\.conv_seg", "classifier.linear"),
)
HF_CONVNEXT = _rules(
    CONV(r"embeddings\.patch_embeddings", "stem_conv"),
    LN(r"embeddings\.layernorm", "stem_norm"),
    LN(rf"encoder\.stages\.{B}\.downsampling_layer\.0", "stages.{}.down_norm"),
    CONV(rf"encoder\.stages\.{B}\.downsampling_layer\.1", "stages.{}.down_conv"),
    CONV(rf"encoder\.stages\.{B}\.layers\.{B}\.dwconv", "stages.{}.blocks.{}.dwconv"),
    LN(rf"encoder\.stages\.{B}\.layers\.{B}\.layernorm", "stages.{}.blocks.{}.norm"),
    LIN(rf"encoder\.stages\.{B}\.layers\.{B}\.pwconv1", "stages.{}.blocks.{}.fc1"),
    LIN(rf"encoder\.stages\.{B}\.layers\.{B}\.pwconv2", "stages.{}.blocks.{}.fc2"),
    PARAM(
        rf"encoder\.stages\.{B}\.layers\.{B}\.layer_scale_parameter", "stages.{}.blocks.{}.gamma"
    ),
    LN(r"hidden_states_norms\.stage(\d)", _minus1("out_norms.{}")),
)
TIMM_CONVNEXT = _rules(
    CONV(r"stem\.0", "stem_conv"),
    LN(r"stem\.1", "stem_norm"),
    LN(rf"stages\.{B}\.downsample\.0", "stages.{}.down_norm"),
    CONV(rf"stages\.{B}\.downsample\.1", "stages.{}.down_conv"),
    CONV(rf"stages\.{B}\.blocks\.{B}\.conv_dw", "stages.{}.blocks.{}.dwconv"),
    LN(rf"stages\.{B}\.blocks\.{B}\.norm", "stages.{}.blocks.{}.norm"),
    LIN(rf"stages\.{B}\.blocks\.{B}\.mlp\.fc1", "stages.{}.blocks.{}.fc1"),
    LIN(rf"stages\.{B}\.blocks\.{B}\.mlp\.fc2", "stages.{}.blocks.{}.fc2"),
    PARAM(rf"stages\.{B}\.blocks\.{B}\.gamma", "stages.{}.blocks.{}.gamma"),
)
FB_CONVNEXT = _rules(
    CONV(r"downsample_layers\.0\.0", "stem_conv"),
    LN(r"downsample_layers\.0\.1", "stem_norm"),
    LN(r"downsample_layers\.([1-9])\.0", "stages.{}.down_norm"),
    CONV(r"downsample_layers\.([1-9])\.1", "stages.{}.down_conv"),
    CONV(rf"stages\.{B}\.{B}\.(?:dwconv|depthwise_conv)", "stages.{}.blocks.{}.dwconv"),
    LN(rf"stages\.{B}\.{B}\.norm", "stages.{}.blocks.{}.norm"),
    LIN(rf"stages\.{B}\.{B}\.(?:pwconv1|pointwise_conv1)", "stages.{}.blocks.{}.fc1"),
    LIN(rf"stages\.{B}\.{B}\.(?:pwconv2|pointwise_conv2)", "stages.{}.blocks.{}.fc2"),
    PARAM(rf"stages\.{B}\.{B}\.gamma", "stages.{}.blocks.{}.gamma"),
    LN(r"norm(\d)", "out_norms.{}"),  # segmentation backbones (Facebook, mmpretrain in mmseg)
)


# HF Swin, v4 names (what transformers 5 still writes to disk).
_HB = rf"encoder\.layers\.{B}\.blocks\.{B}\."
HF_SWIN = _rules(
    CONV(r"embeddings\.patch_embeddings\.projection", "patch_embed_proj"),
    LN(r"embeddings\.norm", "patch_embed_norm"),
    LN(_HB + "layernorm_before", "stages.{}.blocks.{}.norm1"),
    LN(_HB + "layernorm_after", "stages.{}.blocks.{}.norm2"),
    LIN(_HB + r"attention\.self\.query", "stages.{}.blocks.{}.attn.q"),
    LIN(_HB + r"attention\.self\.key", "stages.{}.blocks.{}.attn.k"),
    LIN(_HB + r"attention\.self\.value", "stages.{}.blocks.{}.attn.v"),
    LIN(_HB + r"attention\.output\.dense", "stages.{}.blocks.{}.attn.proj"),
    PARAM(
        _HB + r"attention\.self\.relative_position_bias_table",
        "stages.{}.blocks.{}.attn.relative_position_bias_table",
    ),
    LIN(_HB + r"intermediate\.dense", "stages.{}.blocks.{}.mlp.fc1"),
    LIN(_HB + r"output\.dense", "stages.{}.blocks.{}.mlp.fc2"),
    LN(rf"encoder\.layers\.{B}\.downsample\.norm", "stages.{}.downsample.norm"),
    LIN(rf"encoder\.layers\.{B}\.downsample\.reduction", "stages.{}.downsample.reduction"),
    LN(r"hidden_states_norms\.stage(\d)", _minus1("out_norms.{}")),
)


def _qkv(src: str, dst: str) -> list:
    """A fused qkv Linear (3C, C) -> the q, k and v Linears."""
    return [
        (
            rf"{src}\.{p}",
            [(f"{dst}.{x}.{n}", _split(3, i, fn)) for i, x in enumerate("qkv")],
        )
        for p, n, fn in (("weight", "kernel", _linear), ("bias", "bias", _same))
    ]


def _swin_rules(layers: str, proj: str, attn: str, fc1: str, fc2: str, unfold: bool):
    blk = rf"{layers}\.{B}\.blocks\.{B}\."
    dst = "stages.{}.blocks.{}."
    down = rf"{layers}\.{B}\.downsample\."
    merge = (
        [
            (
                down + r"reduction\.weight",
                [("stages.{}.downsample.reduction.kernel", _unfold_linear)],
            ),
            (down + r"norm\.weight", [("stages.{}.downsample.norm.scale", _unfold_vector)]),
            (down + r"norm\.bias", [("stages.{}.downsample.norm.bias", _unfold_vector)]),
        ]
        if unfold
        else LIN(down + "reduction", "stages.{}.downsample.reduction")
        + LN(down + "norm", "stages.{}.downsample.norm")
    )
    return _rules(
        CONV(rf"patch_embed\.{proj}", "patch_embed_proj"),
        LN(r"patch_embed\.norm", "patch_embed_norm"),
        LN(blk + "norm1", dst + "norm1"),
        LN(blk + "norm2", dst + "norm2"),
        _qkv(blk + attn + r"\.qkv", dst + "attn"),
        LIN(blk + attn + r"\.proj", dst + "attn.proj"),
        PARAM(
            blk + attn + r"\.relative_position_bias_table",
            dst + "attn.relative_position_bias_table",
        ),
        LIN(blk + fc1, dst + "mlp.fc1"),
        LIN(blk + fc2, dst + "mlp.fc2"),
        merge,
        LN(r"norm(\d)", "out_norms.{}"),  # segmentation backbones
    )


OFFICIAL_SWIN = _swin_rules("layers", "proj", r"attn", r"mlp\.fc1", r"mlp\.fc2", unfold=False)
MMSEG_SWIN = _swin_rules(
    "stages", "projection", r"attn\.w_msa", r"ffn\.layers\.0\.0", r"ffn\.layers\.1", unfold=True
)
_SWIN_BUFFERS = (r"\.relative_position_index$", r"\.attn_mask$")

# mmcv / mmseg ResNetV1c: stem.{0,3,6} convs and stem.{1,4,7} BNs; layer{1..4}.{j}.
MMSEG_RESNET_V1C = _rules(
    *(CONV(rf"stem\.{3 * i}", f"stem.{i}.conv") for i in range(3)),
    *(BN(rf"stem\.{3 * i + 1}", f"stem.{i}.bn") for i in range(3)),
    CONV(rf"layer(\d)\.{B}\.conv(\d)", _minus1("stages.{}.{}.conv{}.conv")),
    BN(rf"layer(\d)\.{B}\.bn(\d)", _minus1("stages.{}.{}.conv{}.bn")),
    CONV(rf"layer(\d)\.{B}\.downsample\.0", _minus1("stages.{}.{}.downsample.conv")),
    BN(rf"layer(\d)\.{B}\.downsample\.1", _minus1("stages.{}.{}.downsample.bn")),
)


def _uper_rules(conv: str, bn: str, cls: str) -> list[Rule]:
    cb = dict(conv=conv, bn=bn)
    return _rules(
        CONVBN(rf"decode_head\.psp_modules\.{B}\.1", "head.psp.{}", **cb),
        CONVBN(r"decode_head\.bottleneck", "head.bottleneck", **cb),
        CONVBN(rf"decode_head\.lateral_convs\.{B}", "head.lateral.{}", **cb),
        CONVBN(rf"decode_head\.fpn_convs\.{B}", "head.fpn.{}", **cb),
        CONVBN(r"decode_head\.fpn_bottleneck", "head.fpn_bottleneck", **cb),
        LIN1x1(rf"decode_head\.{cls}", "classifier.linear"),
        CONVBN(rf"auxiliary_head\.convs\.{B}", "aux_head.convs.{}", **cb),
        CONVBN(r"auxiliary_head\.conv_cat", "aux_head.conv_cat", **cb),
        LIN1x1(rf"auxiliary_head\.{cls}", "aux_classifier.linear"),
    )


MMSEG_UPERNET_HEADS = _uper_rules("conv", "bn", "conv_seg")
HF_UPERNET_HEADS = _uper_rules("conv", "batch_norm", "classifier")
# mmseg FCNHead as the decode head (convs, conv_cat) + the auxiliary FCN head.
MMSEG_FCN_HEADS = _rules(
    CONVBN(rf"decode_head\.convs\.{B}", "head.convs.{}"),
    CONVBN(r"decode_head\.conv_cat", "head.conv_cat"),
    LIN1x1(r"decode_head\.conv_seg", "classifier.linear"),
    CONVBN(rf"auxiliary_head\.convs\.{B}", "aux_head.convs.{}"),
    CONVBN(r"auxiliary_head\.conv_cat", "aux_head.conv_cat"),
    LIN1x1(r"auxiliary_head\.conv_seg", "aux_classifier.linear"),
)


@dataclasses.dataclass(frozen=True)
class Format:
    """A checkpoint layout: how to recognize it and how to map it."""

    name: str
    family: str  # "mit" | "convnext" | "swin" | "resnet" | "resnet_7x7_stem" (refused)
    marker: str  # regex searched in the (prefix-stripped) encoder keys
    encoder_prefixes: tuple[str, ...]  # tried in order; stripped from encoder keys
    encoder_rules: list[Rule]
    head_rules: list[Rule]
    ignorable: tuple[str, ...]  # regexes of source keys that are legitimately dropped


FORMATS = (
    Format(
        "HF transformers SegFormer (v4 names)",
        "mit",
        r"^encoder\.block\.\d+\.\d+\.",
        ("segformer.", ""),
        HF_MIT_V4,
        HF_SEGFORMER_HEAD,
        (r"^classifier\.(weight|bias)$",),
    ),
    Format(
        "HF transformers SegFormer (5.x names)",
        "mit",
        r"^stages\.\d+\.blocks\.\d+\.attention\.q_proj\.",
        ("segformer.", ""),
        HF_MIT_V5,
        HF_SEGFORMER_HEAD,
        (r"^classifier\.(weight|bias)$",),
    ),
    Format(
        "NVlabs MiT / SegFormer",
        "mit",
        r"^block1\.0\.attn\.kv\.",
        ("backbone.", ""),
        NVLABS_MIT,
        NVLABS_SEGFORMER_HEAD,
        (r"^head\.(weight|bias)$",),
    ),
    Format(
        "mmseg MiT / SegFormer",
        "mit",
        r"^layers\.0\.1\.0\.attn\.attn\.in_proj_weight$",
        ("backbone.", ""),
        MMSEG_MIT,
        MMSEG_SEGFORMER_HEAD,
        (),
    ),
    Format(
        "HF transformers Swin / UperNet",
        "swin",
        r"^embeddings\.patch_embeddings\.projection\.weight$",
        ("swin.", "backbone.", ""),
        HF_SWIN,
        HF_UPERNET_HEADS,
        (r"^(swin\.)?layernorm\.(weight|bias)$", r"^classifier\.(weight|bias)$"),
    ),
    Format(
        "official Swin (microsoft) / Swin-Transformer-Semantic-Segmentation",
        "swin",
        r"^layers\.0\.blocks\.0\.attn\.qkv\.weight$",
        ("backbone.", ""),
        OFFICIAL_SWIN,
        MMSEG_UPERNET_HEADS,
        (r"^norm\.(weight|bias)$", r"^head\.(weight|bias)$", *_SWIN_BUFFERS),
    ),
    Format(
        "mmseg Swin",
        "swin",
        r"^stages\.0\.blocks\.0\.attn\.w_msa\.qkv\.weight$",
        ("backbone.", ""),
        MMSEG_SWIN,
        MMSEG_UPERNET_HEADS,
        (r"^norm\.(weight|bias)$", *_SWIN_BUFFERS),
    ),
    Format(  # before timm ConvNeXt, whose stem is also stem.0
        "mmcv / mmseg ResNetV1c",
        "resnet",
        r"^stem\.3\.weight$",
        ("backbone.", ""),
        MMSEG_RESNET_V1C,
        MMSEG_FCN_HEADS,
        (r"^fc\.(weight|bias)$",),
    ),
    Format(  # recognized only to be refused with the reason (see _detect)
        "torchvision / mmseg ResNetV1b ResNet (one 7x7 stem conv)",
        "resnet_7x7_stem",
        r"^conv1\.weight$",
        ("backbone.", ""),
        [],
        [],
        (),
    ),
    Format(
        "HF transformers ConvNeXt / UperNet",
        "convnext",
        r"^embeddings\.patch_embeddings\.weight$",
        ("convnext.", "backbone.", ""),
        HF_CONVNEXT,
        HF_UPERNET_HEADS,
        (r"^layernorm\.(weight|bias)$", r"^classifier\.(weight|bias)$"),
    ),
    Format(
        "timm ConvNeXt",
        "convnext",
        r"^stem\.0\.weight$",
        ("backbone.", "model.", ""),
        TIMM_CONVNEXT,
        MMSEG_UPERNET_HEADS,
        (r"^head\.(norm|fc)\.(weight|bias)$", r"^norm_pre\."),
    ),
    Format(
        "Facebook / mmpretrain ConvNeXt",
        "convnext",
        r"^downsample_layers\.0\.0\.weight$",
        ("backbone.", ""),
        FB_CONVNEXT,
        MMSEG_UPERNET_HEADS,
        (r"^norm\.(weight|bias)$", r"^head\.(weight|bias)$"),
    ),
)

# ----------------------------------------------------------------------------- inverse maps

# Our layout -> PyTorch's, for each forward transform (an export writes these).
_INVERSE: dict[Callable, Callable] = {
    _linear: lambda w: w.T,  # (in, out) -> (out, in)
    _conv: lambda w: w.transpose(3, 2, 0, 1),  # (kh, kw, I, O) -> (O, I, kh, kw)
    _conv1x1_as_linear: lambda w: w.T[:, :, None, None],  # (in, out) -> (out, in, 1, 1)
    _same: _same,
}


def _template(pattern: str) -> str:
    """A forward rule's source regex as a format string: ``(\\d+)`` -> ``{}``, ``\\.`` -> ``.``,
    an alternation ``(?:a|b)`` -> its first name ``a`` (the v4 names transformers writes)."""
    t = re.sub(r"\(\?:([^|()]*)(?:\|[^()]*)?\)", r"\1", pattern)
    t = t.replace(r"(\d+)", "{}").replace("\\.", ".")
    if re.search(r"[\\()\[\]|?*+^$]", t):
        raise ValueError(f"the key rule {pattern!r} has no inverse here (only (\\d+) groups).")
    return t


def invert_rules(rules: list[Rule], *, src_prefix: str = "", dst_prefix: str = "") -> list[Rule]:
    """The inverse of a key map: our variable names -> checkpoint keys and layouts.

    Each forward rule ``checkpoint regex -> [(our name template, transform)]`` becomes
    ``our name regex -> [(checkpoint key template, inverse transform)]``; rules that write
    nothing (``num_batches_tracked``) are left out.

    Args:
      rules: a forward table such as ``HF_MIT_V4``.
      src_prefix: prepended to the checkpoint keys (e.g. ``"segformer."``).
      dst_prefix: prepended to our names (e.g. ``"encoder."`` for a segmentor's encoder).
    """
    out = []
    for pat, dsts in rules:
        if not dsts:
            continue
        if len(dsts) != 1 or callable(dsts[0][0]):
            raise ValueError(f"the key rule {pat.pattern!r} has no one-to-one inverse.")
        dst, fn = dsts[0]
        ours = r"(\d+)".join(re.escape(part) for part in (dst_prefix + dst).split("{}"))
        out.append((re.compile(ours), [(src_prefix + _template(pat.pattern), _INVERSE[fn])]))
    return out


# A SegFormer with the HF head (``head="mlp"``) -> ``SegformerForSemanticSegmentation`` (v4
# names). The classifier rule covers the learned classifier; a CBP classifier's prototypes
# are written by ``cbp_jax.export``.
HF_SEGFORMER_EXPORT = invert_rules(
    HF_MIT_V4, src_prefix="segformer.", dst_prefix="encoder."
) + invert_rules(HF_SEGFORMER_HEAD)


def export_state_dict(module: nnx.Module, rules: list[Rule]) -> dict[str, np.ndarray]:
    """``{checkpoint key: array}`` of every ``Param`` / ``BatchStat`` of ``module`` by the
    inverse ``rules``; a variable that no rule maps is an error listing them."""
    out, unmapped = {}, []
    for name, var in _targets(module).items():
        mapped = _match(rules, name)
        if mapped is None:
            unmapped.append(name)
            continue
        for key, fn in mapped:
            out[key] = np.ascontiguousarray(fn(np.asarray(var[...], np.float32)))
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} variables have no key in the export layout (another "
            "architecture?): " + ", ".join(unmapped[:12]) + (" ..." if len(unmapped) > 12 else "")
        )
    return out


# ----------------------------------------------------------------------------- reading


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _hub_id(path: str) -> bool:
    """'owner/name' that is not a local path; 'weights/x.pth' is a (missing) file, not an id."""
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path))
        and not path.endswith(CHECKPOINT_SUFFIXES)
        and not os.path.exists(path)
    )


def _download(repo_id: str) -> str:
    try:
        import huggingface_hub
    except ImportError as e:  # pragma: no cover - huggingface_hub ships with transformers
        raise RuntimeError(
            f"{repo_id!r} looks like a Hugging Face hub id but huggingface_hub is not installed: "
            "`pip install huggingface_hub`, or pass the path of a local checkpoint file."
        ) from e
    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return huggingface_hub.hf_hub_download(repo_id, filename)
        except Exception as e:  # noqa: BLE001 - reported below, with the fix
            errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            if type(e).__name__ not in ("RemoteEntryNotFoundError", "EntryNotFoundError"):
                break  # offline, or no such repo: the second file would fail the same way
    raise RuntimeError(
        f"Could not download {repo_id!r} from the Hugging Face hub (offline, or no such repo?).\n  "
        + "\n  ".join(errors)
        + f"\nFix: on a machine with network, download model.safetensors (or pytorch_model.bin) "
        f"from https://huggingface.co/{repo_id} (e.g. `huggingface-cli download {repo_id} "
        "model.safetensors`), copy it here and pass its local path: "
        "load_pretrained(model, '/path/to/model.safetensors')."
    )


def _torch_load(path: str, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise RuntimeError(
            f"Reading {path!r} (a PyTorch pickle) needs torch: `pip install torch` (the CPU wheel "
            "is enough), or convert the file to .safetensors elsewhere."
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as e:
        if not trust_pickle and "Unsupported global" in str(e):  # a real pickle, with objects
            raise ValueError(
                f"{path!r} pickles objects other than tensors (e.g. mmengine training "
                "metadata), which torch.load(weights_only=True) refuses. If you trust the "
                "file, pass trust_pickle=True (in a run: --config.trust_pickle=True; it runs "
                "the file's pickle code), or re-save only its state_dict."
            ) from e
        raise ValueError(
            f"{path!r} is not a valid PyTorch checkpoint (torch.load: "
            f"{_first_line(e)}). Is it truncated or another kind of file? Download it again "
            "or pass another file."
        ) from e
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a {type(obj).__name__}, not a state dict.")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).numpy()
    return out


def _first_line(error: Exception) -> str:
    """The first line of ``error``'s message that is not torch's generic weights_only advice."""
    generic = ("weights_only", "Weights only load failed", "Check the documentation")
    lines = [x.strip() for x in str(error).splitlines() if x.strip()]
    detail = [x for x in lines if not any(g in x for g in generic)]
    return (detail or [type(error).__name__])[0][:200]


def _safetensors_load(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError

    try:
        return _safetensors_read(path)
    except SafetensorError as e:
        raise ValueError(
            f"{path!r} is not a valid safetensors file ({e}); it may be truncated. Download "
            "it again or pass another file."
        ) from e


def _safetensors_read(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="np") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                out[k] = f.get_tensor(k)
    except (TypeError, ValueError):  # bfloat16 has no NumPy dtype: go through torch
        import torch
        from safetensors.torch import load_file

        out = {k: v.to(torch.float32).numpy() for k, v in load_file(path).items()}
    return out


def read_state_dict(
    path: str | os.PathLike, *, trust_pickle: bool = False
) -> tuple[dict[str, np.ndarray], str]:
    """Reads a checkpoint into NumPy arrays; returns (state dict, resolved file path).

    Accepts a ``.safetensors`` / ``.bin`` / ``.pth`` / ``.pt`` file, an HF ``save_pretrained``
    folder (``model.safetensors``, sharded safetensors, or ``pytorch_model.bin``) or a hub id.
    """
    path = os.fspath(path)
    if _hub_id(path):
        path = _download(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(
                f"{path!r} is a folder without model.safetensors, model.safetensors.index.json "
                "or pytorch_model.bin; pass the checkpoint file itself."
            )
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Checkpoint {path!r} does not exist (pass a file, an HF folder, or a hub id like "
            "'nvidia/mit-b0')."
        )
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            sd.update(_safetensors_load(os.path.join(os.path.dirname(path), shard)))
        return sd, path
    if path.endswith(".safetensors"):
        return _safetensors_load(path), path
    return _torch_load(path, trust_pickle), path


# ----------------------------------------------------------------------------- mapping


def _targets(module: nnx.Module) -> dict[str, nnx.Variable]:
    """Flat 'a.b.0.c' -> Variable for every Param and BatchStat of the module."""
    out = {}
    for path, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param | nnx.BatchStat):
            out[".".join(str(p) for p in path)] = node
    return out


_FAMILY_NAMES = {
    "mit": "MiT (SegFormer)",
    "convnext": "ConvNeXt",
    "swin": "Swin",
    "resnet": "ResNetV1c",
}
_FAMILY_EXAMPLES = (
    "create('segformer_b2', ...) for MiT, create('upernet_convnext_base', ...) for ConvNeXt, "
    "create('upernet_swin_base', ...) for Swin, create('fcn_resnet101_d8', ...) for ResNetV1c"
)


def _family(encoder: nnx.Module) -> str:
    for cls, family in (
        (MixTransformer, "mit"),
        (ConvNeXt, "convnext"),
        (SwinTransformer, "swin"),
        (ResNetV1c, "resnet"),
    ):
        if isinstance(encoder, cls):
            return family
    raise TypeError(
        "load_pretrained takes a MixTransformer, ConvNeXt, SwinTransformer, ResNetV1c or "
        f"Segmentor, not {type(encoder).__name__}."
    )


def _detect(keys: Sequence[str], family: str | None) -> tuple[Format, str]:
    for fmt in FORMATS:
        for prefix in fmt.encoder_prefixes:
            pat = re.compile(fmt.marker)
            if any(k.startswith(prefix) and pat.search(k[len(prefix) :]) for k in keys):
                if fmt.family == "resnet_7x7_stem":
                    raise ValueError(
                        f"The checkpoint is a {fmt.name}: its stem is one 7x7 conv (conv1, "
                        "bn1), while ResNetV1c (mmseg's FCN backbone) has a deep stem of three "
                        "3x3 convs (stem.0/3/6); no conversion turns one into the other. Use "
                        "the ResNetV1c ImageNet weights mmseg's FCN configs start from (mmcv's "
                        "open-mmlab://resnet101_v1c, resnet101_v1c-e67eebb6.pth, or "
                        "resnet50_v1c) or an mmseg FCN checkpoint."
                    )
                if family is not None and fmt.family != family:
                    raise ValueError(
                        f"The checkpoint is {fmt.name}, but the module's encoder is "
                        f"{_FAMILY_NAMES[family]}: build the matching model (e.g. "
                        f"{_FAMILY_EXAMPLES})."
                    )
                return fmt, prefix
    sample = ", ".join(sorted(keys)[:8])
    raise ValueError(
        f"Unrecognized checkpoint layout (first keys: {sample}). Known formats: "
        + "; ".join(f.name for f in FORMATS)
        + ". If it is one of these with an extra prefix, strip the prefix first."
    )


def _match(rules: list[Rule], key: str):
    for pat, dsts in rules:
        m = pat.fullmatch(key)
        if m:
            return [(_fmt(dst, m), fn) for dst, fn in dsts]
    return None


@dataclasses.dataclass
class LoadReport:
    """What ``load_pretrained`` did."""

    path: str
    format: str
    loaded: list[str]  # module variables that received a value
    num_values: int  # scalars written
    fresh: dict[str, int]  # part -> number of variables left as initialized
    dropped: list[str]  # checkpoint keys intentionally not used
    skipped_parts: dict[str, int]  # checkpoint part -> tensors skipped (module lacks it)

    def summary(self) -> str:
        lines = [f"load_pretrained: {self.path}", f"  format: {self.format}"]
        lines.append(
            f"  loaded: {len(self.loaded)} variables, {self.num_values / 1e6:.2f} M values"
        )
        if self.fresh:
            parts = ", ".join(f"{k} ({n})" for k, n in self.fresh.items())
            lines.append(f"  freshly initialized (not in the checkpoint): {parts}")
        else:
            lines.append("  freshly initialized: nothing")
        if self.skipped_parts:
            parts = ", ".join(f"{k} ({n} tensors)" for k, n in self.skipped_parts.items())
            lines.append(f"  checkpoint parts the module does not have, skipped: {parts}")
        if self.dropped:
            shown = ", ".join(self.dropped[:6]) + (" ..." if len(self.dropped) > 6 else "")
            lines.append(f"  checkpoint keys not used by design ({len(self.dropped)}): {shown}")
        return "\n".join(lines)


def _part(target: str, is_segmentor: bool) -> str:
    if not is_segmentor:
        return "encoder.out_norms" if target.startswith("out_norms.") else "encoder"
    if target.startswith("encoder.out_norms."):
        return "encoder.out_norms"
    return target.split(".", 1)[0]


def load_pretrained(
    module: nnx.Module,
    path: str | os.PathLike,
    *,
    ignore: Sequence[str] = (),
    verbose: bool = True,
    trust_pickle: bool = False,
) -> LoadReport:
    """Loads a PyTorch checkpoint into an encoder or a segmentor, in place.

    Args:
      module: a ``MixTransformer`` / ``ConvNeXt`` / ``SwinTransformer`` / ``ResNetV1c``
        encoder or a ``Segmentor``.
      path: a checkpoint file, an HF ``save_pretrained`` folder, or a hub id.
      ignore: regexes (``re.search``) of checkpoint keys to drop on purpose (e.g.
        ``[r"^decode_head\\.classifier"]`` to keep a fresh CBP classifier of another width).
      verbose: print the one-screen summary.
      trust_pickle: allow PyTorch pickles with non-tensor objects (``weights_only=False``);
        only for files you trust.

    Returns:
      A :class:`LoadReport`.

    Raises:
      ValueError: unknown layout, a family mismatch, a shape mismatch, checkpoint tensors
        that map to nothing, or module variables left without a value outside the parts
        allowed to be fresh (decode head, classifier, auxiliary head, ConvNeXt / Swin output
        norms); a torchvision ResNet for a ResNetV1c (the stems differ).
    """
    if isinstance(module, Segmentor):
        encoder, enc_prefix, is_seg = module.encoder, "encoder.", True
    else:
        encoder, enc_prefix, is_seg = module, "", False
    family = _family(encoder)
    sd, resolved = read_state_dict(path, trust_pickle=trust_pickle)
    fmt, prefix = _detect(list(sd), family)
    targets = _targets(module)
    ignore_pats = [re.compile(p) for p in ignore]

    values: dict[str, np.ndarray] = {}
    unexpected, dropped, mismatched = [], [], []
    no_target: dict[str, list[str]] = {}
    for key, arr in sd.items():
        if any(p.search(key) for p in ignore_pats):
            dropped.append(key)
            continue
        head_key = key[len("segformer.") :] if key.startswith("segformer.") else key
        enc_key = key[len(prefix) :] if key.startswith(prefix) else None
        mapped = _match(fmt.encoder_rules, enc_key) if enc_key is not None else None
        dst_prefix, is_head = enc_prefix, False
        if mapped is None:
            mapped = _match(fmt.head_rules, head_key)
            dst_prefix, is_head = "", True
        if mapped is None:
            if any(re.search(p, enc_key if enc_key is not None else key) for p in fmt.ignorable):
                dropped.append(key)
            else:
                unexpected.append(key)
            continue
        if not mapped:  # e.g. num_batches_tracked
            dropped.append(key)
            continue
        for dst, fn in mapped:
            dst = dst_prefix + dst
            if is_head and not is_seg:
                no_target.setdefault(dst.split(".", 1)[0], []).append(key)
                continue
            if dst not in targets:
                no_target.setdefault("?", []).append(f"{key} -> {dst}")
                continue
            val = fn(arr)
            want = tuple(targets[dst][...].shape)
            if tuple(val.shape) != want:
                mismatched.append(f"{key} {tuple(arr.shape)} -> {dst} {tuple(val.shape)} != {want}")
                continue
            values[dst] = val

    problems = []
    if unexpected:
        problems.append(
            f"{len(unexpected)} checkpoint keys match no rule of {fmt.name}: "
            + ", ".join(sorted(unexpected)[:20])
            + (" ..." if len(unexpected) > 20 else "")
        )
    if "?" in no_target:
        items = no_target.pop("?")
        problems.append(
            f"{len(items)} checkpoint tensors map to variables this module does not have "
            "(another architecture/width, or a CBP classifier where the checkpoint has a "
            "learned one; pass ignore=[...] to drop them on purpose): "
            + ", ".join(items[:12])
            + (" ..." if len(items) > 12 else "")
        )
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatches (checkpoint of another variant?): "
            + "; ".join(mismatched[:12])
            + (" ..." if len(mismatched) > 12 else "")
        )
    missing = [t for t in targets if t not in values]
    loaded_parts = {_part(t, is_seg) for t in values}
    fresh: dict[str, int] = {}
    bad_missing = []
    for t in missing:
        part = _part(t, is_seg)
        if part in FRESH_OK and part not in loaded_parts:
            fresh[part] = fresh.get(part, 0) + 1
        else:
            bad_missing.append(t)
    if bad_missing:
        problems.append(
            f"{len(bad_missing)} module variables get no value from the checkpoint: "
            + ", ".join(bad_missing[:20])
            + (" ..." if len(bad_missing) > 20 else "")
        )
    if problems:
        raise ValueError(
            f"load_pretrained({resolved!r}) as {fmt.name} (prefix {prefix!r}) failed; nothing "
            "was written.\n- " + "\n- ".join(problems)
        )

    for dst, val in values.items():
        var = targets[dst]
        var[...] = jnp.asarray(val, dtype=var[...].dtype)
    report = LoadReport(
        path=resolved,
        format=f"{fmt.name}" + (f", prefix {prefix!r}" if prefix else ""),
        loaded=sorted(values),
        num_values=int(sum(v.size for v in values.values())),
        fresh=fresh,
        dropped=sorted(dropped),
        skipped_parts={k: len(v) for k, v in no_target.items()},
    )
    if verbose:
        print(report.summary())
    return report
