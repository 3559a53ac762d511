"""Encoders, heads and segmentors: shapes, modes, BatchNorm semantics, dtypes, registry errors.

PyTorch parity lives in test_models_parity.py and test_parity_swin_resnet.py; these tests
need only JAX and NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cbp_jax import models
from cbp_jax.classifier import Prototypes
from cbp_jax.models import kernels, layers, swin

SMALL_CNX = dict(dims=(16, 32, 64, 128), depths=(1, 1, 2, 1))
SMALL_MIT = dict(depths=(1, 1, 1, 1))


def _call(model, x, train):
    return nnx.jit(lambda m, x: m(x, train=train))(model, x)


@pytest.fixture(scope="module")
def mit_small():
    return models.create_encoder("mit_b0", drop_path_rate=0.5, rngs=nnx.Rngs(0), **SMALL_MIT)


@pytest.fixture(scope="module")
def segformer_small():
    return models.create("segformer_b0", num_classes=4, rngs=nnx.Rngs(0), **SMALL_MIT)


@pytest.fixture(scope="module")
def convnext_small():
    return models.create_encoder("convnext_tiny", drop_path_rate=0.0, rngs=nnx.Rngs(0), **SMALL_CNX)


# ----------------------------------------------------------------------------- depthwise conv


@pytest.mark.parametrize("k", [3, 7])
def test_depthwise_shifted_equals_xla_values_and_grads(k):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=(2, 9, 11, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 1, 6)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(6,)), jnp.float32)

    def f(impl):
        def loss(x, w, b):
            y = kernels.depthwise_conv2d(x, w, b, padding=k // 2, impl=impl)
            return jnp.sum(jnp.sin(y)), y

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(x, w, b)

    (_, y_xla), g_xla = f("xla")
    (_, y_sh), g_sh = f("shifted")
    np.testing.assert_allclose(y_sh, y_xla, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_sh, g_xla, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)
    # An independent NumPy reference for the values.
    xp = np.pad(np.asarray(x), ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    ref = np.zeros_like(np.asarray(x))
    for i in range(k):
        for j in range(k):
            ref += xp[:, i : i + 9, j : j + 11] * np.asarray(w)[i, j, 0]
    np.testing.assert_allclose(y_sh, ref + np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, k, stride, padding",
    [
        ((2, 8, 6, 16), 1, 1, 0),  # 1x1: matmul over channels
        ((2, 16, 12, 5), 4, 4, 0),  # patchify (ConvNeXt stem)
        ((2, 15, 13, 6), 4, 4, 0),  # patchify, a remainder dropped as PyTorch does
        ((2, 9, 11, 4), 3, 2, 1),  # overlapping: lax.conv
        ((2, 16, 16, 3), 7, 4, 3),
    ],
)
def test_conv2d_formulations_equal_lax_conv(shape, k, stride, padding):
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, shape[-1], 7)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(7,)), jnp.float32)

    def reference(x, w, b):
        pad = ((padding, padding), (padding, padding))
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=dn) + b

    def ours(x, w, b):
        return kernels.conv2d(x, w, b, stride=stride, padding=padding)

    y, y_ref = ours(x, w, b), reference(x, w, b)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda *a: jnp.sum(jnp.sin(ours(*a))), (0, 1, 2))(x, w, b)
    grads_ref = jax.grad(lambda *a: jnp.sum(jnp.sin(reference(*a))), (0, 1, 2))(x, w, b)
    for a, c in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-4)


TINY_SWIN = dict(embed_dim=8, num_heads=(1, 1, 1, 1), window_size=2)
TINY_RESNET = dict(stem_channels=8, base_channels=4)


@pytest.mark.parametrize(
    "name, extra",
    [
        ("mit_b0", {}),
        ("convnext_tiny", {}),
        ("swin_tiny", TINY_SWIN),
        ("resnet50_v1c", TINY_RESNET),
    ],
)
@pytest.mark.slow
def test_remat_gives_the_same_outputs_and_gradients(name, extra):
    overrides = dict(depths=(1, 1, 1, 1), drop_path_rate=0.0, **extra)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    def loss_and_grads(remat):
        encoder = models.create_encoder(name, remat=remat, rngs=nnx.Rngs(0), **overrides)
        graphdef, params, rest = nnx.split(encoder, nnx.Param, ...)

        @jax.jit
        def f(params):
            model = nnx.merge(graphdef, params, rest, copy=True)
            return sum(jnp.sum(jnp.sin(m)) for m in model(x, train=True))

        return jax.value_and_grad(f)(params)

    (loss, grads), (loss_remat, grads_remat) = loss_and_grads(False), loss_and_grads(True)
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_remat), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_dwconv_impl_auto_is_chosen_for_the_platform_compiled_for():
    """'auto' is the shifted sum in a CPU program and XLA's grouped conv in a TPU or CUDA
    one, whatever the machine that lowers it."""
    assert kernels.check_dwconv_impl("xla") == "xla"
    with pytest.raises(ValueError, match="dwconv_impl='fast'"):
        kernels.check_dwconv_impl("fast")
    x = jax.ShapeDtypeStruct((2, 8, 8, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 1, 16), jnp.float32)
    traced = jax.jit(
        jax.grad(lambda x, k: kernels.depthwise_conv2d(x, k, None, padding=1, impl="auto").sum())
    ).trace(x, k)
    for platform, chosen, other in (
        ("cpu", "dwconv_shifted", "dwconv_xla"),
        ("tpu", "dwconv_xla", "dwconv_shifted"),
        ("cuda", "dwconv_xla", "dwconv_shifted"),
    ):
        text = traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True)
        assert chosen in text and other not in text, platform
    xs = jax.random.normal(jax.random.key(0), x.shape)
    ks = jax.random.normal(jax.random.key(1), k.shape)
    np.testing.assert_array_equal(  # run here (CPU): the shifted sum
        kernels.depthwise_conv2d(xs, ks, None, padding=1, impl="auto"),
        kernels.depthwise_conv2d(xs, ks, None, padding=1, impl="shifted"),
    )


# ----------------------------------------------------------------------------- BatchNorm


def _numpy_conv_bn_relu(x, kernel, scale, bias, eps=1e-5):
    y = np.einsum("bhwc,cd->bhwd", x, kernel[0, 0])
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
    out = np.maximum((y - mean) / np.sqrt(var + eps) * scale + bias, 0.0)
    return out, mean, var


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_batchnorm_stats_are_global_over_a_sharded_batch(axis_type):
    x = np.random.default_rng(0).normal(1.0, 2.0, size=(8, 5, 5, 4)).astype(np.float32)
    x[:4] += 3.0  # the devices see different statistics
    block = layers.ConvBNReLU(4, 6, 1, rngs=nnx.Rngs(0))
    block.bn.scale[...] = jnp.linspace(0.5, 1.5, 6)
    block.bn.bias[...] = jnp.linspace(-0.2, 0.2, 6)
    kernel, scale, bias = (
        np.asarray(v[...]) for v in (block.conv.kernel, block.bn.scale, block.bn.bias)
    )
    ref, mean, var = _numpy_conv_bn_relu(x, kernel, scale, bias)

    def step(m, x):
        return m(x, train=True)

    single = nnx.clone(block)
    out_single = nnx.jit(step)(single, jnp.asarray(x))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    sharded = nnx.clone(block)
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))
        assert len(xs.sharding.device_set) == 8
        out_sharded = nnx.jit(step)(sharded, xs)
    for out, m in ((out_single, single), (out_sharded, sharded)):
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
        # Running stats: PyTorch momentum 0.1 from (0, 1).
        np.testing.assert_allclose(m.bn.mean[...], 0.1 * mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.bn.var[...], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-5)


def test_batchnorm_eval_uses_running_stats_and_does_not_update():
    block = layers.ConvBNReLU(3, 4, 1, rngs=nnx.Rngs(1))
    block.bn.mean[...] = jnp.array([0.1, -0.2, 0.3, 0.0])
    block.bn.var[...] = jnp.array([1.5, 0.5, 2.0, 1.0])
    x = np.random.default_rng(1).normal(size=(2, 3, 3, 3)).astype(np.float32)
    out = nnx.jit(lambda m, x: m(x, train=False))(block, jnp.asarray(x))
    y = np.einsum("bhwc,cd->bhwd", x, np.asarray(block.conv.kernel[...])[0, 0])
    ref = np.maximum((y - block.bn.mean[...]) / np.sqrt(block.bn.var[...] + 1e-5), 0.0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(block.bn.var[...], [1.5, 0.5, 2.0, 1.0])


# ----------------------------------------------------------------------------- encoders


@pytest.mark.parametrize(
    ("name", "dims"),
    [("mit_small", (32, 64, 160, 256)), ("convnext_small", SMALL_CNX["dims"])],
)
@pytest.mark.slow
def test_encoder_output_shapes(name, dims, request):
    enc = request.getfixturevalue(name)
    feats = _call(enc, jnp.zeros((2, 64, 96, 3)), False)
    assert [f.shape for f in feats] == [
        (2, 64 // s, 96 // s, d) for s, d in zip((4, 8, 16, 32), dims, strict=True)
    ]


@pytest.mark.slow
def test_drop_path_is_stochastic_in_training_only(mit_small):
    enc = mit_small
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    e1, e2 = _call(enc, x, False), _call(enc, x, False)
    np.testing.assert_array_equal(e1[-1], e2[-1])
    t1, t2 = _call(enc, x, True), _call(enc, x, True)
    assert not np.allclose(t1[-1], t2[-1])  # the dropout stream advances between calls


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params(convnext_small):
    f32 = convnext_small
    over = dict(SMALL_CNX, drop_path_rate=0.0)
    bf16 = models.create_encoder("convnext_tiny", dtype=jnp.bfloat16, rngs=nnx.Rngs(0), **over)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
    a, b = _call(f32, x, False)[-1], _call(bf16, x, False)[-1]
    assert b.dtype == jnp.bfloat16
    err = np.abs(np.asarray(b, np.float32) - np.asarray(a)).max() / np.abs(np.asarray(a)).max()
    assert err < 0.05


# ----------------------------------------------------------------------------- segmentors


def test_segformer_segmentor_contract(segformer_small):
    model = segformer_small
    assert isinstance(model.classifier.prototypes, Prototypes)
    assert not any(
        "prototypes" in ".".join(map(str, p))
        for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    out = _call(model, x, True)
    assert set(out) == {"logits", "features"}
    assert out["logits"].shape == (2, 16, 16, 4) and out["features"].shape == (2, 16, 16, 256)
    assert out["logits"].dtype == out["features"].dtype == jnp.float32
    # The logits are the classifier applied to the returned features (OCCL sees the same).
    w = np.asarray(model.classifier.prototypes[...])
    np.testing.assert_allclose(
        out["logits"], np.einsum("bhwc,nc->bhwn", out["features"], w), rtol=1e-4, atol=1e-4
    )


@pytest.mark.slow
def test_train_step_updates_params_and_bn_stats_not_prototypes(segformer_small):
    model = segformer_small
    protos = np.asarray(model.classifier.prototypes[...]).copy()
    bn_mean = np.asarray(model.head.fuse.bn.mean[...]).copy()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 4, size=(2, 8, 8)))

    @nnx.jit
    def step(model, x, labels):
        def loss_fn(model):
            logits = model(x, train=True)["logits"]
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        return loss, grads

    loss, grads = step(model, x, labels)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(grads)}
    assert np.isfinite(float(loss))
    assert not any("prototypes" in k for k in flat)
    assert all(np.isfinite(np.asarray(v[...])).all() for v in flat.values())
    assert float(jnp.abs(flat["encoder.stages.0.patch_embed.proj.kernel"][...]).max()) > 0
    assert float(jnp.abs(flat["head.fuse.conv.kernel"][...]).max()) > 0
    assert not np.allclose(model.head.fuse.bn.mean[...], bn_mean)  # train mode: stats move
    np.testing.assert_array_equal(model.classifier.prototypes[...], protos)


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_segmentor_train_forward_sharded_equals_single_device(segformer_small, axis_type):
    x = np.random.default_rng(2).normal(size=(8, 32, 32, 3)).astype(np.float32)

    @nnx.jit
    def fwd(model, x):
        return model(x, train=True)

    single, sharded = nnx.clone(segformer_small), nnx.clone(segformer_small)
    ref = fwd(single, jnp.asarray(x))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        out = fwd(sharded, jax.device_put(x, NamedSharding(mesh, P("data"))))
    for key in ("logits", "features"):
        np.testing.assert_allclose(out[key], ref[key], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(
        sharded.head.fuse.bn.var[...], single.head.fuse.bn.var[...], rtol=1e-5, atol=1e-6
    )


@pytest.mark.slow
def test_upernet_segmentor_has_aux_logits():
    model = models.create(
        "upernet_convnext_tiny",
        num_classes=5,
        head_width=32,
        aux_width=16,
        classifier="linear",
        rngs=nnx.Rngs(0),
        **SMALL_CNX,
    )
    out = _call(model, jnp.zeros((2, 64, 64, 3)), False)
    assert out["logits"].shape == (2, 16, 16, 5)
    assert out["features"].shape == (2, 16, 16, 32)
    assert out["aux_logits"].shape == (2, 4, 4, 5)


@pytest.mark.parametrize(("name", "width"), [("segformer_b0", 256), ("segformer_b2", 768)])
def test_mlp_head_default_widths(name, width):
    model = nnx.eval_shape(
        lambda: models.create(
            name, num_classes=3, head="mlp", depths=(1, 1, 1, 1), rngs=nnx.Rngs(0)
        )
    )
    assert model.head.width == width and model.classifier.dim == width


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown encoder 'mit_b9'"):
        models.create_encoder("mit_b9", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"override\(s\) \['drop_rate'\]"):
        models.create_encoder("mit_b0", drop_rate=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Unknown segmentor 'segformer_b7'"):
        models.create("segformer_b7", num_classes=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head='uper'"):
        models.create("segformer_b0", num_classes=3, head="uper", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes=0"):
        models.create("segformer_b0", num_classes=0, rngs=nnx.Rngs(0))


def test_swin_window_defaults_and_errors():
    base = nnx.eval_shape(
        lambda: models.create_encoder("swin_base", depths=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    )
    assert base.config.window_size == 12 and base.dims == (128, 256, 512, 1024)
    tiny = nnx.eval_shape(
        lambda: models.create_encoder("swin_tiny", depths=(1, 1, 1, 1), rngs=nnx.Rngs(0))
    )
    assert tiny.config.window_size == 7 and tiny.dims == (96, 192, 384, 768)
    with pytest.raises(ValueError, match=r"override\(s\) \['dwconv_impl'\]"):
        models.create_encoder("swin_tiny", dwconv_impl="xla", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="width 16 is not divisible by num_heads=5"):
        models.create_encoder("swin_tiny", embed_dim=16, num_heads=(5, 2, 2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head='upernet' for 'fcn_resnet101_d8'"):
        models.create("fcn_resnet101_d8", num_classes=3, head="upernet", rngs=nnx.Rngs(0))


def test_relative_position_index_matches_mmseg_formula():
    """mmseg builds the index differently (``double_step_seq`` + flip); same table rows."""
    w = 5
    seq = (np.arange(0, (2 * w - 1) * w, 2 * w - 1)[:, None] + np.arange(w)[None]).reshape(1, -1)
    np.testing.assert_array_equal(swin.relative_position_index(w), np.flip(seq + seq.T, axis=1))


@pytest.mark.slow
def test_swin_stochastic_depth_only_when_training():
    enc = models.create_encoder(
        "swin_tiny",
        embed_dim=8,
        depths=(2, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        window_size=2,
        drop_path_rate=0.5,
        rngs=nnx.Rngs(0),
    )
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    a, b = _call(enc, x, False), _call(enc, x, False)
    np.testing.assert_array_equal(a[-1], b[-1])
    t = _call(enc, x, True)
    assert [f.shape for f in t] == [(4, 8, 8, 8), (4, 4, 4, 16), (4, 2, 2, 32), (4, 1, 1, 64)]
    assert np.all(np.isfinite(t[-1])) and not np.allclose(t[-1], a[-1])


@pytest.mark.slow
def test_fcn_segmentor_output_stride_8_and_heads():
    model = models.create(
        "fcn_resnet101_d8",
        num_classes=5,
        head_width=16,
        aux_width=8,
        depths=(1, 1, 1, 1),
        stem_channels=16,
        base_channels=8,
        rngs=nnx.Rngs(0),
    )
    assert model.encoder.dims == (32, 64, 128, 256)
    assert len(model.head.convs) == 2 and model.head.concat_input and model.head.in_index == 3
    assert len(model.aux_head.convs) == 1 and model.aux_head.in_index == 2
    out = _call(model, jnp.zeros((2, 64, 64, 3)), True)
    assert out["logits"].shape == (2, 8, 8, 5) and out["features"].shape == (2, 8, 8, 16)
    assert out["aux_logits"].shape == (2, 8, 8, 5)


def test_linear_is_nnx_linear_as_one_flat_matmul():
    """``layers.linear`` (``nnx.Linear`` through ``kernels.dense``): the same values and
    gradients as ``nnx.Linear``'s own ``dot_general`` on a 4-D input."""
    ours = layers.linear(16, 24, None, nnx.Rngs(0))
    plain = nnx.Linear(16, 24, rngs=nnx.Rngs(1))
    plain.kernel[...], plain.bias[...] = ours.kernel[...], jnp.linspace(-1, 1, 24)
    ours.bias[...] = plain.bias[...]
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7, 16)).astype(np.float32))

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x)))

    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-5, atol=1e-6)
    g_ours = nnx.grad(loss, argnums=(0, 1))(ours, x)
    g_plain = nnx.grad(loss, argnums=(0, 1))(plain, x)
    np.testing.assert_allclose(g_ours[0].kernel[...], g_plain[0].kernel[...], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_ours[0].bias[...], g_plain[0].bias[...], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_ours[1], g_plain[1], rtol=1e-5, atol=1e-6)


