"""Classifier modules (Flax NNX): the CBP classifier with its ablation variants, and a learned
1x1 baseline with the same interface.

Update strategies (paper, Table 4), all starting from the same CBP init:

- ``"frozen"`` (default): prototypes are a :class:`Prototypes` variable, not an ``nnx.Param``,
  so no gradient, optimizer state or weight decay ever touches them.
- ``"gradient"``: prototypes are an ``nnx.Param``, trained like any weight.
- ``"ema"``: a :class:`Prototypes` variable moved towards the batch's category centroids
  after each optimizer step.
- ``"penalty"``: an ``nnx.Param`` plus :meth:`CBPClassifier.orthogonality_loss` added to the
  loss; the length is restored after each optimizer step.

The after-step part of both is :func:`update_prototypes`, which the train step calls and a
training loop of your own calls the same way (``examples/own_model.py``).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax import losses
from cbp_jax import prototypes as cbp

UPDATES = ("frozen", "gradient", "ema", "penalty")


class Prototypes(nnx.Variable):
    """Constant class prototypes: a variable that is not a parameter."""


def ema_prototypes(
    prototypes: jax.Array,
    centroids: jax.Array,
    present: jax.Array,
    *,
    momentum: float,
    length: float,
) -> jax.Array:
    """EMA of prototypes ``(N, C)`` towards category centroids ``(N, C)`` rescaled to ``length``.

    ``w_i <- m * w_i + (1 - m) * length * c_i / ||c_i||`` for classes with ``present[i]``;
    absent classes keep their prototype.
    """
    target = cbp.equalize_rows(centroids, length)
    target = jnp.where(jnp.linalg.norm(centroids, axis=-1, keepdims=True) > 0, target, prototypes)
    moved = momentum * prototypes + (1.0 - momentum) * target
    return jnp.where(present[:, None], moved, prototypes)


def orthogonality_penalty(prototypes: jax.Array) -> jax.Array:
    """Sum of squared off-diagonal cosines, ``||W_n W_n^T - I||_F^2`` for row-normalized W_n."""
    cos = cbp.cosine_matrix(prototypes)
    return jnp.sum(jnp.square(cos - jnp.eye(cos.shape[0], dtype=cos.dtype)))


class CBPClassifier(nnx.Module):
    """Logits ``(..., N) = features (..., C) @ W^T`` against Category-Basis Prototypes W (N, C).

    Args:
      num_classes: N.
      dim: C, the feature width.
      length: T, the common prototype norm.
      update: ``"frozen"``, ``"gradient"``, ``"ema"`` or ``"penalty"`` (see the module doc).
      init: ``"equal_ortho"``, ``"ortho"`` or ``"equal"`` (Table 5).
      normalize_features: L2-normalize features first (cosine classifier); off by default,
        as in Eq. 1.
      ema_momentum: momentum of the ``"ema"`` update.
      penalty_weight: weight of the ``"penalty"`` orthogonality loss.
      allow_non_orthogonal: see :func:`cbp_jax.prototypes.category_basis_prototypes`.
      rngs: draws the prototype key from ``rngs.params``.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        length: float = 1.0,
        update: str = "frozen",
        init: str = "equal_ortho",
        normalize_features: bool = False,
        ema_momentum: float = 0.99,
        penalty_weight: float = 0.01,
        allow_non_orthogonal: bool = False,
        rngs: nnx.Rngs,
    ):
        if update not in UPDATES:
            raise ValueError(f"update={update!r} is not one of {UPDATES}.")
        w = cbp.category_basis_prototypes(
            rngs.params(),
            num_classes,
            dim,
            length,
            init=init,
            allow_non_orthogonal=allow_non_orthogonal,
        )
        variable_type = nnx.Param if update in ("gradient", "penalty") else Prototypes
        self.prototypes = variable_type(w)
        self.num_classes, self.dim, self.length = num_classes, dim, float(length)
        self.update, self.normalize_features = update, normalize_features
        self.ema_momentum, self.penalty_weight = ema_momentum, penalty_weight

    def __call__(self, features: jax.Array) -> jax.Array:
        w = self.prototypes[...]
        if not isinstance(self.prototypes, nnx.Param):
            w = jax.lax.stop_gradient(w)
        if self.normalize_features:
            features = losses.l2_normalize(features, eps=1e-6)
        return _matmul_flat(features, w.astype(features.dtype).T)

    def class_weights(self) -> jax.Array:
        """The prototypes as an ``(N, C)`` array."""
        return self.prototypes[...]

    def ema_update(self, centroids: jax.Array, present: jax.Array) -> None:
        """``"ema"``: moves prototypes towards centroids ``(N, C)`` of ``present`` (N,) classes."""
        if self.update != "ema":
            raise ValueError(f"ema_update needs update='ema'; this classifier is {self.update!r}.")
        self.prototypes[...] = ema_prototypes(
            self.prototypes[...],
            jax.lax.stop_gradient(centroids),
            present,
            momentum=self.ema_momentum,
            length=self.length,
        )

    def orthogonality_loss(self) -> jax.Array:
        """``"penalty"``: ``penalty_weight`` x the orthogonality penalty; 0 for other updates."""
        if self.update != "penalty":
            return jnp.zeros((), jnp.float32)
        return self.penalty_weight * orthogonality_penalty(self.prototypes[...])

    def reequalize(self) -> None:
        """``"penalty"``: rescales every prototype back to ``length`` (call after each step)."""
        if self.update == "penalty":
            self.prototypes[...] = cbp.equalize_rows(self.prototypes[...], self.length)


