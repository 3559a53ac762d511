"""Checkpoint layouts: the known formats, how each is recognized, and which key maps apply."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from cbp_jax.weights import convnext, heads, mit, resnet, swin
from cbp_jax.weights.rules import Rule, invert_rules


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
        mit.HF_MIT_V4,
        heads.HF_SEGFORMER_HEAD,
        (r"^classifier\.(weight|bias)$",),
    ),
    Format(
        "HF transformers SegFormer (5.x names)",
        "mit",
        r"^stages\.\d+\.blocks\.\d+\.attention\.q_proj\.",
        ("segformer.", ""),
        mit.HF_MIT_V5,
        heads.HF_SEGFORMER_HEAD,
        (r"^classifier\.(weight|bias)$",),
    ),
    Format(
        "NVlabs MiT / SegFormer",
        "mit",
        r"^block1\.0\.attn\.kv\.",
        ("backbone.", ""),
        mit.NVLABS_MIT,
        heads.NVLABS_SEGFORMER_HEAD,
        (r"^head\.(weight|bias)$",),
    ),
    Format(
        "mmseg MiT / SegFormer",
        "mit",
        r"^layers\.0\.1\.0\.attn\.attn\.in_proj_weight$",
        ("backbone.", ""),
        mit.MMSEG_MIT,
        heads.MMSEG_SEGFORMER_HEAD,
        (),
    ),
    Format(
        "HF transformers Swin / UperNet",
        "swin",
        r"^embeddings\.patch_embeddings\.projection\.weight$",
        ("swin.", "backbone.", ""),
        swin.HF_SWIN,
        heads.HF_UPERNET_HEADS,
        (r"^(swin\.)?layernorm\.(weight|bias)$", r"^classifier\.(weight|bias)$"),
    ),
    Format(
        "official Swin (microsoft) / Swin-Transformer-Semantic-Segmentation",
        "swin",
        r"^layers\.0\.blocks\.0\.attn\.qkv\.weight$",
        ("backbone.", ""),
        swin.OFFICIAL_SWIN,
        heads.MMSEG_UPERNET_HEADS,
        (r"^norm\.(weight|bias)$", r"^head\.(weight|bias)$", *swin.SWIN_BUFFERS),
    ),
    Format(
        "mmseg Swin",
        "swin",
        r"^stages\.0\.blocks\.0\.attn\.w_msa\.qkv\.weight$",
        ("backbone.", ""),
        swin.MMSEG_SWIN,
        heads.MMSEG_UPERNET_HEADS,
        (r"^norm\.(weight|bias)$", *swin.SWIN_BUFFERS),
    ),
    Format(  # before timm ConvNeXt, whose stem is also stem.0
        "mmcv / mmseg ResNetV1c",
        "resnet",
        r"^stem\.3\.weight$",
        ("backbone.", ""),
        resnet.MMSEG_RESNET_V1C,
        heads.MMSEG_FCN_HEADS,
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
        convnext.HF_CONVNEXT,
        heads.HF_UPERNET_HEADS,
        (r"^layernorm\.(weight|bias)$", r"^classifier\.(weight|bias)$"),
    ),
    Format(
        "timm ConvNeXt",
        "convnext",
        r"^stem\.0\.weight$",
        ("backbone.", "model.", ""),
        convnext.TIMM_CONVNEXT,
        heads.MMSEG_UPERNET_HEADS,
        (r"^head\.(norm|fc)\.(weight|bias)$", r"^norm_pre\."),
    ),
    Format(
        "Facebook / mmpretrain ConvNeXt",
        "convnext",
        r"^downsample_layers\.0\.0\.weight$",
        ("backbone.", ""),
        convnext.FB_CONVNEXT,
        heads.MMSEG_UPERNET_HEADS,
        (r"^norm\.(weight|bias)$", r"^head\.(weight|bias)$"),
    ),
)


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


def detect(keys: Sequence[str], family: str | None) -> tuple[Format, str]:
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


# A SegFormer with the HF head (``head="mlp"``) -> ``SegformerForSemanticSegmentation`` (v4
# names). The classifier rule covers the learned classifier; a CBP classifier's prototypes
# are written by ``cbp_jax.export``.
HF_SEGFORMER_EXPORT = invert_rules(
    mit.HF_MIT_V4, src_prefix="segformer.", dst_prefix="encoder."
) + invert_rules(heads.HF_SEGFORMER_HEAD)


def segmentor_family(name: str) -> str:
    """The encoder family of segmentor ``name``: ``"mit"`` (``segformer_*``), ``"convnext"``
    (``upernet_convnext_*``), ``"swin"`` (``upernet_swin_*``) or ``"resnet"`` (``fcn_*``)."""
    if name.startswith("segformer_"):
        return "mit"
    if name.startswith("fcn_"):
        return "resnet"
    for family in ("convnext", "swin"):
        if name.startswith(f"upernet_{family}_"):
            return family
    raise ValueError(
        f"{name!r} is not a segmentor name (segformer_*, upernet_convnext_*, upernet_swin_*, "
        "fcn_*); see cbp_jax.models.SEGMENTORS."
    )


def _export(encoder: list[Rule], head: list[Rule], **kwargs) -> list[Rule]:
    return invert_rules(encoder, src_prefix="backbone.", dst_prefix="encoder.", **kwargs) + (
        invert_rules(head)
    )


# UperNet (ConvNeXt / Swin backbone) -> ``UperNetForSemanticSegmentation`` (v4 names), by
# encoder family; a CBP classifier's prototypes are written by ``cbp_jax.export``.
HF_UPERNET_EXPORT = {
    "convnext": _export(convnext.HF_CONVNEXT, heads.HF_UPERNET_HEADS),
    "swin": _export(swin.HF_SWIN, heads.HF_UPERNET_HEADS),
}
# Each paper model -> its mmsegmentation 1.x checkpoint layout, by encoder family: mmseg MiT +
# SegformerHead, mmpretrain ConvNeXt (its ``depthwise_conv`` / ``pointwise_conv`` names) +
# UPerHead, mmseg Swin + UPerHead, ResNetV1c + FCNHead; each with the auxiliary FCNHead.
MMSEG_EXPORT = {
    "mit": _export(mit.MMSEG_MIT, heads.MMSEG_SEGFORMER_HEAD),
    "convnext": _export(
        convnext.FB_CONVNEXT,
        heads.MMSEG_UPERNET_HEADS,
        prefer=("depthwise_conv", "pointwise_conv1", "pointwise_conv2"),
    ),
    "swin": _export(swin.MMSEG_SWIN, heads.MMSEG_UPERNET_HEADS),
    "resnet": _export(resnet.MMSEG_RESNET_V1C, heads.MMSEG_FCN_HEADS),
}
