"""A model's size: parameter count and forward FLOPs from XLA's cost analysis.

XLA counts a multiply-add as 2 FLOPs; the paper's "GFLOPs" (mmcv) count multiply-adds, so
GMACs = XLA FLOPs / 2. :func:`forward_flops` analyses the lowered (not yet compiled)
program, which takes a fraction of a compile and agrees with the compiled program's count
to within 0.5% (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cbp_jax import train_lib


def parameter_count(params: Any) -> int:
    """Number of scalars in the parameter pytree ``params`` (arrays or shape structs)."""
    return int(sum(leaf.size for leaf in jax.tree.leaves(params)))


def xla_flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float:
    """FLOPs of a lowered or compiled program from XLA's cost analysis (NaN when the
    backend gives none)."""
    cost = stage.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    return float((cost or {}).get("flops", float("nan")))


def forward_flops(
    graphdef: nnx.GraphDef, params: Any, model_state: Any, image_size: tuple[int, int]
) -> float:
    """FLOPs of one eval-mode forward pass of one ``(1, H, W, 3)`` image.

    Args:
      graphdef, params, model_state: the model, as ``train_lib.split_model`` gives it
        (arrays or ``jax.ShapeDtypeStruct``: nothing is computed).
      image_size: ``(H, W)``.
    """
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        {"params": params, "model_state": model_state},
    )
    image = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
    return xla_flops(jax.jit(train_lib.make_predict_fn(graphdef)).lower(abstract, image))
