"""Optimizer recipes, schedules, the train step's variants, pretrained init, mesh set-up."""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from config_helpers import load_config
from flax import nnx

from cbp_jax import config_checks, factories, losses, resize, sharding, train_lib, trainer

ALL_CONFIGS = [
    "ade20k_mit_b0",
    "ade20k_mit_b4",
    "ade20k_mit_b5",
    "ade20k_convnext_base",
    "cocostuff10k_mit_b5",
    "cocostuff10k_convnext_base",
    "camvid_mit_b0",
    "scenes_mit_b0",
    "ade20k_swin_base",
    "cocostuff10k_swin_base",
    "ade20k_fcn_resnet101",
    "cocostuff10k_fcn_resnet101",
]


# B4 and the COCO-Stuff rows build the same modules as their ADE20K rows (but for N), and
# tests/test_param_counts.py counts them.
DISTINCT_MODELS = [
    n
    for n in ALL_CONFIGS
    if n not in ("ade20k_mit_b4", "cocostuff10k_mit_b5")
    and not (n.startswith("cocostuff10k_") and n != "cocostuff10k_convnext_base")
]


@pytest.mark.parametrize("name", ALL_CONFIGS)
@pytest.mark.parametrize("arg", [None, "smoke", "baseline"])
def test_every_config_parses(name, arg):
    config = load_config(name, arg)
    assert config.total_steps >= 1 and config.data.num_classes >= 1
    if arg == "smoke":
        assert config.init_from == "" and config.model.depths == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "name,arg", [(n, None) for n in DISTINCT_MODELS] + [("ade20k_mit_b0", "baseline,smoke")]
)
@pytest.mark.slow
def test_every_config_builds_its_model_abstractly(name, arg):
    config = load_config(name, arg)
    model = nnx.eval_shape(lambda: factories.model_from_config(config))
    assert model.classifier.num_classes == config.data.num_classes
    expected = "linear" if arg and "baseline" in arg else "frozen"
    assert model.classifier.update == ("learned" if expected == "linear" else "frozen")
    assert config.loss.occl == (expected != "linear")


def test_paper_recipes():
    b5 = load_config("ade20k_mit_b5", None)
    assert (b5.optimizer.lr, b5.optimizer.weight_decay, b5.optimizer.head_lr_mult) == (
        6e-5,
        0.01,
        10.0,
    )
    assert (b5.total_steps, b5.batch_size, b5.data.crop_size) == (160_000, 16, (512, 512))
    assert b5.model.head == "mmseg" and b5.loss.category_weight == 0.1
    b5_640 = load_config("ade20k_mit_b5", "640")
    assert b5_640.data.crop_size == (640, 640) and b5_640.data.base_scale == (2048, 640)
    cn = load_config("ade20k_convnext_base", None)
    assert (cn.optimizer.lr, cn.optimizer.weight_decay, cn.optimizer.layer_decay) == (
        1e-4,
        0.05,
        0.9,
    )
    assert cn.eval.mode == "slide" and cn.eval.stride == (341, 341)
    assert cn.model.drop_path_rate == 0.4 and cn.loss.category_weight == 0.2
    coco = load_config("cocostuff10k_convnext_base", None)
    assert coco.total_steps == 80_000 and coco.data.num_classes == 171
    assert coco.loss.category_weight == 0.3
    b0 = load_config("ade20k_mit_b0", None)
    assert b0.total_steps == 40_000 and b0.model.cbp_length == 2.0
    with pytest.raises(ValueError, match="unknown config variant"):
        load_config("ade20k_mit_b0", "smok")


