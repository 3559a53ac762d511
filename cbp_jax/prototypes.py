"""Category-Basis Prototypes (CBP): the paper's Algorithm 1, and the class-separability metric.

The prototypes are a constant ``(N, C)`` matrix of mutually orthogonal rows of equal L2
norm ``length``: a Kaiming-normal draw, orthogonalized by modified Gram–Schmidt with one
re-orthogonalization pass ("twice is enough") inside ``jax.jit``, then equalized.

    >>> w = category_basis_prototypes(jax.random.key(0), num_classes=150, dim=256)
    >>> w.shape
    (150, 256)
"""

import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax

INITS = ("equal_ortho", "ortho", "equal")

_HIGHEST = lax.Precision.HIGHEST  # TF32 / bf16 passes would cost orthogonality on GPU/TPU.


def kaiming_normal(key: jax.Array, num_classes: int, dim: int) -> jax.Array:
    """Kaiming-normal ``(num_classes, dim)`` draw: fan-in ``dim``, std ``sqrt(2 / dim)``."""
    return jax.random.normal(key, (num_classes, dim), jnp.float32) * math.sqrt(2.0 / dim)


def _mgs_pass(w: jax.Array) -> jax.Array:
    """One right-looking modified Gram–Schmidt pass over the rows of ``w`` ``(N, C)``.

    Step ``i`` removes the direction of (already orthogonalized) row ``i`` from every later
    row, a masked rank-1 update, so the loop runs N vectorized steps, not N^2/2 tiny ones.
    Rows keep their residual norms.
    """
    rows = jnp.arange(w.shape[0])

    def step(i, w):
        q = w[i] / jnp.linalg.norm(w[i])
        coeff = jnp.dot(w, q, precision=_HIGHEST)  # (N,)
        later = (rows > i)[:, None]
        return w - jnp.where(later, coeff[:, None] * q[None, :], 0.0)

    return lax.fori_loop(0, w.shape[0], step, w)


@jax.jit
def gram_schmidt(w: jax.Array) -> jax.Array:
    """Orthogonalizes the rows of ``w`` ``(N, C)``, N <= C, in order; norms are the residuals.

    Modified Gram–Schmidt run twice: float32 rows end up orthogonal to ~1e-7 in cosine.
    """
    w = w.astype(jnp.float32)
    return _mgs_pass(_mgs_pass(w))


def equalize_rows(w: jax.Array, length: float | jax.Array) -> jax.Array:
    """Scales every row of ``w`` ``(N, C)`` to L2 norm ``length``."""
    return w * (length / jnp.linalg.norm(w, axis=-1, keepdims=True))


def cosine_matrix(w: jax.Array) -> jax.Array:
    """Pairwise cosine similarities ``(N, N)`` between the rows of ``w`` ``(N, C)``."""
    u = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    return jnp.dot(u, u.T, precision=_HIGHEST)


def max_abs_cosine(w: jax.Array) -> jax.Array:
    """Largest |cos| between two distinct rows of ``w`` ``(N, C)`` (0 for a single row)."""
    cos = cosine_matrix(w)
    return jnp.max(jnp.abs(cos - jnp.diag(jnp.diag(cos))))


def class_separability(w: jax.Array) -> jax.Array:
    """Eq. 8: ``0.5 * sum_{i != j} cos(w_i, w_j)``; 0 for CBP, 75.8 for a learned classifier."""
    cos = cosine_matrix(w)
    return 0.5 * (jnp.sum(cos) - jnp.trace(cos))


