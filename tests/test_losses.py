"""Pixel CE and OCCL against independent NumPy implementations of docs/method.md."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cbp_jax import losses
from cbp_jax import prototypes as cbp
from cbp_jax.data import views as views_lib

# ---------------------------------------------------------------- NumPy references


def np_pixel_ce(logits, labels, ignore=255):
    logits = np.asarray(logits, np.float64).reshape(-1, logits.shape[-1])
    labels = np.asarray(labels).reshape(-1)
    total, count = 0.0, 0
    for row, label in zip(logits, labels, strict=True):
        if label == ignore:
            continue
        m = row.max()
        total += m + np.log(np.exp(row - m).sum()) - row[label]
        count += 1
    return total / count if count else 0.0


def _unit(x):
    return x / np.linalg.norm(x)


def np_occl_terms(features, labels, protos, view_of_pixel, tau, ignore=255):
    """Literal method.md section 2, with loops over classes."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    n = protos.shape[0]
    vc = {}  # (class, view) -> view centroid
    for x in (0, 1):
        for cls in range(n):
            mask = (labels == cls) & (view_of_pixel == x)
            if mask.any():
                vc[cls, x] = features[mask].mean(axis=0)
    present = [[cls for cls in range(n) if (cls, x) in vc] for x in (0, 1)]
    valid = [cls for cls in range(n) if (cls, 0) in vc and (cls, 1) in vc]
    cc = {cls: _unit((vc[cls, 0] + vc[cls, 1]) / 2) for cls in valid}
    w = np.asarray(protos, np.float64)
    w = w / np.linalg.norm(w, axis=1, keepdims=True)
    centroid, category = 0.0, 0.0
    for x in (0, 1):
        losses_v = []
        for i in valid:
            q = _unit(vc[i, x])
            pos = np.exp(_unit(vc[i, 0]) @ _unit(vc[i, 1]) / tau)
            neg = sum(np.exp(q @ cc[j] / tau) for j in valid if j != i)
            losses_v.append(-np.log(pos / (pos + neg)))
        centroid += np.mean(losses_v) if losses_v else 0.0
        losses_c = []
        for i in present[x]:
            q = _unit(vc[i, x])
            scores = np.exp(w @ q / tau)
            losses_c.append(-np.log(scores[i] / scores.sum()))
        category += np.mean(losses_c) if losses_c else 0.0
    return centroid / 2, category / 2


def _halves(labels):
    b = labels.shape[0]
    return np.broadcast_to((np.arange(b) >= b // 2)[:, None, None], labels.shape).astype(int)


def _data(seed, b=4, h=6, w=5, c=16, n=7, ignore_frac=0.2):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(b, h, w, c)).astype(np.float32)
    labels = rng.integers(0, n, size=(b, h, w))
    labels[rng.random(labels.shape) < ignore_frac] = 255
    protos = np.asarray(cbp.category_basis_prototypes(jax.random.key(seed), n, c, 2.0))
    return features, labels.astype(np.int32), protos


# ---------------------------------------------------------------- pixel CE


def test_pixel_ce_matches_numpy_and_ignores():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 4, 6)).astype(np.float32) * 3
    labels = rng.integers(0, 6, (2, 5, 4))
    labels[0, :2] = 255
    got = losses.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(got, np_pixel_ce(logits, labels), rtol=1e-5)
    # mmseg's default (avg_non_ignore=False): the same sum over all 40 pixels, 8 ignored.
    got_all = losses.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), average="all")
    np.testing.assert_allclose(got_all, np_pixel_ce(logits, labels) * 32 / 40, rtol=1e-5)
    with pytest.raises(ValueError, match="average='pixels' is not one of"):
        losses.pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), average="pixels")


def test_pixel_ce_is_zero_without_labels_and_grad_finite():
    logits = jnp.ones((1, 3, 3, 4))
    labels = jnp.full((1, 3, 3), 255)
    value, grad = jax.value_and_grad(losses.pixel_cross_entropy)(logits, labels)
    assert value == 0.0 and np.all(np.asarray(grad) == 0)


