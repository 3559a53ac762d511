"""Frozen Category-Basis Prototypes and OCCL in your own Flax segmentation model.

    python examples/own_model.py

A toy model (two convolutions, features at 1/4 of the image size) ends in a
``CBPClassifier`` instead of a learned 1x1 convolution; its loss is the pixel cross-entropy
on the logits resized to the labels plus OCCL on the features. Three short runs on random data:

1. NNX, frozen prototypes (the paper's method): they come out exactly as they went in, since
   they are not an ``nnx.Param``, so neither the gradient nor the optimizer touches them.
2. NNX, the ``"ema"`` variant: the same loop plus ``update_prototypes`` after each optimizer
   step, which moves the prototypes towards the batch's class centroids.
3. Linen: the classifier wrapped by ``nnx.bridge.to_linen``; its prototypes land in their own
   ``"Prototypes"`` collection, outside ``"params"``, so a Linen loop that differentiates
   ``params`` leaves them frozen too.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbp_jax import (
    CBPClassifier,
    nearest_downsample,
    occl_loss,
    pixel_cross_entropy,
    prototypes,
    update_prototypes,
)

NUM_CLASSES, DIM = 8, 32


class TinySegmenter(nnx.Module):
    """``images (B, H, W, 3) -> (features (B, H/4, W/4, DIM), logits (B, H/4, W/4, N))``."""

    def __init__(self, update: str = "frozen", *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, DIM, (4, 4), strides=(4, 4), rngs=rngs)
        self.mix = nnx.Conv(DIM, DIM, (3, 3), rngs=rngs)
        self.classifier = CBPClassifier(NUM_CLASSES, DIM, length=2.0, update=update, rngs=rngs)

    def __call__(self, images):
        features = self.mix(nnx.relu(self.stem(images)))
        return features, self.classifier(features)


def segmentation_loss(features, logits, labels, prototype_matrix):
    """CE on the logits upsampled to the labels (B, H, W) + OCCL on the features."""
    b, h, w = labels.shape
    upsampled_logits = jax.image.resize(logits, (b, h, w, NUM_CLASSES), "bilinear")
    loss = pixel_cross_entropy(upsampled_logits, labels)  # ignore_index=255
    loss += occl_loss(
        features,
        nearest_downsample(labels, features.shape[1:3]),
        prototype_matrix,
        tau=0.07,
        centroid_weight=1.0,
        category_weight=0.1,
    )
    return loss


def loss_fn(model, images, labels):
    features, logits = model(images)  # (B, h, w, DIM), (B, h, w, N)
    loss = segmentation_loss(features, logits, labels, model.classifier.class_weights())
    return loss + model.classifier.orthogonality_loss(), features  # 0 unless update="penalty"


@nnx.jit
def train_step(model, optimizer, images, labels):
    (loss, features), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, images, labels)
    optimizer.update(model, grads)
    update_prototypes(model.classifier, features, labels)  # "ema" / "penalty"; else nothing
    return loss


def random_batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(4, 32, 32))
    labels[:, :4] = 255  # unlabelled pixels
    return images, jnp.asarray(labels, jnp.int32)


def train_nnx(update: str) -> tuple[np.ndarray, np.ndarray]:
    """A few AdamW steps; returns the prototypes before and after."""
    model = TinySegmenter(update, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    before = np.asarray(model.classifier.class_weights())  # (N, DIM)
    images, labels = random_batch()
    for step in range(1, 4):
        loss = float(train_step(model, optimizer, images, labels))
        print(f"  {update} step {step}: loss {loss:.4f}")
    return before, np.asarray(model.classifier.class_weights())


class LinenSegmenter(nn.Module):
    """The same toy model in Linen, with the NNX classifier through ``nnx.bridge``."""

    @nn.compact
    def __call__(self, images):
        features = nn.Conv(DIM, (3, 3))(nn.relu(nn.Conv(DIM, (4, 4), strides=(4, 4))(images)))
        classifier = nnx.bridge.to_linen(CBPClassifier, NUM_CLASSES, DIM, length=2.0)
        return features, classifier(features)


def train_linen() -> tuple[np.ndarray, np.ndarray]:
    model = LinenSegmenter()
    images, labels = random_batch()
    variables = model.init(jax.random.key(0), images)
    params, constants = variables["params"], {"Prototypes": variables["Prototypes"]}
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)

    def linen_loss(params):
        features, logits = model.apply({"params": params, **constants}, images)
        w = constants["Prototypes"]["ToLinen_0"]["prototypes"]
        return segmentation_loss(features, logits, labels, w)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(linen_loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    before = np.asarray(constants["Prototypes"]["ToLinen_0"]["prototypes"])
    for i in range(1, 4):
        params, opt_state, loss = step(params, opt_state)
        print(f"  linen step {i}: loss {float(loss):.4f}")
    return before, np.asarray(constants["Prototypes"]["ToLinen_0"]["prototypes"])


def main():
    print("1. NNX, frozen prototypes")
    before, after = train_nnx("frozen")
    if not np.array_equal(before, after):
        raise AssertionError("the frozen prototypes changed during training")
    cos = float(prototypes.max_abs_cosine(after))
    norms = np.linalg.norm(after, axis=1)
    print(
        f"  prototypes unchanged: max |cos| between classes {cos:.1e}, "
        f"norms {norms.min():.3f}..{norms.max():.3f}"
    )
    print('2. NNX, update="ema"')
    before, after = train_nnx("ema")
    moved = float(np.abs(after - before).max())
    if not moved > 0:
        raise AssertionError("update_prototypes did not move the ema prototypes")
    print(f"  prototypes moved towards the centroids: max change {moved:.2e}")
    print("3. Linen, through nnx.bridge.to_linen")
    before, after = train_linen()
    if not np.array_equal(before, after):
        raise AssertionError("the frozen prototypes changed in the Linen loop")
    print(f"  prototypes unchanged ({after.shape[0]} x {after.shape[1]})")


if __name__ == "__main__":
    main()
