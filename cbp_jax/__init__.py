"""cbp_jax: frozen Category-Basis Prototypes and OCCL for semantic segmentation in JAX.

The pieces to use in a Flax model of your own::

    from cbp_jax import CBPClassifier, occl_loss, pixel_cross_entropy, update_prototypes

- :class:`CBPClassifier`: logits against constant, mutually orthogonal, equal-length
  prototypes (and the paper's ablation variants); :func:`category_basis_prototypes` builds
  the ``(N, C)`` matrix itself.
- :func:`occl_loss` (Eq. 6) with its parts :func:`occl_terms`, :func:`view_centroids`,
  :func:`category_centroids`; :func:`pixel_cross_entropy`; :func:`nearest_downsample` for
  labels at the feature resolution. All take ``axis_name`` under ``shard_map`` / ``pmap``.
- :func:`update_prototypes`: the after-step update of the ``"ema"`` / ``"penalty"`` variants.
- :func:`create` (SegFormer, UperNet, FCN models), :func:`load_pretrained` (PyTorch
  checkpoints), :class:`Segmenter` (inference on image files from a run's workdir).

Names load on first use, so that ``cbp_jax.cpu`` can configure XLA before JAX starts.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "CBPClassifier": "cbp_jax.classifier",
    "update_prototypes": "cbp_jax.classifier",
    "category_basis_prototypes": "cbp_jax.prototypes",
    "pixel_cross_entropy": "cbp_jax.losses",
    "occl_terms": "cbp_jax.losses",
    "view_centroids": "cbp_jax.losses",
    "category_centroids": "cbp_jax.losses",
    "nearest_downsample": "cbp_jax.losses",
    "create": "cbp_jax.models",
    "load_pretrained": "cbp_jax.weights",
    "Segmenter": "cbp_jax.predict",
}
_RENAMED = {"occl_loss": ("cbp_jax.losses", "occl")}

__all__ = sorted([*_PUBLIC, *_RENAMED])


def __getattr__(name: str):
    if name in _PUBLIC:
        module, attr = _PUBLIC[name], name
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
    else:
        # Submodules (``cbp_jax.losses``) resolve through the import system, not here.
        raise AttributeError(f"module 'cbp_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
