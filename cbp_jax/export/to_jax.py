"""``--to jax``: a serialized ``jax.export`` artifact of the whole-image network.

``export_jax``: the whole-image network at a fixed (H, W), uint8 RGB (B, H, W, 3) in,
float32 logits (B, H, W, N) out (normalization inside, logits resized to the input as
evaluation's whole mode does), B symbolic. The weights are baked in as constants, so the
file is the model: loading it needs only ``jax`` (``jax.export.deserialize``) and no pytree
types, weights file or model code, at the cost of one export per set of weights. Slide
windows and multi-scale / flip are host-side loops around such a network
(``cbp_jax.inference``); this artifact is the single-view network. A JSON file beside it
says what goes in and out, the class names and the palette.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cbp_jax import resize, storage, train_lib
from cbp_jax.data.transforms import MEAN, STD
from cbp_jax.export.common import MissingDependencyError, Request
from cbp_jax.predict import Segmenter


def serving_fn(segmenter: Segmenter, size_hw: tuple[int, int]):
    """``f(images uint8 (B, H, W, 3)) -> logits float32 (B, H, W, N)`` with the weights as
    constants: the test-time normalization, the network (eval mode, ``config.eval.dtype``)
    and the bilinear resize back to (H, W)."""
    state = jax.device_get(segmenter.state)  # NumPy: lowered as constants
    predict = train_lib.make_predict_fn(segmenter.graphdef)
    mean = np.asarray(MEAN, np.float32)
    inv_std = 1.0 / np.asarray(STD, np.float32)  # as data.transforms.normalize

    def serve(images: jax.Array) -> jax.Array:
        x = (images.astype(jnp.float32) - mean) * inv_std
        return resize.resize_bilinear(predict(state, x), size_hw)

    return serve


def export_jax(
    segmenter: Segmenter,
    path: str,
    *,
    size_hw: tuple[int, int],
    platforms: Sequence[str] | None = None,
    batch_size: int | None = None,
) -> jax.export.Exported:
    """Serializes the network to ``path`` (and ``path + ".json"``).

    Args:
      segmenter: the model.
      path: the file to write (local or ``gs://``).
      size_hw: the fixed input (H, W).
      platforms: e.g. ``("cpu", "cuda")``; default the current backend's.
      batch_size: a fixed batch; None makes it symbolic (any B).

    Returns:
      The ``jax.export.Exported``.
    """
    h, w = (int(v) for v in size_hw)
    if min(h, w) < 32:
        raise ValueError(f"size {size_hw}: each side must be at least 32 (the encoder's stride).")
    batch = jax.export.symbolic_shape("b")[0] if batch_size is None else int(batch_size)
    spec = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8)
    try:
        import flatbuffers  # noqa: F401 -- what Exported.serialize needs
    except ImportError as e:
        raise MissingDependencyError(
            'Serializing a jax.export artifact needs flatbuffers: pip install -e ".[export]" '
            "(or pip install flatbuffers); loading it needs the same."
        ) from e
    exported = jax.export.export(
        jax.jit(serving_fn(segmenter, (h, w))),
        platforms=tuple(platforms) if platforms else None,
    )(spec)
    file = storage.path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(exported.serialize())
    n = segmenter.num_classes
    meta = {
        "format": "jax.export (load: jax.export.deserialize(bytearray(open(path, 'rb').read())))",
        "input": {
            "dtype": "uint8",
            "shape": ["B" if batch_size is None else batch, h, w, 3],
            "layout": "RGB, 0..255; resize images to this size first",
        },  # fmt: skip
        "output": {
            "dtype": "float32",
            "shape": ["B" if batch_size is None else batch, h, w, n],
            "meaning": "logits; argmax over the last axis gives the class ids",
        },  # fmt: skip
        "platforms": list(exported.platforms),
        "model": segmenter.config.model.name,
        "weights": segmenter.loaded_from,
        "class_names": list(segmenter.class_names),
        "palette": np.asarray(segmenter.palette).tolist(),
    }
    storage.write_text(os.fspath(path) + ".json", json.dumps(meta, indent=1))
    return exported


OUT_KIND = "file"  # what --out names


def check(config) -> None:
    """Every model lowers to a ``jax.export`` artifact: nothing to refuse."""
    del config


def run(segmenter: Segmenter, request: Request) -> list[str]:
    """``export.py --to jax``: writes the artifact at ``request.size_hw`` (default the
    crop size) for ``request.platforms``."""
    config = segmenter.config
    size = request.size_hw or tuple(config.data.crop_size)
    exported = export_jax(segmenter, request.out, size_hw=size, platforms=request.platforms)
    return [
        f"{request.out}: uint8 (B, {size[0]}, {size[1]}, 3) -> logits "
        f"{exported.out_avals[0].str_short()}, for {', '.join(exported.platforms)}"
    ]