def category_basis_prototypes(
    key: jax.Array,
    num_classes: int,
    dim: int,
    length: float = 1.0,
    *,
    init: str = "equal_ortho",
    allow_non_orthogonal: bool = False,
) -> jax.Array:
    """Builds the CBP matrix (Algorithm 1).

    Args:
      key: PRNG key; the result is a deterministic function of it.
      num_classes: N, the number of categories.
      dim: C, the feature width the classifier sees.
      length: T, the common L2 norm of every prototype (paper: 1 for SegFormer, 2-3 for the
        B0 ablations, 0.3 for FCN on COCO-Stuff).
      init: Table 5 ablation: ``"equal_ortho"`` (default: orthogonal rows of norm T),
        ``"ortho"`` (orthogonal, norms as Gram–Schmidt leaves them; ``length`` unused),
        ``"equal"`` (Kaiming rows scaled to T, not orthogonalized).
      allow_non_orthogonal: when N > C, instead of raising, return N equal-norm vectors
        spread as far apart as C dimensions allow (simplex ETF for N = C + 1, numerical
        repulsion beyond) and warn with the max |cos| reached.

    Returns:
      ``(num_classes, dim)`` float32 prototypes.
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} is not one of {INITS}.")
    if int(num_classes) < 1 or int(dim) < 1:
        raise ValueError(f"num_classes and dim must be >= 1; got N={num_classes}, C={dim}.")
    if not (math.isfinite(length) and length > 0):
        raise ValueError(f"length must be a finite positive number; got {length}.")
    num_classes, dim = int(num_classes), int(dim)
    w = kaiming_normal(key, num_classes, dim)
    if init == "equal":
        return equalize_rows(w, length)
    if num_classes > dim:
        if not allow_non_orthogonal:
            raise ValueError(
                f"Cannot build {num_classes} mutually orthogonal prototypes in {dim} dimensions "
                f"(N={num_classes} > C={dim}). Make the features at least {num_classes} wide "
                f"(e.g. a decode-head width >= {num_classes}), or pass "
                "allow_non_orthogonal=True to spread equal-length vectors as far apart as "
                f"{dim} dimensions allow."
            )
        if init == "ortho":
            raise ValueError(
                f"init='ortho' needs N <= C (got N={num_classes}, C={dim}); "
                "use init='equal_ortho' with allow_non_orthogonal=True."
            )
        return spread_prototypes(key, num_classes, dim, length)
    w = gram_schmidt(w)
    return w if init == "ortho" else equalize_rows(w, length)


def simplex_etf(key: jax.Array, num_classes: int, dim: int, length: float = 1.0) -> jax.Array:
    """N equal-norm vectors with pairwise cosine exactly -1/(N-1), for N <= C + 1.

    The rows of the centred identity ``I - 11^T/N`` live in an (N-1)-dimensional subspace;
    their coordinates in an orthonormal basis of it are rotated into C dimensions at random.
    """
    if num_classes > dim + 1:
        raise ValueError(f"A simplex ETF of N={num_classes} needs C >= N - 1; got C={dim}.")
    n = num_classes
    centred = jnp.eye(n) - 1.0 / n
    basis = jnp.linalg.eigh(centred)[1][:, 1:]  # eigenvalue 0 first, then n-1 ones.
    coords = centred @ basis  # (n, n-1)
    rotation = jnp.linalg.qr(jax.random.normal(key, (dim, n - 1)))[0]  # (dim, n-1)
    return equalize_rows(coords @ rotation.T, length).astype(jnp.float32)


@jax.jit
def _repel(w: jax.Array) -> jax.Array:
    """Spreads the rows of ``w`` ``(N, C)`` as lines on the unit sphere.

    Projected descent on a smooth maximum (log-sum-exp at temperature 300) of the squared
    pairwise cosines, with a linearly decaying step: max |cos| gets within ~25 % of the
    Welch bound sqrt((N - C) / (C (N - 1))) for N of a few hundred.
    """
    n, steps = w.shape[0], 1000
    off_diagonal = ~jnp.eye(n, dtype=bool)

    def smooth_max_cos2(u):
        cos2 = jnp.dot(u, u.T, precision=_HIGHEST) ** 2
        return jax.nn.logsumexp(jnp.where(off_diagonal, 300.0 * cos2, -jnp.inf)) / 300.0

    def step(i, u):
        g = jax.grad(smooth_max_cos2)(u)
        g = g - jnp.sum(g * u, axis=-1, keepdims=True) * u  # tangent to the sphere
        lr = 0.1 * (1.0 - i / steps) + 1e-4
        u = u - lr * g / (jnp.max(jnp.linalg.norm(g, axis=-1)) + 1e-12)
        return u / jnp.linalg.norm(u, axis=-1, keepdims=True)

    u = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    return lax.fori_loop(0, steps, step, u)


def spread_prototypes(key: jax.Array, num_classes: int, dim: int, length: float = 1.0):
    """Fallback for N > C: equal-norm vectors spread on the sphere; warns with the max |cos|.

    ``N = C + 1`` gives the optimal simplex ETF; larger N uses numerical repulsion.
    """
    if num_classes <= dim + 1:
        w = simplex_etf(key, num_classes, dim, length)
    else:
        w = equalize_rows(_repel(kaiming_normal(key, num_classes, dim)), length)
    warnings.warn(
        f"N={num_classes} prototypes in C={dim} dimensions cannot be orthogonal; "
        f"spread them instead: max |cos| = {float(max_abs_cosine(w)):.4f}.",
        stacklevel=3,
    )
    return w