def test_swin_and_fcn_recipes():
    swin = load_config("ade20k_swin_base", None)
    assert swin.model.name == "upernet_swin_base" and swin.model.drop_path_rate == 0.3
    assert (swin.optimizer.name, swin.optimizer.lr, swin.optimizer.weight_decay) == (
        "adamw",
        6e-5,
        0.01,
    )
    assert swin.optimizer.head_lr_mult == 1.0 and swin.optimizer.no_decay_norm
    assert (swin.optimizer.warmup_steps, swin.optimizer.poly_power) == (1500, 1.0)
    assert (swin.loss.centroid_weight, swin.loss.category_weight) == (1.0, 0.2)
    assert swin.model.cbp_length == 1.0 and swin.eval.mode == "whole"
    swin.model.update(name="upernet_swin_tiny", depths=(1, 1, 1, 1))
    model = nnx.eval_shape(lambda: factories.model_from_config(swin))
    _, params, _ = train_lib.split_model(model)
    _, decay = train_lib.param_groups(model, params, swin.optimizer)
    named = {sharding.path_name(p): d for p, d in jax.tree_util.tree_leaves_with_path(decay)}
    tables = [n for n in named if "relative_position_bias_table" in n]
    assert len(tables) == 4 and not any(named[n] for n in tables)  # mmseg: decay_mult 0
    assert named["encoder/stages/0/blocks/0/attn/q/kernel/value"]
    swin_coco = load_config("cocostuff10k_swin_base", None)
    assert (swin_coco.loss.centroid_weight, swin_coco.loss.category_weight) == (1.0, 0.3)
    assert swin_coco.total_steps == 80_000 and swin_coco.data.num_classes == 171
    fcn = load_config("ade20k_fcn_resnet101", None)
    assert fcn.model.name == "fcn_resnet101_d8" and fcn.model.drop_path_rate == 0.0
    opt = fcn.optimizer
    assert (opt.name, opt.lr, opt.momentum, opt.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (opt.warmup_steps, opt.poly_power, opt.min_lr) == (0, 0.9, 1e-4)
    assert not opt.no_decay_norm and not opt.no_decay_1d  # mmseg's SGD decays everything
    assert (fcn.loss.centroid_weight, fcn.loss.category_weight, fcn.loss.aux_weight) == (
        0.4,
        0.1,
        0.4,
    )
    fcn_coco = load_config("cocostuff10k_fcn_resnet101", None)
    assert fcn_coco.model.cbp_length == 0.3 and fcn_coco.total_steps == 80_000
    assert (fcn_coco.loss.centroid_weight, fcn_coco.loss.category_weight) == (1.0, 0.3)


def test_schedule_matches_mmseg_warmup_then_poly():
    cfg = load_config("ade20k_mit_b5", None).optimizer
    schedule = train_lib.learning_rate_schedule(cfg, 160_000)
    lr = cfg.lr
    for t in (0, 1, 750, 1499):
        expected = lr * 1e-6 + (lr - lr * 1e-6) * t / 1500
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-5, atol=lr * 1e-7)
    for t in (1500, 50_000, 159_999):
        expected = lr * (1 - (t - 1500) / (160_000 - 1500))
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-4, atol=1e-12)
    assert float(schedule(160_000)) == 0.0


def _groups(config):
    model = nnx.eval_shape(lambda: factories.model_from_config(config))
    _, params, _ = train_lib.split_model(model)
    lr, decay = train_lib.param_groups(model, params, config.optimizer)
    names = lambda tree: {  # noqa: E731
        sharding.path_name(p).removesuffix("/value"): v
        for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }
    return names(lr), names(decay)


