"""The segmentor-level settings of a model (classifier, decode head, auxiliary head), once.

``ModelConfig`` holds the only defaults of these settings: ``models.create`` builds from it
and ``configs/common.py`` copies it into every experiment config. Its CBP defaults are
read from ``CBPClassifier``'s own keyword defaults, so a user building the classifier by
hand gets the same ones. Encoder settings (depths, drop-path rate, ...) live in each
encoder's config dataclass (``MiTConfig``, ``ConvNeXtConfig``, ``SwinConfig``,
``ResNetConfig``).
"""

from __future__ import annotations

import dataclasses
import inspect

from cbp_jax.classifier import CBPClassifier

CLASSIFIERS = ("cbp", "linear")
HEADS = {"segformer": ("mmseg", "mlp"), "upernet": ("upernet",), "fcn": ("fcn",)}
# Decode-head width D when ``head_width`` is None: per head kind, and for the SegFormer
# "mlp" head per encoder variant (transformers' SegFormer: 256 for B0/B1, 768 for B2-B5).
_HEAD_WIDTHS = {"mmseg": 256, "upernet": 512, "fcn": 512}
_MLP_HEAD_WIDTHS = {"b0": 256, "b1": 256}
_MLP_HEAD_WIDTH = 768
_CBP = {
    name: p.default
    for name, p in inspect.signature(CBPClassifier.__init__).parameters.items()
    if p.default is not inspect.Parameter.empty
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What sits on top of the encoder.

    Attributes:
      classifier: ``"cbp"`` (frozen Category-Basis Prototypes) or ``"linear"`` (learned).
      cbp_length: T, the common prototype norm (Table 9).
      cbp_update: ``"frozen"``, ``"gradient"``, ``"ema"`` or ``"penalty"`` (Table 4).
      cbp_init: ``"equal_ortho"``, ``"ortho"`` or ``"equal"`` (Table 5).
      cbp_normalize_features: L2-normalize features before the classifier (cosine form).
      cbp_allow_non_orthogonal: spread N > C prototypes as far as the width allows.
      cbp_ema_momentum: momentum of the ``"ema"`` update.
      cbp_penalty_weight: weight of the ``"penalty"`` orthogonality loss.
      head: SegFormer ``"mmseg"`` (conv + BN + ReLU, the paper's) or ``"mlp"`` (transformers'
        Linear head); UperNet ``"upernet"``; FCN ``"fcn"``; None: the family's first.
      head_width: decoder width D; None: :meth:`resolved_head_width`.
      dropout: dropout rate before the classifier (and the auxiliary classifier).
      aux: the auxiliary FCN head on stage 3; None: on for UperNet and FCN.
      aux_width, aux_num_convs, aux_concat_input: that head's shape (mmseg's defaults).
      scan_blocks: the encoder's repeated blocks stacked and applied by ``jax.lax.scan``
        (one compiled body per stage; ``cbp_jax.models.stacking``); False: unrolled. The
        weights are the same either way (importers, exports and ``factories.restore``
        convert between the layouts).
    """

    classifier: str = "cbp"
    cbp_length: float = _CBP["length"]
    cbp_update: str = _CBP["update"]
    cbp_init: str = _CBP["init"]
    cbp_normalize_features: bool = _CBP["normalize_features"]
    cbp_allow_non_orthogonal: bool = _CBP["allow_non_orthogonal"]
    cbp_ema_momentum: float = _CBP["ema_momentum"]
    cbp_penalty_weight: float = _CBP["penalty_weight"]
    head: str | None = None
    head_width: int | None = None
    dropout: float = 0.1
    aux: bool | None = None
    aux_width: int = 256
    aux_num_convs: int = 1
    aux_concat_input: bool = False
    scan_blocks: bool = False

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    def head_kind(self, name: str) -> str:
        """The decode head of segmentor ``name`` (e.g. ``"segformer_b0"``); raises
        ``ValueError`` for a head its family does not have."""
        heads = HEADS[name.split("_", 1)[0]]
        if self.head is not None and self.head not in heads:
            raise ValueError(f"head={self.head!r} for {name!r}; use one of {heads}.")
        return self.head or heads[0]

    def resolved_head_width(self, name: str) -> int:
        """D of segmentor ``name``: ``head_width`` if set, else the head's default (the
        SegFormer ``"mlp"`` head's depends on the variant: 256 for B0/B1, 768 above)."""
        if self.head_width:
            return int(self.head_width)
        kind = self.head_kind(name)
        if kind == "mlp":
            return _MLP_HEAD_WIDTHS.get(name.split("_", 1)[1], _MLP_HEAD_WIDTH)
        return _HEAD_WIDTHS[kind]

    def uses_aux(self, name: str) -> bool:
        """Whether segmentor ``name`` has the auxiliary head (default: UperNet and FCN)."""
        return not name.startswith("segformer") if self.aux is None else bool(self.aux)
