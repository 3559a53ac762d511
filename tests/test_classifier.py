"""CBP classifier variants: what trains, what stays frozen, EMA and penalty updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cbp_jax import losses
from cbp_jax import prototypes as cbp
from cbp_jax.classifier import (
    CBPClassifier,
    LinearClassifier,
    Prototypes,
    ema_prototypes,
    orthogonality_penalty,
    update_prototypes,
)


class TinySegmenter(nnx.Module):
    """A 1x1 projection feeding a classifier: enough to train end to end."""

    def __init__(self, classifier_factory, *, rngs):
        self.proj = nnx.Linear(3, 16, rngs=rngs)
        self.classifier = classifier_factory(rngs)

    def __call__(self, images):
        features = self.proj(images)
        return self.classifier(features), features


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (2, 4, 4)), jnp.int32)
    return images, labels


def _adamw_step(model, ortho_loss=False):
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.5), wrt=nnx.Param)
    images, labels = _batch()

    def loss_fn(model):
        logits, features = model(images)
        loss = losses.pixel_cross_entropy(logits, labels)
        loss += losses.occl(features, labels, model.classifier.class_weights())
        return loss + model.classifier.orthogonality_loss()

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param))(model)
    optimizer.update(model, grads)
    return grads


def test_logits_are_dot_products_with_prototypes():
    clf = CBPClassifier(5, 16, length=2.0, rngs=nnx.Rngs(0))
    features = jax.random.normal(jax.random.key(1), (2, 3, 4, 16))
    w = np.asarray(clf.class_weights(), np.float64)
    expected = np.asarray(features, np.float64) @ w.T
    np.testing.assert_allclose(clf(features), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 2.0, rtol=1e-5)
    assert abs(float(cbp.class_separability(clf.class_weights()))) < 1e-4
    cosine = CBPClassifier(5, 16, length=2.0, normalize_features=True, rngs=nnx.Rngs(0))
    unit = np.asarray(features, np.float64)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    np.testing.assert_allclose(cosine(features), unit @ w.T, rtol=1e-5, atol=1e-5)


def test_frozen_prototypes_are_no_param_and_bit_identical_after_adamw():
    model = TinySegmenter(lambda r: CBPClassifier(5, 16, length=2.0, rngs=r), rngs=nnx.Rngs(0))
    assert isinstance(model.classifier.prototypes, Prototypes)
    assert not isinstance(model.classifier.prototypes, nnx.Param)
    assert "classifier" not in nnx.state(model, nnx.Param)
    before = np.array(model.classifier.class_weights())
    proj_before = np.array(model.proj.kernel[...])
    grads = _adamw_step(model)
    assert "classifier" not in grads  # no gradient, hence no optimizer state, no decay
    np.testing.assert_array_equal(model.classifier.class_weights(), before)
    assert np.abs(model.proj.kernel[...] - proj_before).max() > 0  # the rest did train


def test_frozen_prototypes_get_no_gradient_even_when_asked_for_all_variables():
    clf = CBPClassifier(5, 16, rngs=nnx.Rngs(0))
    features = jnp.ones((1, 2, 2, 16))
    grads = nnx.grad(lambda m: jnp.sum(m(features) ** 2), argnums=nnx.DiffState(0, nnx.Variable))(
        clf
    )
    assert np.all(np.asarray(grads["prototypes"][...]) == 0)


@pytest.mark.parametrize("update", ["gradient", "penalty"])
def test_trainable_variants_change_under_adamw(update):
    model = TinySegmenter(lambda r: CBPClassifier(5, 16, update=update, rngs=r), rngs=nnx.Rngs(0))
    assert isinstance(model.classifier.prototypes, nnx.Param)
    before = np.array(model.classifier.class_weights())
    _adamw_step(model)
    after = np.asarray(model.classifier.class_weights())
    assert np.abs(after - before).max() > 1e-4
    if update == "penalty":
        model.classifier.reequalize()
        np.testing.assert_allclose(
            np.linalg.norm(model.classifier.class_weights(), axis=1), 1.0, rtol=1e-5
        )


def test_orthogonality_penalty_is_sum_of_squared_off_diagonal_cosines():
    w = np.random.default_rng(0).normal(size=(4, 6))
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = u @ u.T
    expected = sum(cos[i, j] ** 2 for i in range(4) for j in range(4) if i != j)
    np.testing.assert_allclose(orthogonality_penalty(jnp.asarray(w, jnp.float32)), expected, 1e-5)
    clf = CBPClassifier(4, 6, update="penalty", penalty_weight=0.01, rngs=nnx.Rngs(0))
    assert float(clf.orthogonality_loss()) < 1e-10  # CBP init is orthogonal
    clf.prototypes[...] = jnp.asarray(w, jnp.float32)
    np.testing.assert_allclose(clf.orthogonality_loss(), 0.01 * expected, rtol=1e-5)
    assert float(CBPClassifier(4, 6, rngs=nnx.Rngs(0)).orthogonality_loss()) == 0.0


def test_ema_update_moves_present_classes_only():
    clf = CBPClassifier(4, 8, length=2.0, update="ema", ema_momentum=0.9, rngs=nnx.Rngs(0))
    w0 = np.array(clf.class_weights(), np.float64)
    centroids = np.random.default_rng(1).normal(size=(4, 8))
    present = np.array([True, False, True, True])
    centroids[3] = 0  # present but zero: keeps its prototype direction
    clf.ema_update(jnp.asarray(centroids, jnp.float32), jnp.asarray(present))
    w1 = np.asarray(clf.class_weights(), np.float64)
    for i in (0, 2):
        target = 2.0 * centroids[i] / np.linalg.norm(centroids[i])
        np.testing.assert_allclose(w1[i], 0.9 * w0[i] + 0.1 * target, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w1[1], w0[1], rtol=1e-6)
    np.testing.assert_allclose(w1[3], w0[3], rtol=1e-6)
    np.testing.assert_allclose(
        ema_prototypes(
            jnp.asarray(w0, jnp.float32),
            jnp.asarray(centroids, jnp.float32),
            jnp.asarray(present),
            momentum=0.9,
            length=2.0,
        ),
        w1,
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="update='ema'"):
        CBPClassifier(4, 8, rngs=nnx.Rngs(0)).ema_update(jnp.zeros((4, 8)), jnp.ones(4, bool))


def test_ema_update_inside_jit():
    clf = CBPClassifier(4, 8, update="ema", rngs=nnx.Rngs(0))
    features = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
    labels = jnp.zeros((2, 3, 3), jnp.int32)

    @nnx.jit
    def step(clf):
        clf.ema_update(*losses.category_centroids(features, labels, 4))

    before = np.array(clf.class_weights())
    step(clf)
    after = np.asarray(clf.class_weights())
    assert np.abs(after[0] - before[0]).max() > 0 and np.all(after[1:] == before[1:])


def test_init_variant_and_bad_update():
    clf = CBPClassifier(6, 12, length=3.0, init="equal", rngs=nnx.Rngs(0))
    assert float(cbp.max_abs_cosine(clf.class_weights())) > 0.05
    with pytest.raises(ValueError, match="not one of"):
        CBPClassifier(6, 12, update="sgd", rngs=nnx.Rngs(0))


def test_linear_classifier_same_interface_and_trains():
    model = TinySegmenter(lambda r: LinearClassifier(5, 16, rngs=r), rngs=nnx.Rngs(0))
    images, _ = _batch()
    logits, _ = model(images)
    assert logits.shape == (2, 4, 4, 5) and model.classifier.class_weights().shape == (5, 16)
    before = np.array(model.classifier.class_weights())
    _adamw_step(model)
    assert np.abs(np.asarray(model.classifier.class_weights()) - before).max() > 1e-4


@pytest.mark.parametrize("update", ["frozen", "gradient", "ema", "penalty"])
def test_update_prototypes_is_the_variant_step(update):
    """``update_prototypes`` moves ``ema`` prototypes to the batch centroids (labels at the
    image size, downsampled inside), rescales ``penalty`` ones and leaves the rest alone."""
    clf = CBPClassifier(4, 8, length=2.0, update=update, ema_momentum=0.5, rngs=nnx.Rngs(0))
    clf.prototypes[...] = clf.prototypes[...] * 1.5  # off-length, for "penalty"
    before = np.array(clf.class_weights())
    features = jax.random.normal(jax.random.key(1), (2, 3, 3, 8))
    labels = jnp.asarray(np.random.default_rng(2).integers(0, 3, size=(2, 12, 12)), jnp.int32)
    nnx.jit(update_prototypes)(clf, features, labels)
    after = np.asarray(clf.class_weights())
    if update == "ema":
        small = losses.nearest_downsample(labels, (3, 3))
        centroids, present = losses.category_centroids(features, small, 4)
        want = ema_prototypes(jnp.asarray(before), centroids, present, momentum=0.5, length=2.0)
        np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-6)
        assert not present[3] and np.all(after[3] == before[3]) and np.any(after != before)
    elif update == "penalty":
        np.testing.assert_allclose(np.linalg.norm(after, axis=1), 2.0, rtol=1e-5)
    else:
        np.testing.assert_array_equal(after, before)
