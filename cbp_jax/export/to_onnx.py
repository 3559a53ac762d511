"""``--to onnx``: an ONNX file of the whole-image network, for onnxruntime and other runtimes.

The contract of ``--to jax`` (``to_jax.serving_fn``, reused here): uint8 RGB (B, H, W, 3) in,
float32 logits (B, H, W, N) out, the normalization inside and the logits resized to the
input, weights baked in as initializers. A JSON file beside it says what goes in and out,
the class names, the palette and the opset.

Dynamic sizes: B is dynamic (the graph's input is ``["B", H, W, 3]``). H and W are fixed
(``--height`` / ``--width``, default ``config.data.crop_size``) for every family, because
the network's shapes are computed from them in Python at trace time: the bilinear resizes
(``cbp_jax.resize``) build their taps in NumPy from the concrete sizes (SegFormer's 1/4-scale
fusion and every family's final upsampling), UperNet's pyramid pooling builds its
adaptive-pooling bins the same way (ConvNeXt, Swin), and Swin pads to whole windows and
builds its shifted-window mask from the padded size. A graph symbolic in H and W would need
those written as functions of symbolic sizes.

How: JAX stages the serving function to a jaxpr, which ``jax2onnx`` translates primitive by
primitive after :func:`export_forms` has inlined every call and custom-derivative function,
unrolled ``lax.scan`` (``scan_blocks``) and rewritten what ``jax2onnx`` 0.12.5 lowers wrongly
(a pad on a symbolic batch, ResNet's max pool; same values: tested). Staging first matters:
``jax2onnx`` substitutes its own lowerings for ``jax.nn.softmax`` and Flax modules while it
traces, and its softmax takes one axis where MiT's attention normalizes over two (keys on an
(h, w) grid). Depthwise convs are traced as XLA's grouped
conv (``dwconv_impl="xla"``: ONNX ``Conv`` with ``group=C``); the default 'auto' picks a
formulation per platform with ``lax.platform_dependent``, which has no ONNX form. Both
formulations give the same values (tests/test_models.py).

``fp16`` (:func:`to_float16`): onnxconverter-common's float16 conversion of the float32
graph, weights and activations in float16, except the reductions and what is computed from
their results alone (LayerNorm's mean, variance and 1/std, softmax's max and sum), which
stay float32 as ``config.eval.dtype="float16"`` keeps them: a float16 sum of squares over
1024 channels overflows once their RMS passes 8. The output stays float32. ``jax2onnx``
0.12.5 does not translate a float16 jaxpr correctly (it drops float16 -> float32 casts), so
the conversion works on the ONNX graph. Measured with onnxruntime 1.32's CPU provider on the
five tiny random models of tests/test_export_onnx.py (three random 64 x 96 images, largest
logits 2.2 to 4.9): float16 logits within 5.3e-3 of ours, argmax equal on at least 99.89%
of the pixels (float32: within 3.5e-6, argmax equal everywhere). That provider runs the
float16 ops it has no kernel for in float32 between casts; a GPU provider computing in
float16 throughout may differ more (not measured here).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.extend import core

from cbp_jax import resize, storage
from cbp_jax.data import transforms
from cbp_jax.export.common import MissingDependencyError, Request
from cbp_jax.export.to_jax import serving_fn
from cbp_jax.predict import Segmenter

OPSET = 18  # ONNX 1.13 (2022): reductions take their axes as an input; onnxruntime >= 1.14
INPUT, OUTPUT = "images", "logits"
FIXED_HW_REASON = (
    "H and W are fixed: the bilinear resizes, UperNet's pyramid pooling and Swin's window "
    "padding and shifted-window mask are computed from the concrete sizes at export time"
)


def _onnx_libraries():
    """``(jax2onnx, onnxruntime)``, or MissingDependencyError naming the install."""
    try:
        import jax2onnx
        import onnxruntime
    except ImportError as e:
        raise MissingDependencyError(
            f'Exporting to ONNX needs jax2onnx and onnxruntime ({e}): pip install -e ".[onnx]".'
        ) from e
    return jax2onnx, onnxruntime


# ----------------------------------------------------------------------------- formulations


def pad_by_concatenation(x: jax.Array, value: jax.Array, padding_config) -> jax.Array:
    """``lax.pad`` without interior padding as concatenations with constant blocks
    (``jax2onnx``'s Pad lowering fails on a symbolic batch dimension)."""
    if any(interior or lo < 0 or hi < 0 for lo, hi, interior in padding_config):
        return jax.lax.pad(x, value, padding_config)
    value = jax.lax.convert_element_type(value, x.dtype)
    for axis, (lo, hi, _) in enumerate(padding_config):
        block = lambda n, x=x, axis=axis: jax.lax.broadcast_in_dim(
            value, (*x.shape[:axis], n, *x.shape[axis + 1 :]), ()
        )  # jnp.full: jax2onnx's lowering fails on symbolic shapes
        parts = [block(lo)] * bool(lo) + [x] + [block(hi)] * bool(hi)
        x = jnp.concatenate(parts, axis) if len(parts) > 1 else x
    return x


def max_pool_by_slices(x: jax.Array, params: dict) -> jax.Array:
    """``lax.reduce_window`` max (``params``: its eqn's) as the maximum of strided slices of
    the -inf padded input: ``jax2onnx`` lowers a (B, H, W, C) window to a 4-D MaxPool, which
    onnxruntime lacks. A dilated window is bound unchanged."""
    if any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"])):
        return jax.lax.reduce_window_max_p.bind(x, **params)
    windows, strides = params["window_dimensions"], params["window_strides"]
    x = pad_by_concatenation(x, jnp.array(-jnp.inf, x.dtype), [(*p, 0) for p in params["padding"]])
    out = None
    for offsets in itertools.product(*(range(k) for k in windows)):
        s = x
        for axis, (o, k, stride) in enumerate(zip(offsets, windows, strides, strict=True)):
            if k > 1 or stride > 1:
                n = (x.shape[axis] - k) // stride + 1
                s = jax.lax.slice_in_dim(s, o, o + stride * (n - 1) + 1, stride, axis)
        out = s if out is None else jnp.maximum(out, s)
    return out


def unrolled_scan(eqn, *args) -> list:
    """``lax.scan`` (``scan_blocks``' stacked blocks) as its body applied ``length`` times,
    so that :func:`export_forms` reaches the body's primitives too."""
    p = eqn.params
    n_consts, n_carry, body = p["num_consts"], p["num_carry"], p["jaxpr"]
    consts, rest = args[:n_consts], args[n_consts:]
    carry, xs = rest[:n_carry], rest[n_carry:]
    steps = range(p["length"])
    ys = []
    for i in reversed(steps) if p["reverse"] else steps:
        outs = export_forms(body.jaxpr, body.consts, *consts, *carry, *(x[i] for x in xs))
        carry, y = outs[:n_carry], outs[n_carry:]
        ys.append(y)
    ys = ys[::-1] if p["reverse"] else ys
    return [*carry, *(jnp.stack(column) for column in zip(*ys, strict=True))]


_FORMS = {
    "pad": lambda eqn, x, value: [pad_by_concatenation(x, value, eqn.params["padding_config"])],
    "reduce_window_max": lambda eqn, x: [max_pool_by_slices(x, eqn.params)],
    "scan": unrolled_scan,
}
_CALLS = frozenset(("jit", "pjit", "closed_call", "core_call", "remat2", "custom_jvp_call",
                    "custom_vjp_call"))  # fmt: skip


def export_forms(jaxpr: core.Jaxpr, consts: Sequence, *args) -> list:
    """Evaluates ``jaxpr`` with calls and custom-derivative functions inlined (their primal
    computation; an export has no gradients) and ``_FORMS``' primitives rewritten."""
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    read = lambda v: v.val if isinstance(v, core.Literal) else env[v]
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _FORMS:
            outs = _FORMS[name](eqn, *ins)
        elif name in _CALLS:
            inner = eqn.params["call_jaxpr" if "call_jaxpr" in eqn.params else "jaxpr"]
            closed = isinstance(inner, core.ClosedJaxpr)
            outs = export_forms(*((inner.jaxpr, inner.consts) if closed else (inner, ())), *ins)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


# ----------------------------------------------------------------------------- conversion


def export_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` whose network computes in float32 (``--fp16`` converts the ONNX
    graph) with XLA's grouped conv as the depthwise conv (MiT, ConvNeXt)."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.eval.dtype = "float32"  # jax2onnx 0.12.5 mistranslates float16 jaxprs
    if config.model.name.startswith("segformer_") or "convnext" in config.model.name:
        config.model.dwconv_impl = "xla"
    return config


def onnx_model(segmenter: Segmenter, size_hw: tuple[int, int]):
    """The float32 ``onnx.ModelProto`` of ``to_jax.serving_fn`` at (H, W) = ``size_hw``, B
    dynamic.

    Raises:
      ValueError: a side of ``size_hw`` is under 32 (the encoder's stride).
      MissingDependencyError: jax2onnx or onnxruntime is missing.
    """
    jax2onnx, _ = _onnx_libraries()
    h, w = (int(v) for v in size_hw)
    if min(h, w) < 32:
        raise ValueError(f"size {size_hw}: each side must be at least 32 (the encoder's stride).")
    graph = Segmenter(export_config(segmenter.config), segmenter.state, device=segmenter.device)
    spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("B")[0], h, w, 3), jnp.uint8)
    staged = jax.make_jaxpr(serving_fn(graph, (h, w)))(spec)
    with contextlib.redirect_stdout(io.StringIO()):  # jax2onnx prints debug lines
        return jax2onnx.to_onnx(
            lambda images: export_forms(staged.jaxpr, staged.consts, images)[0],
            [spec],
            model_name=segmenter.config.model.name,
            opset=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
        )


_REDUCTIONS = frozenset(
    ("ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")
)


def float32_nodes(graph) -> list[str]:
    """Names of the nodes a float16 conversion keeps in float32: casts to float32 (the
    converter cannot retarget them), reductions, and the nodes computing only from reduction
    results and constants (statistics such as a LayerNorm's 1/std), up to the first node
    that meets an activation. ``graph.node`` is in topological order, as ONNX requires."""
    floats = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
    ignored = {t.name for t in graph.initializer} | {
        v.name for v in graph.value_info if v.type.tensor_type.elem_type not in (0, *floats)
    }  # constants and shape arithmetic
    statistics: set[str] = set()
    keep = []
    for node in graph.node:
        inputs = [i for i in node.input if i and i not in ignored]
        derived = bool(inputs) and all(i in statistics for i in inputs)
        if node.op_type in _REDUCTIONS or derived:
            statistics.update(node.output)
            keep.append(node.name)
        elif node.op_type == "Cast" and ("to", 1) in {(a.name, a.i) for a in node.attribute}:
            keep.append(node.name)  # to FLOAT
    return keep


def to_float16(model):
    """``model`` with float16 weights and activations, except :func:`float32_nodes`; the
    output stays float32.

    Raises:
      MissingDependencyError: onnxconverter-common is missing.
    """
    try:
        from onnxconverter_common import float16
    except ImportError as e:
        raise MissingDependencyError(
            f'--fp16 needs onnxconverter-common ({e}): pip install -e ".[onnx]".'
        ) from e
    with warnings.catch_warnings():  # "the float32 number 1e-09 will be truncated to 1e-07"
        warnings.simplefilter("ignore", UserWarning)
        return float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=float32_nodes(model.graph)
        )


def onnx_logits(model: bytes, images: np.ndarray) -> np.ndarray:
    """Runs a serialized export with onnxruntime (CPU): uint8 (B, H, W, 3) -> (B, H, W, N)."""
    _, onnxruntime = _onnx_libraries()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: float16 graphs log a line per unfolded node
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: np.asarray(images, np.uint8)})[0]


def reference_logits(segmenter: Segmenter, images: np.ndarray) -> np.ndarray:
    """Our logits of uint8 (B, H, W, 3) at the input size: ``Segmenter.network`` on the
    normalized images, resized as evaluation's whole mode does."""
    logits = segmenter.network(transforms.normalize(np.asarray(images)))
    return np.asarray(resize.resize_bilinear(logits, images.shape[1:3]))


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """``{"max_abs_logit_diff", "argmax_agreement"}`` of two (B, H, W, N) logit arrays."""
    return {
        "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
    }


def export_onnx(
    segmenter: Segmenter,
    path: str,
    *,
    size_hw: tuple[int, int],
    fp16: bool = False,
    check_batch: int = 2,
) -> dict:
    """Writes the ONNX file to ``path`` (and ``path + ".json"``), then runs the written file
    with onnxruntime on a fixed random batch of ``check_batch`` images and compares its
    logits with :func:`reference_logits`.

    Returns:
      ``{"path", "max_abs_logit_diff", "argmax_agreement"}``.

    Raises:
      ValueError: a side of ``size_hw`` is under 32.
      MissingDependencyError: jax2onnx, onnxruntime or (``fp16``) onnxconverter-common is
        missing.
    """
    model = onnx_model(segmenter, size_hw)
    if fp16:
        model = to_float16(model)
    h, w = (int(v) for v in size_hw)
    file = storage.path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(model.SerializeToString())

    images = np.random.default_rng(0).integers(0, 256, (check_batch, h, w, 3), np.uint8)
    check = compare(reference_logits(segmenter, images), onnx_logits(file.read_bytes(), images))
    n = segmenter.num_classes
    meta = {
        "format": "ONNX (load: onnxruntime.InferenceSession(path))",
        "opset": OPSET,
        "input": {
            "name": INPUT,
            "dtype": "uint8",
            "shape": ["B", h, w, 3],
            "layout": "RGB, 0..255; resize images to this size first",
        },
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": ["B", h, w, n],
            "meaning": "logits; argmax over the last axis gives the class ids",
        },
        "dynamic": {"batch": True, "height_width": False, "why": FIXED_HW_REASON},
        "precision": "float16 (statistics float32), float32 output" if fp16 else "float32",
        "check": {"images": check_batch, **check},
        "model": segmenter.config.model.name,
        "weights": segmenter.loaded_from,
        "class_names": list(segmenter.class_names),
        "palette": np.asarray(segmenter.palette).tolist(),
    }
    storage.write_text(os.fspath(path) + ".json", json.dumps(meta, indent=1))
    return {"path": path, **check}


OUT_KIND = "file"  # what --out names


def check(config) -> None:
    """Every model converts to ONNX (at a fixed H, W): nothing to refuse."""
    del config


def run(segmenter: Segmenter, request: Request) -> list[str]:
    """``export.py --to onnx``: writes the file at ``request.size_hw`` (default the crop
    size), float16 with ``request.fp16``, and reports onnxruntime's difference from our
    logits."""
    size = request.size_hw or tuple(segmenter.config.data.crop_size)
    result = export_onnx(segmenter, request.out, size_hw=size, fp16=request.fp16)
    precision = "float16" if request.fp16 else "float32"
    return [
        f"{request.out}: ONNX opset {OPSET}, {precision}, uint8 (B, {size[0]}, {size[1]}, 3) "
        f"-> float32 logits (B, {size[0]}, {size[1]}, {segmenter.num_classes})",
        f"onnxruntime's logits differ from ours by at most {result['max_abs_logit_diff']:.2g}; "
        f"argmax agrees on {100 * result['argmax_agreement']:.2f}% of the check pixels",
    ]
