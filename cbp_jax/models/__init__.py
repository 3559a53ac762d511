"""Encoders, decode heads and segmentors, and the registry that builds them by name.

    encoder = create_encoder("mit_b2", rngs=nnx.Rngs(0))            # images -> 4 maps
    model = create("segformer_b2", num_classes=150, rngs=nnx.Rngs(0))
    out = model(images, train=True)   # {"logits", "features"[, "aux_logits"]}

Encoder names: ``mit_b0`` .. ``mit_b5``, ``convnext_tiny|small|base|large``,
``swin_tiny|small|base|large``, ``resnet50_v1c``, ``resnet101_v1c``.
Segmentor names: ``segformer_b0`` .. ``segformer_b5``, ``upernet_convnext_tiny|small|base|large``,
``upernet_swin_tiny|small|base|large``, ``fcn_resnet50_d8``, ``fcn_resnet101_d8``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from cbp_jax.classifier import CBPClassifier, LinearClassifier
from cbp_jax.models.convnext import CONVNEXT_VARIANTS, ConvNeXt, ConvNeXtConfig
from cbp_jax.models.heads import FCNHead, SegFormerHead, SegFormerMLPHead, UperNetHead
from cbp_jax.models.mit import MIT_VARIANTS, MiTConfig, MixTransformer
from cbp_jax.models.resnet import RESNET_VARIANTS, ResNetConfig, ResNetV1c
from cbp_jax.models.segmentor import Segmentor
from cbp_jax.models.swin import SWIN_VARIANTS, SwinConfig, SwinTransformer

__all__ = [
    "ConvNeXt",
    "ConvNeXtConfig",
    "FCNHead",
    "MiTConfig",
    "MixTransformer",
    "ResNetConfig",
    "ResNetV1c",
    "SegFormerHead",
    "SegFormerMLPHead",
    "Segmentor",
    "SwinConfig",
    "SwinTransformer",
    "UperNetHead",
    "create",
    "create_encoder",
    "ENCODERS",
    "SEGMENTORS",
]

# family: (encoder class, config class, variants, constructor keywords besides the config)
_FAMILIES = {
    "mit": (MixTransformer, MiTConfig, MIT_VARIANTS, ("dtype", "dwconv_impl", "remat")),
    "convnext": (ConvNeXt, ConvNeXtConfig, CONVNEXT_VARIANTS, ("dtype", "dwconv_impl", "remat")),
    "swin": (SwinTransformer, SwinConfig, SWIN_VARIANTS, ("dtype", "remat")),
    "resnet": (ResNetV1c, ResNetConfig, RESNET_VARIANTS, ("dtype", "remat")),
}
ENCODERS = tuple(name for family in _FAMILIES.values() for name in family[2])
SEGMENTORS = (
    tuple(f"segformer_b{i}" for i in range(6))
    + tuple(f"upernet_{n}" for n in CONVNEXT_VARIANTS)
    + tuple(f"upernet_{n}" for n in SWIN_VARIANTS)
    + tuple(f"fcn_{n.removesuffix('_v1c')}_d8" for n in RESNET_VARIANTS)
)
Encoder = MixTransformer | ConvNeXt | SwinTransformer | ResNetV1c


def _unknown(kind: str, name: str, bad, valid) -> ValueError:
    return ValueError(
        f"Unknown {kind} override(s) {sorted(bad)} for {name!r}. Valid: {sorted(valid)}."
    )


def create_encoder(name: str, *, rngs: nnx.Rngs, **overrides: Any) -> Encoder:
    """Builds an encoder by name; images (B, H, W, 3) -> 4 maps [(B, H/4, W/4, C1), ...].

    Args:
      name: ``mit_b0`` .. ``mit_b5``, ``convnext_tiny|small|base|large``,
        ``swin_tiny|small|base|large`` or ``resnet50_v1c`` / ``resnet101_v1c``.
      rngs: parameter init and the 'dropout' stream (stochastic depth).
      **overrides: ``dtype`` (compute dtype), ``dwconv_impl`` ('auto' | 'xla' | 'shifted';
        MiT and ConvNeXt), ``remat`` (recompute block activations in the backward pass),
        or any field of :class:`MiTConfig` / :class:`ConvNeXtConfig` /
        :class:`SwinConfig` / :class:`ResNetConfig` (e.g. ``drop_path_rate``, ``depths``,
        ``window_size``, ``dilations``).
    """
    family = next((f for f in _FAMILIES.values() if name in f[2]), None)
    if family is None:
        raise ValueError(f"Unknown encoder {name!r}. Known: {', '.join(ENCODERS)}.")
    cls, cfg_cls, variants, kwarg_names = family
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    bad = set(overrides) - fields - set(kwarg_names)
    if bad:
        raise _unknown("encoder", name, bad, fields | set(kwarg_names))
    cfg_over = {k: v for k, v in overrides.items() if k in fields}
    for k, v in cfg_over.items():
        if isinstance(v, list):
            cfg_over[k] = tuple(v)
    config = cfg_cls(**{**variants[name], **cfg_over})
    kwargs = {k: overrides[k] for k in kwarg_names if k in overrides}
    return cls(config, rngs=rngs, **kwargs)


_SEG_DEFAULTS = dict(
    classifier="cbp",  # "cbp" | "linear"
    cbp_length=1.0,
    cbp_update="frozen",
    cbp_init="equal_ortho",
    cbp_normalize_features=False,
    cbp_allow_non_orthogonal=False,
    cbp_ema_momentum=0.99,
    cbp_penalty_weight=0.01,
    head=None,  # segformer: "mmseg" (default) | "mlp"; upernet: "upernet"; fcn: "fcn"
    head_width=None,  # None: the variant's default
    dropout=0.1,
    aux=None,  # auxiliary FCN head on stage 3; None: True for UperNet and FCN
    aux_width=256,
    aux_num_convs=1,
    aux_concat_input=False,
)


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, **overrides: Any) -> Segmentor:
    """Builds a segmentor by name: ``model(images, train=bool)`` -> dict (see ``segmentor``).

    Args:
      name: ``segformer_b0`` .. ``segformer_b5``, ``upernet_convnext_tiny|small|base|large``,
        ``upernet_swin_tiny|small|base|large``, ``fcn_resnet50_d8`` or ``fcn_resnet101_d8``.
      num_classes: N.
      rngs: parameter init (and the CBP prototypes' key) and the 'dropout' stream.
      **overrides:
        ``classifier``: 'cbp' (default, frozen Category-Basis Prototypes) or 'linear'.
        ``cbp_length`` (1.0), ``cbp_update`` ('frozen'), ``cbp_init`` ('equal_ortho'),
        ``cbp_normalize_features`` (False), ``cbp_allow_non_orthogonal`` (False),
        ``cbp_ema_momentum`` (0.99, update 'ema'), ``cbp_penalty_weight`` (0.01, 'penalty').
        ``head``: SegFormer 'mmseg' (mmseg 1.x conv+BN+ReLU head, the paper's; default) or
        'mlp' (original / HF Linear head, for HF-trained checkpoints).
        UperNet models take 'upernet', FCN models 'fcn' (mmseg FCNHead on stage 4: two 3x3
        ConvModules, concat of the input + a 3x3 ConvModule).
        ``head_width``: decoder width D (SegFormer 'mmseg' 256; 'mlp' 256 for B0/B1 and 768
        for B2-B5; UperNet 512; FCN 512).
        ``dropout`` (0.1) before the classifier; ``aux`` (UperNet, FCN: True), ``aux_width`` (256),
        ``aux_num_convs`` (1), ``aux_concat_input`` (False): the auxiliary FCN head on stage 3.
        Anything else goes to :func:`create_encoder` (``dtype``, ``dwconv_impl``,
        ``drop_path_rate``, ``norm_eps``, ...).
    """
    if name not in SEGMENTORS:
        raise ValueError(f"Unknown segmentor {name!r}. Known: {', '.join(SEGMENTORS)}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}; pass a positive int (150 for ADE20K).")
    seg = {k: overrides.pop(k, v) for k, v in _SEG_DEFAULTS.items()}
    family = name.split("_", 1)[0]  # "segformer" | "upernet" | "fcn"
    heads = {"segformer": ("mmseg", "mlp"), "upernet": ("upernet",), "fcn": ("fcn",)}[family]
    if seg["head"] is not None and seg["head"] not in heads:
        raise ValueError(f"head={seg['head']!r} for {name!r}; use one of {heads}.")
    if seg["classifier"] not in ("cbp", "linear"):
        raise ValueError(f"classifier={seg['classifier']!r}; use 'cbp' or 'linear'.")
    dtype = overrides.get("dtype")
    if family == "segformer":
        variant = name.removeprefix("segformer_")
        encoder = create_encoder(f"mit_{variant}", rngs=rngs, **overrides)
        head_kind = seg["head"] or "mmseg"
        if head_kind == "mmseg":
            width = seg["head_width"] or 256
            head = SegFormerHead(
                encoder.dims, width, dropout=seg["dropout"], dtype=dtype, rngs=rngs
            )
        elif head_kind == "mlp":
            width = seg["head_width"] or (256 if variant in ("b0", "b1") else 768)
            head = SegFormerMLPHead(
                encoder.dims, width, dropout=seg["dropout"], dtype=dtype, rngs=rngs
            )
        else:
            raise ValueError(f"head={head_kind!r} for {name!r}; use 'mmseg' or 'mlp'.")
        use_aux = bool(seg["aux"])
    elif family == "upernet":
        encoder = create_encoder(name.removeprefix("upernet_"), rngs=rngs, **overrides)
        width = seg["head_width"] or 512
        head = UperNetHead(encoder.dims, width, dropout=seg["dropout"], dtype=dtype, rngs=rngs)
        use_aux = True if seg["aux"] is None else bool(seg["aux"])
    else:  # fcn_resnet{50,101}_d8: ResNetV1c, output stride 8
        variant = name.removeprefix("fcn_").removesuffix("_d8")
        encoder = create_encoder(f"{variant}_v1c", rngs=rngs, **overrides)
        width = seg["head_width"] or 512
        head = FCNHead(
            encoder.dims,
            width,
            in_index=len(encoder.dims) - 1,
            num_convs=2,
            concat_input=True,
            dropout=seg["dropout"],
            dtype=dtype,
            rngs=rngs,
        )
        use_aux = True if seg["aux"] is None else bool(seg["aux"])

    if seg["classifier"] == "cbp":
        classifier = CBPClassifier(
            num_classes,
            width,
            length=seg["cbp_length"],
            update=seg["cbp_update"],
            init=seg["cbp_init"],
            normalize_features=seg["cbp_normalize_features"],
            allow_non_orthogonal=seg["cbp_allow_non_orthogonal"],
            ema_momentum=seg["cbp_ema_momentum"],
            penalty_weight=seg["cbp_penalty_weight"],
            rngs=rngs,
        )
    elif seg["classifier"] == "linear":
        classifier = LinearClassifier(num_classes, width, rngs=rngs)
    else:
        raise ValueError(f"classifier={seg['classifier']!r}; use 'cbp' or 'linear'.")

    aux_head = aux_classifier = None
    if use_aux:
        aux_head = FCNHead(
            encoder.dims,
            seg["aux_width"],
            in_index=2,
            num_convs=seg["aux_num_convs"],
            concat_input=seg["aux_concat_input"],
            dropout=seg["dropout"],
            dtype=dtype,
            rngs=rngs,
        )
        aux_classifier = LinearClassifier(num_classes, seg["aux_width"], rngs=rngs)
    return Segmentor(encoder, head, classifier, aux_head=aux_head, aux_classifier=aux_classifier)
