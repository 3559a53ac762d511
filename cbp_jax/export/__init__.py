"""Exports: a trained model leaves this code as a file another runtime serves.

One module per target, each with ``OUT_KIND`` (``"file"`` or ``"folder"``: what ``--out``
names), ``check(config)`` (raises ``ValueError`` before anything loads when the target cannot
hold the model) and ``run(segmenter, request) -> [lines]`` (writes ``request.out``, checks the
result in its runtime where it can, and returns what ``export.py`` prints):

- ``jax`` (``to_jax``): a serialized ``jax.export`` artifact; needs only jax to run.
- ``hf`` (``to_hf``): a transformers folder (``SegformerForSemanticSegmentation``, or
  ``UperNetForSemanticSegmentation`` with a ConvNeXt or Swin backbone).
- ``mmseg`` (``to_mmseg``): an mmsegmentation 1.x checkpoint (``.pth``) of any paper model,
  and the mmseg model config that loads it.
- ``onnx`` (``to_onnx``): an ONNX file of the ``jax`` target's network (B dynamic), checked
  in onnxruntime; float16 with ``Request.fp16``.

``TARGETS`` maps each name to its module; ``export.py --to NAME`` dispatches through it.
"""

from __future__ import annotations

from cbp_jax.export import to_hf, to_jax, to_mmseg, to_onnx
from cbp_jax.export.common import MissingDependencyError, Request
from cbp_jax.export.to_hf import (
    check_hf_exportable,
    export_hf,
    export_hf_segformer,
    hf_state_dict,
    segformer_config,
)
from cbp_jax.export.to_jax import export_jax, serving_fn
from cbp_jax.export.to_mmseg import export_mmseg, mmseg_config, mmseg_state_dict

TARGETS = {"jax": to_jax, "hf": to_hf, "mmseg": to_mmseg, "onnx": to_onnx}

__all__ = [
    "TARGETS",
    "MissingDependencyError",
    "Request",
    "check_hf_exportable",
    "export_hf",
    "export_hf_segformer",
    "export_jax",
    "export_mmseg",
    "hf_state_dict",
    "mmseg_config",
    "mmseg_state_dict",
    "segformer_config",
    "serving_fn",
]