# Our parameter paths -> mmseg 1.x names (EncoderDecoder: backbone / decode_head /
# auxiliary_head), written from mmseg's MixVisionTransformer and mmpretrain's ConvNeXt.
_MMSEG_NAMES = [
    (r"^encoder/stages/(\d+)/patch_embed/proj/", r"backbone.layers.\1.0.projection."),
    (r"^encoder/stages/(\d+)/patch_embed/norm/", r"backbone.layers.\1.0.norm."),
    (
        r"^encoder/stages/(\d+)/blocks/(\d+)/attn/[qkv]/kernel",
        r"backbone.layers.\1.1.\2.attn.attn.in_proj_weight",
    ),
    (
        r"^encoder/stages/(\d+)/blocks/(\d+)/attn/[qkv]/bias",
        r"backbone.layers.\1.1.\2.attn.attn.in_proj_bias",
    ),
    (
        r"^encoder/stages/(\d+)/blocks/(\d+)/attn/proj/",
        r"backbone.layers.\1.1.\2.attn.attn.out_proj.",
    ),
    (r"^encoder/stages/(\d+)/blocks/(\d+)/attn/sr/", r"backbone.layers.\1.1.\2.attn.sr."),
    (r"^encoder/stages/(\d+)/blocks/(\d+)/attn/sr_norm/", r"backbone.layers.\1.1.\2.attn.norm."),
    (r"^encoder/stages/(\d+)/blocks/(\d+)/mlp/fc1/", r"backbone.layers.\1.1.\2.ffn.layers.0."),
    (r"^encoder/stages/(\d+)/blocks/(\d+)/mlp/dwconv/", r"backbone.layers.\1.1.\2.ffn.layers.1."),
    (r"^encoder/stages/(\d+)/blocks/(\d+)/mlp/fc2/", r"backbone.layers.\1.1.\2.ffn.layers.4."),
    (r"^encoder/stages/(\d+)/blocks/(\d+)/(norm[12])/", r"backbone.layers.\1.1.\2.\3."),
    (r"^encoder/stages/(\d+)/norm/", r"backbone.layers.\1.2."),  # MiT's stage-final norm
    (r"^encoder/stem_conv/", "backbone.downsample_layers.0.0."),
    (r"^encoder/stem_norm/", "backbone.downsample_layers.0.1."),
    (r"^encoder/stages/(\d+)/down_norm/", r"backbone.downsample_layers.\1.0."),
    (r"^encoder/stages/(\d+)/down_conv/", r"backbone.downsample_layers.\1.1."),
    (r"^encoder/stages/(\d+)/blocks/(\d+)/gamma", r"backbone.stages.\1.\2.gamma"),
    (r"^encoder/stages/(\d+)/blocks/(\d+)/(\w+)/", r"backbone.stages.\1.\2.\3."),
    (r"^encoder/out_norms/(\d+)/", r"backbone.norm\1."),
    (r"^classifier/linear/", "decode_head.conv_seg."),
    (r"^aux_classifier/linear/", "auxiliary_head.conv_seg."),
    (r"^head/(.*)/", r"decode_head.\1."),
    (r"^aux_head/(.*)/", r"auxiliary_head.\1."),
]


def _mmseg_name(path: str) -> str:
    for pattern, replacement in _MMSEG_NAMES:
        name, hits = re.subn(pattern, replacement, path)
        if hits:
            name = name.replace("/", ".")
            return re.sub(r"\.(kernel|scale)$", ".weight", name)
    raise AssertionError(f"no mmseg name for {path}")


def _mmseg_segformer_group(name: str) -> tuple[float, bool]:
    """mmengine DefaultOptimWrapperConstructor with the SegFormer recipe's custom_keys."""
    custom = {"pos_block": (1.0, 0.0), "norm": (1.0, 0.0), "head": (10.0, 1.0)}
    for key in sorted(sorted(custom), key=len, reverse=True):  # mmengine's precedence
        if key in name:
            lr_mult, decay_mult = custom[key]
            return lr_mult, decay_mult > 0
    return 1.0, True


def _mmseg_convnext_group(name: str, ndim: int) -> tuple[float, bool]:
    """mmseg LearningRateDecayOptimizerConstructor, stage_wise, decay_rate 0.9, 12 layers."""
    num_layers = 12 + 2
    if name.startswith("backbone.downsample_layers"):
        layer_id = 0
    elif name.startswith("backbone.stages"):
        layer_id = int(name.split(".")[2]) + 1
    else:
        layer_id = num_layers - 1
    decay = not (ndim == 1 or name.endswith(".bias"))
    return 0.9 ** (num_layers - layer_id - 1), decay


