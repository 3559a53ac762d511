"""--to onnx: onnxruntime runs the file and gives our logits for every paper family (float32
within 1e-4, float16 within the stated tolerance) at any batch; the jaxpr formulations the
export substitutes compute what JAX computes; float16 keeps reduction statistics in float32;
export.py writes the file and its JSON from a workdir."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from export_helpers import model_workdir, random_state, tiny_config, tiny_segmenter
from jax.extend import core
from onnx.reference import ReferenceEvaluator
from onnxconverter_common import float16

from cbp_jax import predict
from cbp_jax.export import to_onnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, W = 64, 96  # not square; Swin pads its 16 x 24 first maps to whole 12-pixel windows
FP16_ATOL, FP16_AGREEMENT = 1e-2, 0.99  # measured: <= 5.3e-3, >= 0.9989 (to_onnx's docstring)


def _images(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, H, W, 3), np.uint8)


def _primitives(jaxpr) -> set[str]:
    """The primitive names of ``jaxpr`` and of every jaxpr inside it."""
    inner = (_primitives(j) for j in core.subjaxprs(jaxpr))
    return {e.primitive.name for e in jaxpr.eqns}.union(*inner)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "classifier", "overrides"),
    [
        ("ade20k_mit_b0", "cbp", {}),  # SegFormer, mmseg head
        ("ade20k_mit_b0", "linear", {"head": "mlp"}),  # SegFormer, HF/NVlabs head
        ("ade20k_convnext_base", "cbp", {}),
        ("ade20k_swin_base", "linear", {"depths": (2, 2, 2, 2)}),  # shifted windows too
        ("ade20k_fcn_resnet101", "cbp", {}),  # the stem's max pool
    ],
)
def test_onnx_export_gives_our_logits_at_any_batch(tmp_path, name, classifier, overrides):
    """float32: the export's own check on 3 images, then 1 and 3 images through the same file
    within 1e-4 of ours; the input is ["B", H, W, 3]. float16 (``to_float16`` of that graph):
    float32 logits within FP16_ATOL of ours, the argmax equal on FP16_AGREEMENT of pixels."""
    seg = tiny_segmenter(name, classifier, seed=1, **overrides)
    path = str(tmp_path / "model.onnx")
    result = to_onnx.export_onnx(seg, path, size_hw=(H, W), check_batch=3)
    assert result["max_abs_logit_diff"] <= 1e-4 and result["argmax_agreement"] == 1.0

    model = onnx.load(path)
    (graph_input,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert (graph_input.name, dims) == ("images", ["B", H, W, 3])
    images = _images(3, seed=4)
    ours = to_onnx.reference_logits(seg, images)  # one image at a time: ours[:1] is image 0's
    assert ours.shape == (3, H, W, seg.num_classes) and len(np.unique(ours.argmax(-1))) >= 2
    for batch in (1, 3):
        theirs = to_onnx.onnx_logits(model.SerializeToString(), images[:batch])
        np.testing.assert_allclose(theirs, ours[:batch], rtol=0, atol=1e-4)

    half = to_onnx.onnx_logits(to_onnx.to_float16(model).SerializeToString(), images)
    check = to_onnx.compare(ours, half)
    assert half.dtype == np.float32 and check["max_abs_logit_diff"] <= FP16_ATOL, check
    assert check["argmax_agreement"] >= FP16_AGREEMENT, check


def test_export_forms_compute_what_jax_computes():
    """Padding (the rewritten pad), ResNet's 3x3/2 max pool, a scan over stacked weights and
    a custom_vjp inside jit: the inlined, rewritten evaluation equals JAX's, bit for bit, and
    none of the rewritten primitives is left."""

    @jax.custom_vjp
    def double(x):
        return 2 * x

    double.defvjp(lambda x: (double(x), None), lambda _, g: (2 * g,))

    def f(x, w):
        x = jnp.pad(x, ((0, 0), (1, 2), (0, 3), (0, 0)), constant_values=-1.5)
        x = jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
        )
        x, _ = jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)
        return jax.jit(double)(x)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 9, 8, 4)).astype(np.float32)
    w = rng.normal(size=(3, 4, 4)).astype(np.float32)
    staged = jax.make_jaxpr(f)(x, w)
    replaced = {"pad", "reduce_window_max", "scan", "jit", "custom_vjp_call"}
    assert replaced <= _primitives(staged.jaxpr)
    rewritten = jax.make_jaxpr(lambda *a: to_onnx.export_forms(staged.jaxpr, staged.consts, *a))
    assert not _primitives(rewritten(x, w).jaxpr) & replaced
    got = to_onnx.export_forms(staged.jaxpr, staged.consts, x, w)[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(f(x, w)))


def _layer_norm_graph(channels: int):
    """ONNX LayerNorm over the last axis as jax2onnx writes one: mean and variance as
    ReduceSum / ReduceSumSquare divided by C, 1/std as 1 / Sqrt(var + eps)."""
    from onnx import TensorProto, helper, numpy_helper

    const = lambda name, value: numpy_helper.from_array(np.asarray(value), name)  # noqa: E731
    nodes = [
        helper.make_node("ReduceSum", ["x", "axes"], ["sum"], name="sum"),
        helper.make_node("Div", ["sum", "c"], ["mean"], name="mean"),
        helper.make_node("Sub", ["x", "mean"], ["d"], name="centre"),
        helper.make_node("ReduceSumSquare", ["d", "axes"], ["ss"], name="ss"),
        helper.make_node("Div", ["ss", "c"], ["var"], name="var"),
        helper.make_node("Add", ["var", "eps"], ["var_eps"], name="var_eps"),
        helper.make_node("Sqrt", ["var_eps"], ["std"], name="std"),
        helper.make_node("Div", ["one", "std"], ["rstd"], name="rstd"),
        helper.make_node("Mul", ["d", "rstd"], ["y"], name="scale"),
    ]
    inits = [const("axes", np.array([-1], np.int64)), const("c", np.float32(channels)),
             const("eps", np.float32(1e-6)), const("one", np.float32(1.0))]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "layer_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, channels])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, channels])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", to_onnx.OPSET)])
    return onnx.shape_inference.infer_shapes(model)


def test_float16_keeps_statistics_in_float32():
    """A LayerNorm over 1024 channels of RMS 20: the sum of squares (4e5) overflows float16.
    The statistics chain (sums, mean, variance, 1/std) stays float32 and the result stays
    within float16's resolution; converting every node instead makes the variance inf and
    every output 0.
    Evaluated by ONNX's reference evaluator (NumPy, in the graph's own dtypes):
    onnxruntime's CPU provider computes float16 reductions in float32 and hides this."""
    model = _layer_norm_graph(1024)
    assert to_onnx.float32_nodes(model.graph) == ["sum", "mean", "ss", "var", "var_eps", "std",
                                                  "rstd"]  # fmt: skip
    x = np.random.default_rng(0).normal(0, 20, (2, 1024)).astype(np.float32)
    expected = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    run = lambda m: ReferenceEvaluator(m).run(["y"], {"x": x})[0]  # noqa: E731

    half = run(to_onnx.to_float16(model))
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, expected, rtol=0, atol=1e-2)
    naive = float16.convert_float_to_float16(model, keep_io_types=True)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(run(naive), 0.0)


