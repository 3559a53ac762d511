"""Builds CBP for ADE20K's 150 classes and prints their geometry and an OCCL value.

python -m cbp_jax.demo
"""

import jax
import jax.numpy as jnp

from cbp_jax import losses
from cbp_jax import prototypes as cbp


def main(num_classes: int = 150, dim: int = 256, length: float = 1.0) -> None:
    key_w, key_f, key_y = jax.random.split(jax.random.key(0), 3)
    w = cbp.category_basis_prototypes(key_w, num_classes, dim, length)
    norms = jnp.linalg.norm(w, axis=-1)
    learned_like = cbp.kaiming_normal(key_w, num_classes, dim)
    print(f"CBP for ADE20K: W {w.shape}, length T = {length}")
    print(f"  max |cos(w_i, w_j)|, i != j : {float(cbp.max_abs_cosine(w)):.2e}")
    print(f"  norms                       : {float(norms.min()):.6f} .. {float(norms.max()):.6f}")
    print(f"  class separability (Eq. 8)  : {float(cbp.class_separability(w)):.2e}")
    print(f"  (random Kaiming rows: max |cos| {float(cbp.max_abs_cosine(learned_like)):.3f})")
    features = jax.random.normal(key_f, (4, 32, 32, dim))
    labels = jax.random.randint(key_y, (4, 32, 32), 0, 20)
    terms = losses.occl_terms(features, labels, w)
    total = losses.occl(features, labels, w)
    print(
        f"OCCL on random features (B=4, 32x32, 20 classes): {float(total):.4f} "
        f"(centroid {float(terms.centroid):.4f}, category {float(terms.category):.4f})"
    )


if __name__ == "__main__":
    main()