@pytest.mark.parametrize(
    "name,model,rule",
    [
        ("ade20k_mit_b0", "segformer_b0", "segformer"),
        ("ade20k_convnext_base", "upernet_convnext_tiny", "convnext"),
    ],
)
def test_param_groups_are_mmsegs_for_every_parameter(name, model, rule):
    config = load_config(name, "baseline")  # the learned classifier has parameters too
    config.model.name = model
    abstract = nnx.eval_shape(lambda: factories.model_from_config(config))
    _, params, _ = train_lib.split_model(abstract)
    lr, decay = _groups(config)
    shapes = {
        sharding.path_name(p).removesuffix("/value"): v.shape
        for p, v in jax.tree_util.tree_leaves_with_path(params)
    }
    mine, mmseg = {}, {}
    for path, shape in shapes.items():
        mmseg_name = _mmseg_name(path)
        if rule == "segformer":
            mmseg[path] = _mmseg_segformer_group(mmseg_name)
        else:
            mmseg[path] = _mmseg_convnext_group(mmseg_name, len(shape))
        mine[path] = (pytest.approx(lr[path], rel=1e-6), decay[path])
    assert len(mine) == len(shapes) > 100
    assert mine == mmseg
    if rule == "segformer":  # the two places where mmseg's substring rule bites
        assert mmseg["encoder/stages/0/norm/scale"] == (1.0, True)  # layers.0.2: decayed
        assert mmseg["head/fuse/bn/scale"] == (10.0, True)  # 'head' before 'norm'
        assert mmseg["encoder/stages/0/blocks/0/norm1/scale"] == (1.0, False)


def test_convnext_stagewise_decay_and_no_decay_on_1d():
    lr, decay = _groups(load_config("ade20k_convnext_base", "smoke"))
    np.testing.assert_allclose(lr["encoder/stem_conv/kernel"], 0.9**13)
    np.testing.assert_allclose(lr["encoder/stages/1/down_conv/kernel"], 0.9**13)
    for i in range(4):
        np.testing.assert_allclose(lr[f"encoder/stages/{i}/blocks/0/fc1/kernel"], 0.9 ** (12 - i))
    np.testing.assert_allclose(lr["head/fpn_bottleneck/conv/kernel"], 1.0)
    assert decay["encoder/stages/0/blocks/0/gamma"] is False
    assert decay["encoder/stages/0/blocks/0/fc1/bias"] is False
    assert decay["encoder/stages/0/blocks/0/fc1/kernel"] is True


def _numpy_optimizer_updates(cfg, params, lr_mults, decay, grads, lrs):
    """PyTorch's AdamW / SGD (L2 decay, momentum) per parameter group in float64, with
    global-norm clipping first: the updates ``-lr * mult * direction`` of each step."""
    p = [np.asarray(x, np.float64) for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs, strict=True), start=1):
        g = [np.asarray(x, np.float64) for x in g]
        if cfg.clip_norm:
            norm = np.sqrt(sum(np.sum(x**2) for x in g))
            g = [x * min(1.0, cfg.clip_norm / norm) for x in g]
        step = []
        for i, (gi, mult, d) in enumerate(zip(g, lr_mults, decay, strict=True)):
            wd = cfg.weight_decay if d else 0.0
            if cfg.name == "adamw":
                m[i] = cfg.b1 * m[i] + (1 - cfg.b1) * gi
                v[i] = cfg.b2 * v[i] + (1 - cfg.b2) * gi**2
                m_hat, v_hat = m[i] / (1 - cfg.b1**t), v[i] / (1 - cfg.b2**t)
                direction = m_hat / (np.sqrt(v_hat) + cfg.eps) + wd * p[i]
            else:
                m[i] = cfg.momentum * m[i] + gi + wd * p[i]
                direction = m[i]
            step.append(-lr * mult * direction)
            p[i] = p[i] + step[-1]
        out.append(step)
    return out