@pytest.mark.slow
def test_export_py_to_onnx_from_a_workdir(tmp_path):
    """export.py --to onnx --fp16 on a workdir (SegFormer-B0 smoke, ADE20K's 150 classes) at
    --height/--width: prints the file's contract and the check, writes the JSON sidecar, and
    the file gives the workdir's logits on a batch of 3 within the float16 tolerance. --fp16
    with another target is refused before anything loads."""
    config = tiny_config("ade20k_mit_b0", "cbp", num_classes=150)  # = the smoke config
    workdir = model_workdir(config, random_state(config, seed=12), str(tmp_path / "run"))
    out = str(tmp_path / "segformer.onnx")
    command = [sys.executable, os.path.join(REPO, "export.py"), "--workdir", workdir]
    command += ["--config", os.path.join(REPO, "configs", "ade20k_mit_b0.py:smoke")]
    command += ["--to", "onnx", "--out", out, "--height", str(H), "--width", str(W), "--fp16"]
    cache = {"JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir}
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ | cache)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[1] == (
        f"{out}: ONNX opset {to_onnx.OPSET}, float16, uint8 (B, {H}, {W}, 3) -> float32 "
        f"logits (B, {H}, {W}, 150)"
    )
    assert lines[2].startswith("onnxruntime's logits differ from ours by at most")
    assert lines[2].endswith("% of the check pixels")

    meta = json.load(open(out + ".json"))
    assert meta["input"]["shape"] == ["B", H, W, 3] and meta["output"]["shape"][-1] == 150
    assert meta["dynamic"]["batch"] and not meta["dynamic"]["height_width"]
    assert meta["class_names"][0] == "wall" and meta["opset"] == to_onnx.OPSET
    assert meta["precision"].startswith("float16") and meta["check"]["images"] == 2
    assert meta["check"]["max_abs_logit_diff"] <= FP16_ATOL

    images = _images(3, seed=5)
    seg = predict.Segmenter.from_workdir(config, workdir)
    check = to_onnx.compare(
        to_onnx.reference_logits(seg, images), to_onnx.onnx_logits(open(out, "rb").read(), images)
    )
    assert check["max_abs_logit_diff"] <= FP16_ATOL, check
    assert check["argmax_agreement"] >= FP16_AGREEMENT, check

    jax_command = [*command[:6], "--to", "jax", "--out", str(tmp_path / "x.jaxexport"), "--fp16"]
    refused = subprocess.run(jax_command, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "--fp16 is for --to onnx (got --to jax)" in refused.stderr
