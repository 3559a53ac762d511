"""Frozen Category-Basis Prototypes and OCCL in your own Flax NNX segmentation model.

    python examples/own_model.py

A toy model (two convolutions, features at 1/4 of the image size) ends in a
``CBPClassifier`` instead of a learned 1x1 convolution; its loss is the pixel cross-entropy
on the logits resized to the labels plus OCCL on the features. A few AdamW steps on random
data run, and the prototypes come out exactly as they went in: they are not an
``nnx.Param``, so neither the gradient nor the optimizer touches them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cbp_jax import losses, prototypes
from cbp_jax.classifier import CBPClassifier

NUM_CLASSES, DIM = 8, 32


class TinySegmenter(nnx.Module):
    """``images (B, H, W, 3) -> (features (B, H/4, W/4, DIM), logits (B, H/4, W/4, N))``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, DIM, (4, 4), strides=(4, 4), rngs=rngs)
        self.mix = nnx.Conv(DIM, DIM, (3, 3), rngs=rngs)
        self.classifier = CBPClassifier(NUM_CLASSES, DIM, length=2.0, rngs=rngs)  # frozen

    def __call__(self, images):
        features = self.mix(nnx.relu(self.stem(images)))
        return features, self.classifier(features)


def loss_fn(model, images, labels):
    features, logits = model(images)  # (B, h, w, DIM), (B, h, w, N)
    b, h, w = labels.shape
    upsampled_logits = jax.image.resize(logits, (b, h, w, NUM_CLASSES), "bilinear")
    loss = losses.pixel_cross_entropy(upsampled_logits, labels)  # ignore_index=255
    loss += losses.occl(
        features,
        losses.nearest_downsample(labels, features.shape[1:3]),
        model.classifier.class_weights(),
        tau=0.07,
        centroid_weight=1.0,
        category_weight=0.1,
    )
    return loss


@nnx.jit
def train_step(model, optimizer, images, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
    optimizer.update(model, grads)
    return loss


def main():
    model = TinySegmenter(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)
    before = np.asarray(model.classifier.class_weights())  # (N, DIM)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(4, 32, 32, 3)), jnp.float32)
    labels = rng.integers(0, NUM_CLASSES, size=(4, 32, 32))
    labels[:, :4] = 255  # unlabelled pixels
    labels = jnp.asarray(labels, jnp.int32)
    for step in range(1, 4):
        print(f"step {step}: loss {float(train_step(model, optimizer, images, labels)):.4f}")
    after = np.asarray(model.classifier.class_weights())
    if not np.array_equal(before, after):
        raise AssertionError("the frozen prototypes changed during training")
    cos = float(prototypes.max_abs_cosine(after))
    norms = np.linalg.norm(after, axis=1)
    print(
        f"prototypes unchanged: max |cos| between classes {cos:.1e}, "
        f"norms {norms.min():.3f}..{norms.max():.3f}"
    )


if __name__ == "__main__":
    main()