# The SegFormer-B0 smoke model under two recipes: AdamW with clipping, the x10 head,
# stage-wise layer decay (MiT paths take ConvNeXt's ids) and no decay on 1-D parameters;
# SGD with momentum and L2 decay on everything.
OPTIMIZER_RECIPES = {
    "adamw": {
        "clip_norm": 1.0,
        "layer_decay": 0.9,
        "layer_decay_num_layers": 4,
        "no_decay_1d": True,
    },
    "sgd": {"name": "sgd", "momentum": 0.9, "weight_decay": 5e-4, "no_decay_norm": False},
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", OPTIMIZER_RECIPES)
def test_optimizer_matches_numpy_param_groups(recipe):
    config = load_config("ade20k_mit_b0", "smoke")
    cfg = config.optimizer
    cfg.update(OPTIMIZER_RECIPES[recipe])
    model = nnx.eval_shape(lambda: factories.model_from_config(config))
    _, abstract, _ = train_lib.split_model(model)
    rng = np.random.default_rng(0)
    params, *grads = [
        jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1, x.dtype), abstract)
        for _ in range(4)
    ]
    lr_mults, decay = train_lib.param_groups(model, params, cfg)
    tx = train_lib.make_optimizer(model, params, cfg, total_steps=10)
    schedule = train_lib.learning_rate_schedule(cfg, 10)
    expected = _numpy_optimizer_updates(
        cfg,
        jax.tree.leaves(params),
        jax.tree.leaves(lr_mults),
        jax.tree.leaves(decay),
        [jax.tree.leaves(g) for g in grads],
        [float(schedule(t)) for t in range(3)],
    )
    state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
    for t, g in enumerate(grads):
        updates, state = update(g, state, params)
        np.testing.assert_allclose(float(train_lib.current_lr(state)), schedule(t), rtol=1e-7)
        for ours, ref in zip(jax.tree.leaves(updates), expected[t], strict=True):
            np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        params = optax.apply_updates(params, updates)
    labels, groups = train_lib.group_labels(lr_mults, decay)
    pairs = set(zip(jax.tree.leaves(lr_mults), jax.tree.leaves(decay), strict=True))
    assert sorted(groups.values()) == sorted(pairs) and len(pairs) > 1
    if recipe == "adamw":  # 4 stages + stem/head ids, each with and without decay
        assert len(pairs) >= 8
    assert len(set(jax.tree.leaves(labels))) == len(pairs)


def _tiny(update="frozen"):
    config = load_config("scenes_mit_b0", "smoke")
    config.update(batch_size=4)
    config.model.cbp_update = update
    config.mesh.update(data=1, num_devices=1)
    return config


