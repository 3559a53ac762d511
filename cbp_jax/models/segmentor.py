"""Segmentor = encoder + decode head + classifier (CBP or learned), optional auxiliary head.

``model(images (B, H, W, 3), train=bool)`` returns a dict:

- ``"logits"``: (B, h, w, N) float32, the classifier's output at the head's resolution
  (h = H/4 for SegFormer and UperNet, H/8 for FCN-D8).
- ``"features"``: (B, h, w, D) float32, exactly what the classifier saw (after the head's
  dropout when training), for OCCL.
- ``"aux_logits"`` (only with an auxiliary head: UperNet, FCN): float32 from the auxiliary
  FCN head on stage 3, at that stage's resolution ((B, H/16, W/16, N); H/8 for FCN-D8).

Resize logits to the label size in the loss, as mmseg does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax.classifier import CBPClassifier, LinearClassifier


class Segmentor(nnx.Module):
    """Encoder + head + classifier (+ optional auxiliary head with its own learned classifier).

    Args:
      encoder: images (B, H, W, 3) -> list of maps; must have a ``dims`` attribute.
      head: list of maps -> features (B, h, w, D); must have a ``width`` attribute (D).
      classifier: features (..., D) -> logits (..., N).
      aux_head: optional head on an intermediate map; ``aux_classifier`` must come with it.
    """

    def __init__(
        self,
        encoder: nnx.Module,
        head: nnx.Module,
        classifier: CBPClassifier | LinearClassifier,
        *,
        aux_head: nnx.Module | None = None,
        aux_classifier: LinearClassifier | None = None,
    ):
        if (aux_head is None) != (aux_classifier is None):
            raise ValueError("Segmentor: pass aux_head and aux_classifier together, or neither.")
        self.encoder = encoder
        self.head = head
        self.classifier = classifier
        self.aux_head = aux_head
        self.aux_classifier = aux_classifier

    def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
        """(B, H, W, 3) -> {"logits", "features"[, "aux_logits"]} (see the module doc)."""
        feats = self.encoder(images, train=train)
        features = self.head(feats, train=train).astype(jnp.float32)
        out = {"logits": self.classifier(features).astype(jnp.float32), "features": features}
        if self.aux_head is not None:
            aux = self.aux_head(feats, train=train).astype(jnp.float32)
            out["aux_logits"] = self.aux_classifier(aux).astype(jnp.float32)
        return out