def update_prototypes(
    classifier: nnx.Module,
    features: jax.Array,
    labels: jax.Array,
    *,
    ignore_index: int = 255,
    axis_name: str | None = None,
) -> None:
    """The prototype step of the ``"ema"`` and ``"penalty"`` variants; call it after each
    optimizer update (``"frozen"`` and ``"gradient"`` classifiers, and learned ones, are left
    as they are).

    ``"ema"`` moves each prototype towards its class centroid of ``features`` in this batch;
    ``"penalty"`` rescales every prototype back to the common length (its orthogonality term,
    ``classifier.orthogonality_loss()``, belongs in the loss).

    Args:
      classifier: the model's classifier (updated in place).
      features: ``(B, h, w, C)`` what the classifier saw.
      labels: ``(B, H, W)`` int labels, nearest-downsampled here to ``(h, w)``.
      ignore_index: label of unlabelled pixels.
      axis_name: the ``shard_map`` / ``pmap`` axis the batch is split over, if any.
    """
    update = getattr(classifier, "update", "gradient")
    if update == "ema":
        if labels.shape[1:3] != features.shape[1:3]:
            labels = losses.nearest_downsample(labels, features.shape[1:3])
        centroids, present = losses.category_centroids(
            features, labels, classifier.num_classes, ignore_index, axis_name
        )
        classifier.ema_update(centroids, present)
    elif update == "penalty":
        classifier.reequalize()


def _matmul_flat(features: jax.Array, w: jax.Array) -> jax.Array:
    """(..., C) @ (C, N) -> (..., N) as one 2-D matmul: the weight gradient then contracts a
    single axis, where contracting (B, H, W) made XLA:CPU copy a transposed cotangent first."""
    return (features.reshape(-1, features.shape[-1]) @ w).reshape(*features.shape[:-1], -1)


class LinearClassifier(nnx.Module):
    """Learned 1x1 classifier with bias (the paper's baselines): ``(..., C) -> (..., N)``.

    Weights are ``normal(0, 0.01)`` and bias 0, as mmseg's ``conv_seg``.
    """

    def __init__(self, num_classes: int, dim: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(
            dim,
            num_classes,
            kernel_init=nnx.initializers.normal(0.01),
            bias_init=nnx.initializers.zeros_init(),
            rngs=rngs,
        )
        self.num_classes, self.dim, self.update = num_classes, dim, "learned"

    def __call__(self, features: jax.Array) -> jax.Array:
        logits = self.linear(features.reshape(-1, features.shape[-1]))  # see _matmul_flat
        return logits.reshape(*features.shape[:-1], self.num_classes)

    def orthogonality_loss(self) -> jax.Array:
        """No penalty for a learned classifier: 0 (kept for a common interface)."""
        return jnp.zeros((), jnp.float32)

    def class_weights(self) -> jax.Array:
        """The learned class weights as an ``(N, C)`` array, for the paper's analyses."""
        return self.linear.kernel[...].T
