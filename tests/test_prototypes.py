"""Category-Basis Prototypes: accuracy bounds, determinism, init variants, N > C handling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbp_jax import demo
from cbp_jax import prototypes as cbp


def _np_cos(w):
    w = np.asarray(w, np.float64)
    u = w / np.linalg.norm(w, axis=1, keepdims=True)
    return u @ u.T


def _max_offdiag_abs(cos):
    return np.max(np.abs(cos - np.diag(np.diag(cos)))) if len(cos) > 1 else 0.0


SHAPES = [(1, 1), (2, 2), (11, 16), (19, 19), (64, 64), (150, 256), (150, 150), (171, 171)]
SHAPES += [(171, 768), (100, 700), (37, 768), (171, 512)]


@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("length", [0.3, 1.0, 2.0, 5.0])
def test_orthogonal_and_equal_length(n, c, length):
    w = cbp.category_basis_prototypes(jax.random.key(n * 1000 + c), n, c, length)
    assert w.shape == (n, c) and w.dtype == jnp.float32
    w = np.asarray(w)
    assert _max_offdiag_abs(_np_cos(w)) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(w.astype(np.float64), axis=1), length, rtol=1e-5)


@pytest.mark.slow
def test_many_random_shapes_and_keys():
    rng = np.random.default_rng(0)
    for _ in range(12):
        c = int(rng.integers(1, 769))
        n = int(rng.integers(1, min(c, 171) + 1))
        length = float(rng.uniform(0.1, 10))
        w = cbp.category_basis_prototypes(jax.random.key(int(rng.integers(1 << 30))), n, c, length)
        assert _max_offdiag_abs(_np_cos(w)) <= 1e-5, (n, c)
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(w, np.float64), axis=1), length, rtol=1e-5
        )


def test_deterministic_by_key_and_differs_across_keys():
    a = cbp.category_basis_prototypes(jax.random.key(3), 20, 32)
    b = cbp.category_basis_prototypes(jax.random.key(3), 20, 32)
    c = cbp.category_basis_prototypes(jax.random.key(4), 20, 32)
    np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 0.1


def test_gram_schmidt_matches_qr_up_to_signs_and_keeps_first_direction():
    w0 = cbp.kaiming_normal(jax.random.key(0), 30, 50)
    q = np.asarray(cbp.gram_schmidt(w0), np.float64)
    # Gram-Schmidt of rows in order = QR of W^T: same span prefixes, rows = +- Q columns * |R_ii|.
    qr_q, qr_r = np.linalg.qr(np.asarray(w0, np.float64).T)
    expected = (qr_q * np.diag(qr_r)).T
    np.testing.assert_allclose(q, expected, atol=2e-5)
    np.testing.assert_allclose(q[0], np.asarray(w0[0]), rtol=1e-6)


def test_runs_under_jit_with_traced_key():
    build = jax.jit(lambda k: cbp.category_basis_prototypes(k, 12, 24, 2.0))
    w = build(jax.random.key(5))
    eager = cbp.category_basis_prototypes(jax.random.key(5), 12, 24, 2.0)
    np.testing.assert_allclose(w, eager, rtol=1e-5, atol=1e-6)  # fusion may differ in ulps


def test_kaiming_draw_statistics():
    w = np.asarray(cbp.kaiming_normal(jax.random.key(0), 400, 512))
    assert abs(w.std() - math.sqrt(2 / 512)) < 0.002 and abs(w.mean()) < 0.002


def test_init_variants_behave_as_named():
    key = jax.random.key(7)
    draw = np.asarray(cbp.kaiming_normal(key, 40, 64), np.float64)
    equal = np.asarray(cbp.category_basis_prototypes(key, 40, 64, 3.0, init="equal"))
    ortho = np.asarray(cbp.category_basis_prototypes(key, 40, 64, 3.0, init="ortho"))
    both = np.asarray(cbp.category_basis_prototypes(key, 40, 64, 3.0, init="equal_ortho"))
    # equal: same directions as the Kaiming draw, norm T, not orthogonal.
    np.testing.assert_allclose(np.linalg.norm(equal, axis=1), 3.0, rtol=1e-5)
    np.testing.assert_allclose(np.diag(_np_cos(np.concatenate([equal, draw]))[:40, 40:]), 1, 1e-6)
    assert _max_offdiag_abs(_np_cos(equal)) > 0.2
    # ortho: orthogonal, norms are the Gram-Schmidt residuals (unequal, <= the draw's norms).
    assert _max_offdiag_abs(_np_cos(ortho)) <= 1e-5
    norms = np.linalg.norm(ortho, axis=1)
    assert norms.std() > 0.01 and np.all(norms <= np.linalg.norm(draw, axis=1) + 1e-5)
    # equal_ortho: the ortho directions at norm T.
    np.testing.assert_allclose(both, ortho * (3.0 / norms[:, None]), rtol=1e-5, atol=1e-6)


def test_more_classes_than_dims_raises_with_the_fix():
    with pytest.raises(ValueError) as err:
        cbp.category_basis_prototypes(jax.random.key(0), 150, 64)
    message = str(err.value)
    assert "N=150" in message and "C=64" in message and "allow_non_orthogonal" in message


@pytest.mark.parametrize(
    "kwargs",
    [dict(init="nope"), dict(length=0.0), dict(length=float("nan")), dict(num_classes=0)],
)
def test_bad_arguments_raise(kwargs):
    args = dict(key=jax.random.key(0), num_classes=4, dim=8) | kwargs
    with pytest.raises(ValueError):
        cbp.category_basis_prototypes(**args)


def test_simplex_etf_fallback_is_optimal_for_c_plus_one():
    with pytest.warns(UserWarning, match=r"max \|cos\| = 0\.1000"):
        w = cbp.category_basis_prototypes(jax.random.key(0), 11, 10, 2.0, allow_non_orthogonal=True)
    cos = _np_cos(w)
    off = cos[~np.eye(11, dtype=bool)]
    np.testing.assert_allclose(off, -1 / 10, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(w, np.float64), axis=1), 2.0, rtol=1e-5)


def test_repulsion_fallback_spreads_far_beyond_random():
    n, c = 200, 64
    with pytest.warns(UserWarning, match="max \\|cos\\|"):
        w = cbp.category_basis_prototypes(jax.random.key(1), n, c, 1.5, allow_non_orthogonal=True)
    spread = _max_offdiag_abs(_np_cos(w))
    random = _max_offdiag_abs(_np_cos(cbp.kaiming_normal(jax.random.key(1), n, c)))
    welch = math.sqrt((n - c) / (c * (n - 1)))  # lower bound on max |cos| of n lines in R^c
    assert welch <= spread <= 1.3 * welch < random / 3
    np.testing.assert_allclose(np.linalg.norm(np.asarray(w, np.float64), axis=1), 1.5, rtol=1e-5)


def test_class_separability_eq8():
    w = np.random.default_rng(0).normal(size=(6, 9))
    cos = _np_cos(w)
    expected = 0.5 * sum(cos[i, j] for i in range(6) for j in range(6) if i != j)
    np.testing.assert_allclose(cbp.class_separability(jnp.asarray(w, jnp.float32)), expected, 1e-5)
    assert (
        abs(
            float(
                cbp.class_separability(cbp.category_basis_prototypes(jax.random.key(0), 150, 256))
            )
        )
        < 1e-3
    )
    # Identical prototypes: every pair has cos 1, so CS = N (N - 1) / 2.
    np.testing.assert_allclose(cbp.class_separability(jnp.ones((5, 3))), 10.0, rtol=1e-6)


def test_demo_prints_the_geometry(capsys):
    """``python -m cbp_jax.demo``: orthogonal, equal-length prototypes and a finite OCCL."""
    demo.main(num_classes=12, dim=16)
    out = capsys.readouterr().out
    cos = float(out.split("i != j : ")[1].split()[0])
    assert cos < 1e-5 and "1.000000 .. 1.000000" in out
    assert "OCCL on random features" in out and "nan" not in out