def _batch(config, seed=0):
    rng = np.random.default_rng(seed)
    h, w = config.data.crop_size
    return {
        "image": jnp.asarray(rng.normal(size=(config.batch_size, h, w, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 8, (config.batch_size, h, w)), jnp.int32),
    }


@pytest.mark.slow
@pytest.mark.parametrize("update", ["frozen", "gradient", "ema", "penalty"])
def test_train_step_variants_compile_once(update):
    config = _tiny(update)
    mesh = factories.mesh_from_config(config)
    with jax.set_mesh(mesh):
        setup = factories.TrainSetup(config, mesh)
        state = setup.init_state()
        step = jax.jit(
            train_lib.make_train_step(
                setup.graphdef, setup.tx, losses.LossConfig.from_config(config)
            ),
            donate_argnums=0,
        )
        w0 = np.array(_prototypes(setup, state))
        for i in range(3):
            state, metrics = step(state, _batch(config, i))
        w3 = np.asarray(_prototypes(setup, state))
        assert int(state["step"]) == 3 and int(metrics["nonfinite_steps"]) == 0
        if update == "frozen":  # a NaN batch is skipped: the state stays as it was
            before = jax.device_get(state["params"])
            bad = _batch(config, 3)
            bad["image"] = bad["image"].at[0, 0, 0, 0].set(jnp.nan)
            state, metrics = step(state, bad)
            assert int(state["step"]) == 3 and int(metrics["nonfinite_steps"]) == 1
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"]), strict=True):
                np.testing.assert_array_equal(a, b)
    assert step._cache_size() == 1  # no recompilation after the first step
    if update == "frozen":
        np.testing.assert_array_equal(w3, w0)
    else:
        assert np.abs(w3 - w0).max() > 1e-6
    if update == "penalty":  # re-equalized after every step
        np.testing.assert_allclose(np.linalg.norm(w3, axis=1), config.model.cbp_length, rtol=1e-5)


def _prototypes(setup, state):
    return nnx.merge(
        setup.graphdef, state["params"], state["model_state"]
    ).classifier.class_weights()


@pytest.mark.slow
def test_init_from_loads_encoder_weights(tmp_path):
    import transformers as T

    hf = T.SegformerModel(T.SegformerConfig(depths=[1, 1, 1, 1]))
    hf.save_pretrained(tmp_path)
    config = _tiny()
    mesh = factories.mesh_from_config(config)
    with jax.set_mesh(mesh):
        setup = factories.TrainSetup(config, mesh)
        state = setup.load_pretrained(setup.init_state(), str(tmp_path))
    model = nnx.merge(setup.graphdef, state["params"], state["model_state"])
    ours = np.asarray(model.encoder.stages[0].patch_embed.proj.kernel[...])
    from safetensors.numpy import load_file

    theirs = load_file(tmp_path / "model.safetensors")["encoder.patch_embeddings.0.proj.weight"]
    np.testing.assert_allclose(ours, theirs.transpose(2, 3, 1, 0), rtol=1e-6)


def test_mesh_from_config_and_errors():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="needs 6 devices; there are 8"):
        sharding.make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown"):
        sharding.make_mesh({"model": 8})
    config = _tiny()
    config.batch_size = 6
    config.mesh.update(data=-1, num_devices=0)
    # One process on CPU (one device per core): as many devices as divide the batch, and
    # the log says why the others are idle.
    mesh = factories.mesh_from_config(config)
    assert mesh.devices.size == 6
    assert factories.devices_left_out(config, mesh) == (
        "using 6 of 8 CPU devices: config.batch_size=6 is not divisible by 8; a batch size "
        "that is (e.g. 8) uses all of them."
    )
    config.batch_size = 16
    assert factories.devices_left_out(config, factories.mesh_from_config(config)) is None
    config.batch_size = 6
    config.mesh.num_devices = 8  # asked for explicitly: the batch must divide
    with pytest.raises(config_checks.ConfigError, match="batch_size=6 does not divide over the 8"):
        trainer.train_and_evaluate(config, "/nonexistent/never-created")
    config.mesh.num_devices = 0
    config.batch_size, config.loss.occl, config.loss.views = 3, True, "batch_halves"
    with pytest.raises(config_checks.ConfigError, match="batch_size=4 .or 2., or --config.loss"):
        trainer.train_and_evaluate(config, "/nonexistent/never-created")
    assert not os.path.exists("/nonexistent/never-created")


def test_fsdp_spec_splits_the_largest_divisible_dim():
    assert sharding.fsdp_spec((256, 1024), 4) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((1024, 256), 4) == jax.sharding.PartitionSpec("fsdp", None)
    assert sharding.fsdp_spec((3, 3, 1, 30), 4) == jax.sharding.PartitionSpec()  # small
    assert sharding.fsdp_spec((1024, 256), 1) == jax.sharding.PartitionSpec()


