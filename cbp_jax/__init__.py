"""cbp_jax: frozen Category-Basis Prototypes and OCCL for semantic segmentation in JAX.

Import the pieces you need: ``from cbp_jax import prototypes, losses, classifier``.
"""

__version__ = "0.1.0"
