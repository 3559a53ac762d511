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
from cbp_jax.models.config import CLASSIFIERS, ModelConfig
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
    "ModelConfig",
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
_BLOCK_KWARGS = ("dtype", "remat", "scan_blocks")
_FAMILIES = {
    "mit": (MixTransformer, MiTConfig, MIT_VARIANTS, (*_BLOCK_KWARGS, "dwconv_impl")),
    "convnext": (ConvNeXt, ConvNeXtConfig, CONVNEXT_VARIANTS, (*_BLOCK_KWARGS, "dwconv_impl")),
    "swin": (SwinTransformer, SwinConfig, SWIN_VARIANTS, _BLOCK_KWARGS),
    "resnet": (ResNetV1c, ResNetConfig, RESNET_VARIANTS, _BLOCK_KWARGS),
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
        MiT and ConvNeXt), ``remat`` (recompute block activations in the backward pass:
        True or a ``jax.checkpoint`` policy name, ``layers.REMAT_POLICIES``), ``scan_blocks``
        (stacked blocks applied by ``jax.lax.scan``; default ``ModelConfig.scan_blocks``),
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
    kwargs.setdefault("scan_blocks", ModelConfig.scan_blocks)
    if not isinstance(kwargs["scan_blocks"], bool):
        raise ValueError(f"scan_blocks={kwargs['scan_blocks']!r}; pass True or False.")
    return cls(config, rngs=rngs, **kwargs)


def create(name: str, *, num_classes: int, rngs: nnx.Rngs, **overrides: Any) -> Segmentor:
    """Builds a segmentor by name: ``model(images, train=bool)`` -> dict (see ``segmentor``).

    Args:
      name: ``segformer_b0`` .. ``segformer_b5``, ``upernet_convnext_tiny|small|base|large``,
        ``upernet_swin_tiny|small|base|large``, ``fcn_resnet50_d8`` or ``fcn_resnet101_d8``.
      num_classes: N.
      rngs: parameter init (and the CBP prototypes' key) and the 'dropout' stream.
      **overrides: any field of :class:`ModelConfig` (classifier, CBP settings, head,
        head width, dropout, auxiliary head; its docstring has their meaning and defaults).
        SegFormer's heads are ``"mmseg"`` (mmseg 1.x conv + BN + ReLU, the paper's; default)
        and ``"mlp"`` (the original / transformers Linear head, for HF-trained checkpoints);
        FCN's is mmseg's FCNHead on stage 4 (two 3x3 ConvModules, concat of the input and a
        3x3 ConvModule). Anything else goes to :func:`create_encoder` (``dtype``,
        ``dwconv_impl``, ``drop_path_rate``, ``norm_eps``, ...).
    """
    if name not in SEGMENTORS:
        raise ValueError(f"Unknown segmentor {name!r}. Known: {', '.join(SEGMENTORS)}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}; pass a positive int (150 for ADE20K).")
    fields = ModelConfig.field_names()
    cfg = ModelConfig(**{k: v for k, v in overrides.items() if k in fields})
    encoder_overrides = {k: v for k, v in overrides.items() if k not in fields}
    if cfg.classifier not in CLASSIFIERS:
        raise ValueError(f"classifier={cfg.classifier!r}; use one of {CLASSIFIERS}.")
    family, variant = name.split("_", 1)  # "segformer" | "upernet" | "fcn", e.g. "b0"
    kind = cfg.head_kind(name)
    width = cfg.resolved_head_width(name)
    encoder = create_encoder(
        _ENCODER_OF[family](variant), rngs=rngs, scan_blocks=cfg.scan_blocks, **encoder_overrides
    )
    dtype = encoder_overrides.get("dtype")
    head = _HEADS[kind](encoder.dims, width, cfg.dropout, dtype, rngs)
    aux_head = aux_classifier = None
    if cfg.uses_aux(name):
        aux_head = FCNHead(
            encoder.dims,
            cfg.aux_width,
            in_index=2,
            num_convs=cfg.aux_num_convs,
            concat_input=cfg.aux_concat_input,
            dropout=cfg.dropout,
            dtype=dtype,
            rngs=rngs,
        )
        aux_classifier = LinearClassifier(num_classes, cfg.aux_width, rngs=rngs)
    classifier = _classifier(cfg, num_classes, width, rngs)
    return Segmentor(encoder, head, classifier, aux_head=aux_head, aux_classifier=aux_classifier)


# segmentor family -> its encoder's name from the variant ("b0", "convnext_base", "resnet101_d8")
_ENCODER_OF = {
    "segformer": lambda variant: f"mit_{variant}",
    "upernet": lambda variant: variant,
    "fcn": lambda variant: f"{variant.removesuffix('_d8')}_v1c",
}
# head kind -> (encoder dims, width, dropout, dtype, rngs) -> head
_HEADS = {
    "mmseg": lambda dims, width, dropout, dtype, rngs: SegFormerHead(
        dims, width, dropout=dropout, dtype=dtype, rngs=rngs
    ),
    "mlp": lambda dims, width, dropout, dtype, rngs: SegFormerMLPHead(
        dims, width, dropout=dropout, dtype=dtype, rngs=rngs
    ),
    "upernet": lambda dims, width, dropout, dtype, rngs: UperNetHead(
        dims, width, dropout=dropout, dtype=dtype, rngs=rngs
    ),
    "fcn": lambda dims, width, dropout, dtype, rngs: FCNHead(
        dims,
        width,
        in_index=len(dims) - 1,
        num_convs=2,
        concat_input=True,
        dropout=dropout,
        dtype=dtype,
        rngs=rngs,
    ),
}


def _classifier(cfg: ModelConfig, num_classes: int, width: int, rngs: nnx.Rngs):
    """The CBP classifier ``cfg`` describes, or the learned 1x1 one."""
    if cfg.classifier == "linear":
        return LinearClassifier(num_classes, width, rngs=rngs)
    return CBPClassifier(
        num_classes,
        width,
        length=cfg.cbp_length,
        update=cfg.cbp_update,
        init=cfg.cbp_init,
        normalize_features=cfg.cbp_normalize_features,
        allow_non_orthogonal=cfg.cbp_allow_non_orthogonal,
        ema_momentum=cfg.cbp_ema_momentum,
        penalty_weight=cfg.cbp_penalty_weight,
        rngs=rngs,
    )