def _chain_temp_bytes(block) -> int:
    """Temporaries of the compiled gradient of four ``block``s applied in a chain."""

    def loss(weights, x):
        for w in weights:
            x = block(w, x)
        return jnp.sum(x * x)

    weights = [jax.ShapeDtypeStruct((64, 64), jnp.float32)] * 4
    x = jax.ShapeDtypeStruct((512, 64), jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(weights, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_remat_note_says_what_the_backend_does():
    """``trainer.remat_note`` warns on CPU only, and what it says holds there: the compiled
    gradient of checkpointed blocks keeps as much as the plain one (the recomputation is
    merged back into the forward pass). If XLA:CPU starts honouring remat, this fails and
    the note goes."""

    def block(w, x):
        return x + jnp.tanh(jnp.tanh(x @ w) @ w)

    config = ml_collections.ConfigDict({"model": {"remat": True}})
    assert trainer.remat_note(config, "gpu") is None
    config.model.remat = False
    assert trainer.remat_note(config, "cpu") is None
    config.model.remat = True
    assert "no memory on CPU" in trainer.remat_note(config, "cpu")
    if jax.default_backend() == "cpu":
        assert _chain_temp_bytes(jax.checkpoint(block)) >= _chain_temp_bytes(block)


# ----------------------------------------------------------------------------- banded CE


@pytest.mark.parametrize("average", ["all", "labelled"])
@pytest.mark.parametrize(
    "shape, size",
    [
        ((2, 8, 9, 5), (33, 37)),  # 33 rows in bands of 4: the last band padded
        ((2, 8, 8, 5), (32, 8)),  # the width kept: no product along W
    ],
)
def test_banded_cross_entropy_equals_the_whole_image_one(average, shape, size):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=shape), jnp.float32)
    labels = rng.integers(0, shape[-1], (shape[0], *size))
    labels[0, :3] = 255
    labels = jnp.asarray(labels, jnp.int32)
    band = 4 * shape[0] * shape[-1] * size[1] * 4  # bytes of 4 float32 rows of logits

    def value_and_grad(band_bytes):
        def loss(z):
            return losses.upsampled_cross_entropy(z, labels, 255, average, band_bytes)

        return jax.jit(jax.value_and_grad(loss))(logits)

    (whole, g_whole), (banded, g_banded) = value_and_grad(1 << 40), value_and_grad(band)
    np.testing.assert_allclose(banded, whole, rtol=1e-6)
    np.testing.assert_allclose(g_banded, g_whole, rtol=1e-5, atol=1e-9)


def test_segmentation_loss_bands_large_logits_by_default():
    """The train step's loss bands logits past ``ce_band_bytes`` (two 4 MB bands here on
    CPU) and equals mmseg's order computed whole: resize, then the pixel CE."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 32, 32, 64)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 64, (2, 128, 128)), jnp.int32)
    assert 2 * 64 * 128 * 128 * 4 > losses.ce_band_bytes()
    cfg = losses.LossConfig(num_classes=64, occl=False)
    loss, metrics = losses.segmentation_loss({"logits": logits}, labels, None, cfg)
    whole = resize.resize_bilinear(jnp.moveaxis(logits, -1, 1), (128, 128), axes=(2, 3))
    expected = losses.pixel_cross_entropy(whole, labels, average="all", axis=1)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["ce"], expected, rtol=1e-6)


def test_banded_cross_entropy_keeps_less():
    """The gradient's temporaries shrink with the bands: the whole-image form holds the
    upsampled logits and their gradient."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(8, 16, 16, 150)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 150, (8, 64, 64)), jnp.int32)
    whole_bytes = 8 * 150 * 64 * 64 * 4  # 19.7 MB of upsampled float32 logits

    def temp_bytes(band_bytes):
        def loss(z):
            return losses.upsampled_cross_entropy(z, labels, 255, "all", band_bytes)

        compiled = jax.jit(jax.grad(loss)).lower(logits).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(whole_bytes // 8) < temp_bytes(1 << 40) / 3


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_banded_cross_entropy_sharded_over_8_devices_equals_single_device(axis_type):
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(8, 6, 7, 5)), jnp.float32)
    labels = rng.integers(0, 5, (8, 25, 28))
    labels[:2, :4] = 255
    labels = jnp.asarray(labels, jnp.int32)

    def loss(z, y):
        return losses.upsampled_cross_entropy(z, y, 255, "labelled", band_bytes=8 * 5 * 28 * 4 * 3)

    single = jax.jit(jax.value_and_grad(loss))(logits, labels)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
        batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        z, y = jax.device_put(logits, batch), jax.device_put(labels, batch)
        sharded = jax.jit(jax.value_and_grad(loss))(z, y)
    np.testing.assert_allclose(sharded[0], single[0], rtol=1e-6)
    np.testing.assert_allclose(sharded[1], single[1], rtol=1e-5, atol=1e-9)