def test_pixel_ce_bad_shapes():
    with pytest.raises(ValueError, match="resize the logits"):
        losses.pixel_cross_entropy(jnp.ones((1, 4, 4, 3)), jnp.zeros((1, 8, 8), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        losses.pixel_cross_entropy(jnp.ones((1, 4, 4, 3)), jnp.zeros((1, 4, 4)))


# ---------------------------------------------------------------- OCCL values


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tau,lam,phi", [(0.07, 1.0, 0.1), (0.2, 0.4, 0.3), (1.0, 1.0, 1.0)])
def test_occl_matches_numpy_batch_halves(seed, tau, lam, phi):
    features, labels, protos = _data(seed)
    ref_v, ref_c = np_occl_terms(features, labels, protos, _halves(labels), tau)
    terms = losses.occl_terms(jnp.asarray(features), jnp.asarray(labels), protos, tau=tau)
    np.testing.assert_allclose(terms.centroid, ref_v, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(terms.category, ref_c, rtol=2e-5, atol=1e-6)
    total = losses.occl(
        jnp.asarray(features),
        jnp.asarray(labels),
        protos,
        tau=tau,
        centroid_weight=lam,
        category_weight=phi,
    )
    np.testing.assert_allclose(total, lam * ref_v + phi * ref_c, rtol=2e-5, atol=1e-6)


def test_occl_matches_numpy_random_pixels():
    features, labels, protos = _data(11, b=3)  # odd batch is fine for random_pixels
    key = jax.random.key(42)
    view_ids = np.asarray(losses.view_assignment(jnp.asarray(labels), "random_pixels", key))
    assert 0.3 < view_ids.mean() < 0.7
    ref_v, ref_c = np_occl_terms(features, labels, protos, view_ids, 0.07)
    terms = losses.occl_terms(
        jnp.asarray(features), jnp.asarray(labels), protos, views="random_pixels", key=key
    )
    np.testing.assert_allclose(terms, (ref_v, ref_c), rtol=2e-5, atol=1e-6)


def test_occl_classes_in_one_view_only():
    # View 1 (images 0-1) has classes {0, 1, 2}; view 2 (images 2-3) has {2, 3}: only 2 is valid.
    features, _, protos = _data(3, n=5)
    labels = np.zeros((4, 6, 5), np.int32)
    labels[0], labels[1, :3], labels[1, 3:] = 0, 1, 2
    labels[2], labels[3] = 2, 3
    ref = np_occl_terms(features, labels, protos, _halves(labels), 0.07)
    got = losses.occl_terms(jnp.asarray(features), jnp.asarray(labels), protos)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6)
    # One valid class: no negatives, so the centroid term is -log(1) = 0 exactly.
    assert float(got.centroid) == 0.0 and float(got.category) > 0


def test_occl_single_class_and_all_ignored():
    features, _, protos = _data(5)
    one_class = np.full((4, 6, 5), 3, np.int32)
    got = losses.occl_terms(jnp.asarray(features), jnp.asarray(one_class), protos)
    np.testing.assert_allclose(
        got, np_occl_terms(features, one_class, protos, _halves(one_class), 0.07), rtol=2e-5
    )
    ignored = jnp.full((4, 6, 5), 255, jnp.int32)
    value, grad = jax.value_and_grad(losses.occl)(jnp.asarray(features), ignored, protos)
    assert float(value) == 0.0 and np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0)


def test_occl_large_feature_scale_is_finite():
    features, labels, protos = _data(2, c=256)
    value = losses.occl(jnp.asarray(features) * 1e4, jnp.asarray(labels), protos)
    assert np.isfinite(float(value))


def test_occl_under_jit_equals_eager():
    features, labels, protos = _data(6)
    jitted = jax.jit(losses.occl)(jnp.asarray(features), jnp.asarray(labels), protos)
    np.testing.assert_allclose(jitted, losses.occl(features, labels, protos), rtol=1e-6)


# ---------------------------------------------------------------- gradients


def test_gradients_finite_and_none_reach_prototypes():
    features, labels, protos = _data(8)
    g_feat, g_proto = jax.grad(losses.occl, argnums=(0, 2))(
        jnp.asarray(features), jnp.asarray(labels), jnp.asarray(protos)
    )
    assert np.all(np.isfinite(g_feat)) and np.abs(g_feat).max() > 0
    assert np.all(np.asarray(g_proto) == 0)


def test_no_gradient_through_category_centroid_keys():
    """Compare autodiff with a construction where the keys are explicit constants."""
    features, labels, protos = _data(9)
    view_ids = jnp.asarray(_halves(labels))
    num_classes = protos.shape[0]

    def centroid_term(feats, keys):
        """Centroid term with the category-centroid keys passed in as an argument."""
        centroids, counts = losses.view_centroids(feats, labels, view_ids, num_classes)
        valid = (counts > 0).all(0)
        q = centroids / jnp.linalg.norm(centroids, axis=-1, keepdims=True)
        pos = jnp.sum(q[0] * q[1], -1) / 0.07
        neg = jnp.einsum("xic,jc->xij", q, keys) / 0.07
        mask = valid[None] & ~jnp.eye(num_classes, dtype=bool)
        lse = jax.nn.logsumexp(
            jnp.concatenate(
                [
                    jnp.broadcast_to(pos, (2, num_classes))[..., None],
                    jnp.where(mask, neg, -jnp.inf),
                ],
                -1,
            ),
            -1,
        )
        nll = jnp.where(valid, lse - pos, 0.0)
        return nll.sum() / valid.sum() / 2

    feats = jnp.asarray(features)
    centroids, _ = losses.view_centroids(feats, labels, view_ids, num_classes)
    s = centroids.mean(0)
    keys = s / jnp.linalg.norm(s, axis=-1, keepdims=True)
    grad_const_keys = jax.grad(centroid_term)(feats, keys)
    grad_occl = jax.grad(lambda f: losses.occl_terms(f, labels, protos).centroid)(feats)
    np.testing.assert_allclose(grad_occl, grad_const_keys, rtol=1e-4, atol=1e-7)
    # With gradient through the keys the result is measurably different.
    grad_live_keys = jax.grad(
        lambda f: centroid_term(
            f,
            (lambda s: s / jnp.linalg.norm(s, axis=-1, keepdims=True))(
                losses.view_centroids(f, labels, view_ids, num_classes)[0].mean(0)
            ),
        )
    )(feats)
    assert np.abs(np.asarray(grad_live_keys - grad_const_keys)).max() > 1e-3


# ---------------------------------------------------------------- input validation


@pytest.mark.parametrize(
    "features_shape,labels_shape,labels_dtype,proto_shape,kwargs,match",
    [
        ((2, 4, 4, 8), (2, 8, 8), jnp.int32, (3, 8), {}, "labels .* must match features"),
        ((3, 4, 4, 8), (3, 4, 4), jnp.int32, (3, 8), {}, "even batch"),
        ((2, 4, 4, 8), (2, 4, 4), jnp.float32, (3, 8), {}, "integer dtype"),
        ((2, 4, 4, 8), (2, 4, 4), jnp.int32, (3, 16), {}, "feature width 8"),
        ((2, 4, 4, 8), (2, 4, 4), jnp.int32, (3, 8), {"views": "random_pixels"}, "PRNG key"),
        ((2, 4, 4, 8), (2, 4, 4), jnp.int32, (3, 8), {"views": "nope"}, "not one of"),
        ((2, 4, 4, 8), (2, 4, 4), jnp.int32, (3, 8), {"views": "objects"}, "needs the batch's"),
        ((2, 16, 8), (2, 16), jnp.int32, (3, 8), {}, r"\(B, H, W, C\)"),
    ],
)
def test_occl_bad_input_errors_at_trace_time(
    features_shape, labels_shape, labels_dtype, proto_shape, kwargs, match
):
    with pytest.raises(ValueError, match=match):
        jax.jit(lambda f, y, w: losses.occl(f, y, w, **kwargs)).lower(
            jnp.zeros(features_shape), jnp.zeros(labels_shape, labels_dtype), jnp.ones(proto_shape)
        )


# ---------------------------------------------------------------- sharding


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_occl_sharded_over_8_devices_equals_single_device(axis_type):
    features, labels, protos = _data(12, b=8, h=8, w=8, c=32, n=9)
    single = losses.occl_terms(jnp.asarray(features), jnp.asarray(labels), protos)
    grad_single = jax.grad(losses.occl)(jnp.asarray(features), jnp.asarray(labels), protos)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        batch = NamedSharding(mesh, P("data"))
        f_sharded = jax.device_put(features, batch)
        y_sharded = jax.device_put(labels, batch)
        assert len(f_sharded.sharding.device_set) == 8
        sharded = jax.jit(losses.occl_terms)(f_sharded, y_sharded, protos)
        grad_sharded = jax.jit(jax.grad(losses.occl))(f_sharded, y_sharded, protos)
    np.testing.assert_allclose(sharded, single, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_sharded, grad_single, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("views", ["batch_halves", "random_pixels", "objects"])
def test_losses_under_shard_map_with_axis_name_equal_single_device(views):
    """Each of 8 devices sees 2 of 16 images; with ``axis_name`` the centroids, CE sums and
    denominators are the whole batch's, so every device returns the single-device value."""
    features, labels, protos = _data(13, b=16, h=8, w=8, c=32, n=9)
    logits = np.random.default_rng(14).normal(size=(16, 4, 4, 9)).astype(np.float32)
    key = jax.random.key(3)
    mesh = jax.make_mesh((8,), ("data",))

    def per_device(f, y, z, v):
        small = losses.nearest_downsample(y, f.shape[1:3])
        view_map = losses.nearest_downsample(v, f.shape[1:3]) if views == "objects" else None
        kwargs = dict(views=views, key=key, axis_name="data", view_map=view_map)
        return (
            losses.occl(f, small, protos, **kwargs),
            losses.pixel_cross_entropy(
                jax.image.resize(z, (*y.shape, 9), "bilinear"), y, axis_name="data"
            ),
            losses.upsampled_cross_entropy(z, y, axis_name="data"),
            losses.upsampled_cross_entropy(z, y, band_bytes=4096, axis_name="data"),
            losses.category_centroids(f, small, 9, axis_name="data")[0],
        )

    mapped = jax.jit(
        jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False)
    )
    labels_full = np.repeat(np.repeat(labels, 2, axis=1), 2, axis=2)  # (16, 16, 16)
    rng = np.random.default_rng(15)
    view_map = np.stack([views_lib.object_views(y, rng) for y in labels_full]).astype(np.int32)
    batch = NamedSharding(mesh, P("data"))
    inputs = (features, labels_full, logits, view_map)
    got = mapped(*(jax.device_put(x, batch) for x in inputs))
    f, y, z = jnp.asarray(features), jnp.asarray(labels_full), jnp.asarray(logits)
    if views == "batch_halves":
        view_ids = _halves(labels)
    elif views == "objects":
        view_ids = view_map[:, ::2, ::2]  # the nearest downsample of the map
        assert 0.2 < view_ids.mean() < 0.8
    else:  # device d draws its pixels' views from fold_in(key, d)
        view_ids = np.concatenate(
            [
                losses.view_assignment(
                    jnp.asarray(labels[2 * d : 2 * d + 2]), views, jax.random.fold_in(key, d)
                )
                for d in range(8)
            ]
        )
    centroid, category = np_occl_terms(features, labels, protos, view_ids, 0.07)
    want_occl = centroid + 0.1 * category
    want_ce = losses.pixel_cross_entropy(jax.image.resize(z, (*y.shape, 9), "bilinear"), y)
    want_up = losses.upsampled_cross_entropy(z, y)
    want_cent = losses.category_centroids(f, jnp.asarray(labels), 9)[0]
    np.testing.assert_allclose(got[0], want_occl, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want_ce, rtol=1e-5)
    np.testing.assert_allclose(got[2], want_up, rtol=1e-5)
    np.testing.assert_allclose(got[3], want_up, rtol=1e-5)
    np.testing.assert_allclose(got[4], want_cent, rtol=1e-5, atol=1e-6)


def test_nearest_downsample_matches_torch_rule():
    labels = jnp.arange(2 * 8 * 12).reshape(2, 8, 12)
    got = np.asarray(losses.nearest_downsample(labels, (2, 3)))
    np.testing.assert_array_equal(got, np.asarray(labels)[:, ::4, ::4])
    got = np.asarray(losses.nearest_downsample(labels, (3, 5)))
    rows, cols = (
        np.floor(np.arange(3) * 8 / 3).astype(int),
        np.floor(np.arange(5) * 12 / 5).astype(int),
    )
    np.testing.assert_array_equal(got, np.asarray(labels)[:, rows][:, :, cols])


@pytest.mark.parametrize("axis", [1, 3])
def test_pixel_nll_values_and_grads_equal_log_softmax(axis):
    """Both forms of the class sums (slices for non-minor class axes on CPU, reductions for
    the minor one) against autodiff of ``jax.nn.log_softmax``; ignored labels included."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(0, 4, size=(2, 5, 7, 6)).astype(np.float32))
    logits = jnp.moveaxis(logits, 3, axis)  # 6 classes on ``axis``
    labels = rng.integers(0, 6, size=(2, 5, 7)).astype(np.int32)
    labels[0, 0, :3] = 255
    labels = jnp.asarray(labels)
    weights = jnp.asarray(rng.random(labels.shape).astype(np.float32) * (labels != 255))

    def reference(z):
        logp = jnp.moveaxis(jax.nn.log_softmax(z, axis=axis), axis, -1)
        onehot = jax.nn.one_hot(labels, 6)  # all-zero for 255
        return jnp.sum(weights * -jnp.sum(logp * onehot, -1))

    def ours(z):
        return jnp.sum(weights * losses.pixel_nll(z, labels, axis))

    np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-5)
    np.testing.assert_allclose(
        jax.grad(ours)(logits), jax.grad(reference)(logits), rtol=1e-5, atol=1e-6
    )
    lse, picked = losses._lse_and_pick_by_slices(logits, labels, axis)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, axis=axis), rtol=1e-6)
    taken = jnp.take_along_axis(logits, jnp.expand_dims(jnp.minimum(labels, 5), axis), axis)
    np.testing.assert_array_equal(picked, jnp.where(labels < 6, jnp.squeeze(taken, axis), 0.0))