def _residual_bytes(fn, *args) -> int:
    """Bytes of the arrays ``jax.vjp`` keeps for the backward pass of ``fn`` at ``args``."""
    _, backward = jax.vjp(fn, *args)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(backward) if leaf.ndim > 0)


def test_gelu_equals_exact_gelu_and_keeps_only_its_input():
    """``kernels.gelu``: jax.nn.gelu(approximate=False)'s values and gradients, with one map
    of the input's size kept for the backward pass where autodiff keeps three."""
    x = jnp.asarray(np.random.default_rng(0).normal(0, 3, size=(4, 33, 17)).astype(np.float32))

    def exact(x):
        return jax.nn.gelu(x, approximate=False)

    np.testing.assert_array_equal(kernels.gelu(x), exact(x))
    cotangent = jnp.cos(x)
    g_ours = jax.vjp(kernels.gelu, x)[1](cotangent)[0]
    g_auto = jax.vjp(exact, x)[1](cotangent)[0]
    np.testing.assert_allclose(g_ours, g_auto, rtol=1e-5, atol=1e-6)
    assert _residual_bytes(kernels.gelu, x) == x.nbytes
    assert _residual_bytes(exact, x) >= 3 * x.nbytes
    bf16 = x.astype(jnp.bfloat16)
    g_bf16 = jax.vjp(kernels.gelu, bf16)[1](cotangent.astype(jnp.bfloat16))[0]
    assert g_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(g_bf16.astype(jnp.float32), g_auto, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layer_norm_equals_nnx_layer_norm_and_keeps_one_map(dtype):
    """``layers.layer_norm``: nnx.LayerNorm's values, gradients (input, scale, bias) and
    state, keeping the input and per-row statistics for the backward pass."""
    rng = np.random.default_rng(1)
    ours = layers.layer_norm(16, 1e-6, dtype, nnx.Rngs(0))
    plain = nnx.LayerNorm(16, epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    scale, bias = (jnp.asarray(rng.normal(size=16).astype(np.float32)) for _ in range(2))
    for module in (ours, plain):
        module.scale[...], module.bias[...] = scale, bias
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(plain))
    x = jnp.asarray(rng.normal(3, 2, size=(2, 5, 7, 16)).astype(np.float32))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is None else dict(rtol=3e-2, atol=3e-2)

    def loss(module, x):
        return jnp.sum(jnp.sin(module(x).astype(jnp.float32)))

    y_ours, y_plain = ours(x), plain(x)
    assert y_ours.dtype == y_plain.dtype
    np.testing.assert_allclose(y_ours.astype(np.float32), y_plain.astype(np.float32), **tol)
    g_ours = nnx.grad(loss, argnums=(0, 1))(ours, x)
    g_plain = nnx.grad(loss, argnums=(0, 1))(plain, x)
    for name in ("scale", "bias"):
        a, b = getattr(g_ours[0], name)[...], getattr(g_plain[0], name)[...]
        np.testing.assert_allclose(a, b, **(tol | dict(atol=tol["atol"] * 10)))
    np.testing.assert_allclose(g_ours[1], g_plain[1], **tol)
    if dtype is None:
        kept = _residual_bytes(lambda x: ours(x), x)
        assert x.nbytes <= kept <= x.nbytes + 2 * x.nbytes // 16 + 16 * 4
        assert _residual_bytes(lambda x: plain(x), x) >= 2 * x.nbytes


@pytest.mark.parametrize("axis", [-1, (-2, -1)])
def test_softmax_equals_jax_softmax_and_keeps_only_its_output(axis):
    """``kernels.softmax``: jax.nn.softmax's values and gradients. In attention (softmax, then
    a product with the values) its backward pass keeps one map of the scores' size, the
    output; autodiff of jax.nn.softmax keeps the exponentials too."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(0, 4, size=(2, 3, 6, 5)).astype(np.float32))
    v = jnp.asarray(rng.normal(size=(2, 3, 6, 5, 4)).astype(np.float32))
    np.testing.assert_array_equal(kernels.softmax(x, axis), jax.nn.softmax(x, axis=axis))

    def attention(softmax):
        return lambda x, v: jnp.einsum("bnij,bnijd->bnd", softmax(x), v)

    ours = attention(lambda x: kernels.softmax(x, axis))
    plain = attention(lambda x: jax.nn.softmax(x, axis=axis))
    cotangent = jnp.asarray(rng.normal(size=(2, 3, 4)).astype(np.float32))
    for g_ours, g_plain in zip(
        jax.vjp(ours, x, v)[1](cotangent), jax.vjp(plain, x, v)[1](cotangent), strict=True
    ):
        np.testing.assert_allclose(g_ours, g_plain, rtol=1e-5, atol=1e-6)
    assert _residual_bytes(ours, x, v) == x.nbytes + v.nbytes
    assert _residual_bytes(plain, x, v) >= 2 * x.nbytes + v.nbytes
