"""Scanned block stacks (``model.scan_blocks``): the same model as the unrolled one (values,
gradients, remat policies, drop-path rates per block), one conversion between the layouts
(``models.stacking``) that the weight importers, the exports and ``factories.restore`` use, and
stacked parameters that shard within their blocks and keep their optimizer groups."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from config_helpers import load_config, perturbed_workdir
from export_helpers import random_state, tiny_config, tiny_segmenter
from flax import nnx

from cbp_jax import config_checks, export, factories, models, predict, train_lib, weights
from cbp_jax import workdir as workdir_lib
from cbp_jax.models import layers, stacking

# Tiny encoders of every family, two blocks per stage so that every stage stacks.
TINY = {
    "mit_b0": dict(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1)),
    "convnext_tiny": dict(dims=(8, 16, 16, 16)),
    "swin_tiny": dict(embed_dim=8, num_heads=(1, 1, 1, 1), window_size=2),
    "resnet50_v1c": dict(stem_channels=8, base_channels=4),
}
SEGMENTOR = {
    "mit_b0": "segformer_b0",
    "convnext_tiny": "upernet_convnext_tiny",
    "swin_tiny": "upernet_swin_tiny",
    "resnet50_v1c": "fcn_resnet50_d8",
}


def _encoder(name, scan, **overrides):
    kwargs = dict(depths=(2, 2, 2, 2), drop_path_rate=0.1, **TINY[name]) | overrides
    return models.create_encoder(
        name, scan_blocks=scan, rngs=nnx.Rngs(params=0, dropout=1), **kwargs
    )


def _segmentor(name, scan, **overrides):
    kwargs = dict(depths=(2, 2, 2, 2), drop_path_rate=0.0, **TINY[name])
    kwargs |= dict(head_width=16, aux_width=8, dropout=0.0, classifier="linear") | overrides
    return models.create(
        SEGMENTOR[name], num_classes=5, scan_blocks=scan, rngs=nnx.Rngs(0), **kwargs
    )


def _raw(x):
    """An array, typed PRNG keys as their key data."""
    is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(x) if is_key else x)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(_raw(x), _raw(y))


# ----------------------------------------------------------------------------- the layouts


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_scanned_model_starts_as_the_stacked_unrolled_one(name):
    """Same seed, same values: the scanned model's state is the unrolled state stacked
    (random streams included, a rate-0 block's fixed stream filled in), and unstacking it
    gives the unrolled state back bit for bit."""
    unrolled, scanned = _encoder(name, False), _encoder(name, True)
    stacks = stacking.module_plan(scanned)
    assert stacks and stacking.module_plan(unrolled) == ()
    want, got = nnx.state(unrolled), nnx.state(scanned)
    _assert_trees_equal(stacking.convert_tree(want, (), stacks, got), got)
    _assert_trees_equal(stacking.convert_tree(got, stacks, (), want), want)


def test_plan_names_the_stacked_blocks():
    """Where each family stacks: every MiT / ConvNeXt block, Swin's pairs at even depth,
    ResNet's blocks after the first; rates are the blocks' own."""
    rates = layers.drop_path_rates(0.3, (2, 3, 1, 2))
    mit = stacking.plan("mit", (2, 3, 1, 2), 0.3, "encoder.")
    assert [(s.blocks, s.path, s.start, s.group) for s in mit[:2]] == [
        ("encoder.stages.0.blocks", "encoder.stages.0.blocks.stacked", 0, 1),
        ("encoder.stages.1.blocks", "encoder.stages.1.blocks.stacked", 0, 1),
    ]
    assert [s.rates for s in mit] == [tuple(r) for r in rates]
    swin = stacking.plan("swin", (2, 3, 1, 2), 0.3)
    assert [(s.blocks, s.group, s.steps) for s in swin] == [
        ("stages.0.blocks", 2, 1),
        ("stages.3.blocks", 2, 1),
    ]
    resnet = stacking.plan("resnet", (2, 3, 1, 2), 0.3)
    assert [(s.path, s.start, s.rates) for s in resnet] == [
        ("stages.0.1.stacked", 1, tuple(rates[0][1:])),
        ("stages.1.1.stacked", 1, tuple(rates[1][1:])),
        ("stages.3.1.stacked", 1, tuple(rates[3][1:])),
    ]


def test_stack_blocks_names_what_is_missing():
    stacks = stacking.plan("mit", (3,), 0.0)
    flat = {f"stages.0.blocks.{i}.norm1.scale": np.full(2, i, np.float32) for i in (0, 2)}
    with pytest.raises(ValueError, match=r"stages\.0\.blocks\.1\.norm1\.scale"):
        stacking.stack_blocks(flat, stacks)
    flat["stages.0.blocks.1.norm1.scale"] = np.full(2, 1, np.float32)
    stacked = stacking.stack_blocks(flat | {"stages.0.norm.scale": np.ones(2)}, stacks)
    np.testing.assert_array_equal(stacked["stages.0.blocks.stacked.norm1.scale"][:, 0], [0, 1, 2])
    assert set(stacking.unstack_blocks(stacked, stacks)) == set(flat) | {"stages.0.norm.scale"}


# ----------------------------------------------------------------------------- same values


def _loss_and_grads(model, x, remat_model=None):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params):
        m = nnx.merge(graphdef, params, rest, copy=True)
        train = m(x, train=True)
        loss = jnp.sum(jnp.sin(train["logits"])) + jnp.sum(train.get("aux_logits", 0.0))
        return loss, m(x, train=False)["logits"]

    (loss, logits), grads = jax.value_and_grad(run, has_aux=True)(params)
    return loss, logits, grads


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TINY))
def test_scan_gives_the_unrolled_logits_and_gradients(name):
    """Train-mode loss and its gradients (drop-path 0) and eval logits of the scanned
    segmentor equal the unrolled one's, its gradients stacked as its parameters are."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    unrolled, scanned = _segmentor(name, False), _segmentor(name, True)
    loss, logits, grads = _loss_and_grads(unrolled, x)
    loss_s, logits_s, grads_s = _loss_and_grads(scanned, x)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    np.testing.assert_allclose(logits_s, logits, atol=1e-5, rtol=1e-5)
    stacks = stacking.module_plan(scanned)
    want = stacking.convert_tree(grads, (), stacks, grads_s)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_remat_policies_give_the_same_values():
    """remat=True and every named policy on the scanned body, and a policy on the unrolled
    blocks, give the values and gradients of no remat."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)
    scanned = _segmentor("mit_b0", True)
    loss, logits, grads = _loss_and_grads(scanned, x)
    stacks = stacking.module_plan(scanned)
    policies = [True, *layers.REMAT_POLICIES]
    for scan, remat in [*((True, p) for p in policies), (False, "dots_saveable")]:
        loss_r, logits_r, grads_r = _loss_and_grads(_segmentor("mit_b0", scan, remat=remat), x)
        if not scan:
            grads_r = stacking.convert_tree(grads_r, (), stacks, grads)
        np.testing.assert_allclose(loss_r, loss, rtol=1e-5, err_msg=str(remat))
        np.testing.assert_allclose(logits_r, logits, atol=1e-5, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_remat_setting_is_validated():
    assert layers.remat_policy("") == (False, None) and layers.remat_policy(True) == (True, None)
    enabled, policy = layers.remat_policy("dots_saveable")
    assert enabled and policy is jax.checkpoint_policies.dots_saveable
    with pytest.raises(ValueError, match=r"remat='dots'.*dots_with_no_batch_dims_saveable"):
        models.create_encoder("mit_b0", remat="dots", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="scan_blocks='yes'"):
        models.create_encoder("mit_b0", scan_blocks="yes", rngs=nnx.Rngs(0))
    config = load_config("camvid_mit_b0", "smoke")
    config.model.remat = True
    assert config_checks.problems(config) == []
    config.model.remat = "dots_saveable"
    assert config_checks.problems(config) == []
    config.model.remat = "everything"
    (found,) = config_checks.problems(config)
    assert "config.model.remat='everything'" in found
    assert "'dots_with_no_batch_dims_saveable'" in found
    read_back = ml_collections.ConfigDict({"model": {"scan_blocks": "yes"}})  # e.g. from JSON
    assert config_checks.problems(read_back) == [
        "config.model.scan_blocks='yes': must be True or False; fix --config.model.scan_blocks=..."
    ]


# ----------------------------------------------------------------------------- drop path


class _Probe(nnx.Module):
    """A block that writes its drop-path output of ones into column ``x[:, -1]`` of its
    input and counts the column up: after n blocks, column i holds block i's mask / keep."""

    def __init__(self, n, rate, rngs):
        self.n = n
        self.drop_path = layers.DropPath(rate, per_call=True, rngs=rngs)

    def __call__(self, x, *, train, drop_rate=None):
        column = x[:, -1].astype(jnp.int32)
        kept = self.drop_path(jnp.ones((x.shape[0], 1)), train=train, rate=drop_rate)
        x = x + jax.nn.one_hot(column, self.n + 1) * kept
        return x.at[:, -1].add(1.0)


@pytest.mark.parametrize("group", [1, 2])
def test_each_scanned_block_drops_at_its_own_rate(group):
    """The per-block rates are scanned data that reach their blocks: rate 0 keeps every
    sample exactly (no noise), rate r drops a fraction r and scales the rest by 1 / (1 - r),
    each block with its own random stream; eval drops nothing."""
    rates = [0.0, 0.3, 0.0, 0.6, 0.3, 0.9]
    rngs = nnx.Rngs(params=0, dropout=7)
    stack = layers.BlockStack([_Probe(len(rates), r, rngs) for r in rates], rates, group=group)
    batch = 20_000
    x = jnp.zeros((batch, len(rates) + 1))
    out = np.asarray(nnx.jit(lambda s, y: s(y, train=True))(stack, x))
    np.testing.assert_array_equal(out[:, -1], len(rates))
    for i, rate in enumerate(rates):
        column = out[:, i]
        if rate == 0:
            np.testing.assert_array_equal(column, 1.0)
            continue
        dropped = np.mean(column == 0)
        assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / batch), (i, dropped)
        np.testing.assert_allclose(column[column != 0], 1 / (1 - rate), rtol=1e-6)
    assert not np.array_equal(out[:, 1] == 0, out[:, 4] == 0)  # same rate, own stream
    again = np.asarray(nnx.jit(lambda s, y: s(y, train=True))(stack, x))
    assert not np.array_equal(again[:, 1], out[:, 1])  # the streams moved on
    np.testing.assert_array_equal(stack(x, train=False)[:, :-1], 1.0)


@pytest.mark.parametrize("name", list(TINY))
def test_encoders_scan_their_blocks_drop_path_rates(name):
    encoder = nnx.eval_shape(lambda: _encoder(name, True, drop_path_rate=0.2))
    got = []
    for stage in encoder.stages:
        for part in stage if name.startswith("resnet") else [stage.blocks]:
            if isinstance(part, layers.BlockStack):
                got.append(part.rates)
    assert got == [s.rates for s in stacking.module_plan(encoder)]
    first = layers.drop_path_rates(0.2, (2, 2, 2, 2))
    assert got[0] == tuple(first[0][1:] if name.startswith("resnet") else first[0])


# ----------------------------------------------------------------------------- weights


@pytest.mark.slow
@pytest.mark.parity
def test_hf_segformer_loads_into_a_scanned_encoder(tmp_path):
    """transformers' SegformerModel (random weights) through the HF importer into the
    stacked layout: the stages match PyTorch's within the parity tolerance."""
    import torch
    import transformers as T
    from torch_refs import assert_close, forward_eval, images, nhwc, randomize_

    cfg = T.SegformerConfig(depths=[2, 2, 2, 2], hidden_sizes=[16, 32, 32, 32])
    cfg.num_attention_heads = [1, 1, 2, 2]
    hf = randomize_(T.SegformerModel(cfg), seed=1)
    hf.save_pretrained(tmp_path)
    enc = models.create_encoder(
        "mit_b0", depths=(2, 2, 2, 2), embed_dims=(16, 32, 32, 32), num_heads=(1, 1, 2, 2),
        norm_eps=1e-5, patch_norm_eps=1e-5, scan_blocks=True, rngs=nnx.Rngs(0),
    )  # fmt: skip
    report = weights.load_pretrained(enc, tmp_path, verbose=False)
    assert report.fresh == {} and "stages.3.blocks.1.mlp.fc2.kernel" in report.loaded
    assert enc.stages[0].blocks.stacked.attn.q.kernel.shape == (2, 16, 16)
    x, xt = images(1, 64, 64, seed=2)
    with torch.no_grad():
        refs = [nhwc(h) for h in hf(xt, output_hidden_states=True).hidden_states]
    for ours, ref in zip(forward_eval(enc, x), refs, strict=True):
        assert_close(ours, ref)


@pytest.mark.slow
@pytest.mark.parity
def test_hf_swin_loads_into_scanned_window_pairs(tmp_path):
    """transformers' SwinBackbone into Swin with stacked (window, shifted window) pairs."""
    import torch
    import transformers as T
    from torch_refs import assert_close, forward_eval, images, nhwc, randomize_

    out = ["stage1", "stage2", "stage3", "stage4"]
    cfg = T.SwinConfig(
        embed_dim=8, depths=[2, 4, 2, 2], num_heads=[1, 1, 2, 2], window_size=3, out_features=out
    )
    hf = randomize_(T.SwinBackbone(cfg), seed=3)
    hf.save_pretrained(tmp_path)
    enc = models.create_encoder(
        "swin_tiny", embed_dim=8, depths=(2, 4, 2, 2), num_heads=(1, 1, 2, 2), window_size=3,
        scan_blocks=True, rngs=nnx.Rngs(0),
    )  # fmt: skip
    report = weights.load_pretrained(enc, tmp_path, verbose=False)
    assert report.fresh == {}
    assert enc.stages[1].blocks.stacked[1].attn.q.kernel.shape == (2, 16, 16)
    x, xt = images(1, 96, 96, seed=4)
    with torch.no_grad():
        refs = [nhwc(f) for f in hf(xt).feature_maps]
    for ours, ref in zip(forward_eval(enc, x), refs, strict=True):
        assert_close(ours, ref)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("ade20k_mit_b0", {}),
        ("ade20k_fcn_resnet101", dict(depths=(2, 3, 2, 2))),
    ],
)
def test_mmseg_export_of_a_scanned_model_reads_back_into_both_layouts(tmp_path, name, overrides):
    """--to mmseg reads a scanned model through its unrolled view (the export checks the
    file back into the scanned layout itself); the file loads into the unrolled twin with
    every variable equal to the scanned model's unstacked."""
    overrides = dict(depths=(2, 2, 2, 2)) | overrides
    seg = tiny_segmenter(name, "linear", seed=1, scan_blocks=True, **overrides)
    assert stacking.module_plan(seg.model())
    path = tmp_path / "model.pth"
    export.export_mmseg(seg, str(path))
    twin = tiny_segmenter(name, "linear", seed=2, scan_blocks=False, **overrides)
    model = twin.model()
    assert weights.load_pretrained(model, path, verbose=False).fresh == {}
    got = {k: v[...] for k, v in weights.rules.targets(model).items()}
    scanned = {k: v[...] for k, v in weights.rules.targets(seg.model()).items()}
    want = stacking.unstack_blocks(scanned, stacking.module_plan(seg.model()))
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_hf_export_reads_a_scanned_segformer_through_its_unrolled_view():
    """``--to hf``'s tensors of a scanned SegFormer are those of its unrolled twin holding the
    same weights (converted with ``stacking.convert_tree``)."""
    config = tiny_config("ade20k_mit_b0", "linear", head="mlp", depths=(2, 1, 3, 2))
    config.model.scan_blocks = True
    state = random_state(config, seed=4)
    twin_config = factories.with_scan_blocks(config, False)
    model = nnx.eval_shape(lambda: factories.model_from_config(config))
    twin = nnx.eval_shape(lambda: factories.model_from_config(twin_config))
    stacks = stacking.module_plan(model), stacking.module_plan(twin)
    _, *twin_state = train_lib.split_model(twin)
    twin_state = {
        part: stacking.convert_tree(state[part], *stacks, like)
        for part, like in zip(("params", "model_state"), twin_state, strict=True)
    }
    got = export.hf_state_dict(predict.Segmenter(config, state))
    want = export.hf_state_dict(predict.Segmenter(twin_config, twin_state))
    assert "segformer.encoder.block.2.2.mlp.dense1.weight" in got and set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ----------------------------------------------------------------------------- checkpoints


def _scan_config(scan: bool):
    config = load_config("camvid_mit_b0", "smoke")
    config.model.update(depths=(2, 2, 2, 2), drop_path_rate=0.1, scan_blocks=scan)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("trained_scanned", [False, True])
def test_restore_converts_a_checkpoint_of_the_other_layout(tmp_path, trained_scanned):
    """A workdir trained in one layout restores (eval, predict, export) into the other:
    every parameter and BatchNorm / random-stream state is the saved one, converted; the
    eval config check lets scan_blocks and remat differ; resuming says how to."""
    workdir = perturbed_workdir(_scan_config(trained_scanned), str(tmp_path / "run"))
    _, saved = factories.restore(_scan_config(trained_scanned), workdir)  # as it was written
    config = _scan_config(not trained_scanned)
    config.model.remat = "dots_saveable"
    step, state = factories.restore(config, workdir)
    assert step == 3
    model = nnx.eval_shape(lambda: factories.model_from_config(config))
    twin = nnx.eval_shape(lambda: factories.model_from_config(_scan_config(trained_scanned)))
    stacks = stacking.module_plan(twin), stacking.module_plan(model)
    for part in ("params", "model_state"):
        _assert_trees_equal(state[part], stacking.convert_tree(saved[part], *stacks, state[part]))
    with pytest.raises(workdir_lib.ConfigMismatchError, match="model.scan_blocks="):
        workdir_lib.check_resume_config(workdir, config)


def test_a_run_from_before_scan_blocks_resumes_unrolled(tmp_path):
    """config.json without model.scan_blocks was trained unrolled: resuming it scanned is
    refused with the layout to resume in; unrolled it resumes."""
    config = _scan_config(False)
    saved = workdir_lib.config_as_dict(config)
    del saved["model"]["scan_blocks"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    workdir_lib.check_resume_config(str(tmp_path), config)
    with pytest.raises(workdir_lib.ConfigMismatchError, match="scan_blocks=False\\)"):
        workdir_lib.check_resume_config(str(tmp_path), _scan_config(True))


# ----------------------------------------------------------------------------- training setup


def _names(tree, is_leaf=None) -> dict:
    """``{dotted path: leaf}`` of a pytree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    return {jax.tree_util.keystr(p, simple=True, separator="."): x for p, x in leaves}


def _per_block(flat: dict, stacks, fn) -> dict:
    """``flat`` with each stacked entry replaced by ``fn(entry)`` under each of its blocks'
    unrolled names (a per-leaf property, e.g. a sharding, read per block)."""
    out = {}
    for name, value in flat.items():
        stack = next((s for s in stacks if name.startswith(s.path + ".")), None)
        if stack is None:
            out[name] = value
            continue
        for i in range(stack.steps):  # group 1 (MiT / ConvNeXt)
            out[f"{stack.blocks}.{stack.start + i}.{name[len(stack.path) + 1 :]}"] = fn(value)
    return out


def _specs(config, mesh):
    with jax.set_mesh(mesh):
        shardings = factories.TrainSetup(config, mesh).state_shardings
    return {k: tuple(s.spec) for k, s in _names(shardings).items()}


@pytest.mark.slow
def test_stacked_parameters_shard_within_their_blocks():
    """FSDP partition rules on the scanned model: the block axis is never split, and each
    stacked parameter (and its optimizer moments) is split as the unrolled block's is."""
    mesh = factories.mesh_from_config(_fsdp(_scan_config(True)))
    scanned = _specs(_fsdp(_scan_config(True)), mesh)
    unrolled = _specs(_fsdp(_scan_config(False)), mesh)
    stacked = {k: v for k, v in scanned.items() if ".stacked." in k}
    assert any("fsdp" in v for v in stacked.values())
    assert all(len(v) == 0 or v[0] is None for v in stacked.values())
    stacks = stacking.plan("mit", (2, 4, 2, 2), 0.1, "params.encoder.")
    per_block = _per_block(scanned, stacks, lambda spec: spec[1:])
    params = {k: v for k, v in unrolled.items() if k.startswith("params.")}
    assert {k: v for k, v in per_block.items() if k in params} == params
    moments = [k for k, v in stacked.items() if k.startswith("opt_state") and "fsdp" in v]
    assert moments


def _fsdp(config):
    # Stage 1's four (64, 64) kernels: too small to split one by one (sharding.fsdp_spec's
    # min_size), not stacked together.
    config.model.depths = (2, 4, 2, 2)
    config.mesh.update(data=2, fsdp=4)
    config.batch_size = 8
    return config


def test_optimizer_groups_and_flops_see_stacked_blocks_as_blocks():
    """ConvNeXt's recipe (no decay on 1-D parameters, stage-wise rates) gives each stacked
    parameter its block's group; the model summary's FLOPs are the unrolled model's (XLA
    counts a scanned body once)."""
    config = load_config("ade20k_convnext_base", "smoke")
    config.model.update(depths=(2, 2, 2, 2), dims=(8, 16, 16, 16), head_width=16, aux_width=8)
    config.data.update(crop_size=(32, 32), num_classes=7)
    groups, summaries = {}, {}
    for scan in (False, True):
        config.model.scan_blocks = scan
        model = nnx.eval_shape(lambda: factories.model_from_config(config))
        _, params, model_state = train_lib.split_model(model)
        lr, decay = train_lib.param_groups(model, params, config.optimizer)
        pairs = jax.tree.map(lambda m, d: (m, d), lr, decay)
        groups[scan] = _names(pairs, is_leaf=lambda x: isinstance(x, tuple))
        abstract = {"params": params, "model_state": model_state}
        summaries[scan] = factories.model_summary(config, abstract)
    stacks = stacking.plan("convnext", (2,) * 4, 0.0, "encoder.")
    assert _per_block(groups[True], stacks, lambda group: group) == groups[False]
    assert groups[True]["encoder.stages.1.blocks.stacked.gamma.value"][1] is False  # 1-D
    assert summaries[True] == summaries[False]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ade20k_mit_b5", "ade20k_swin_base"])
def test_scanned_train_and_eval_steps_lower_for_cuda_with_fsdp(name):
    """The paper models with scan_blocks lower for CUDA on a 4 x 2 mesh with every state
    leaf sharded as the partition rules say (``test_lowering``'s checks) and one scanned body
    per stage."""
    from test_lowering import UNUSED_IN_EVAL, UNUSED_IN_TRAIN, _check_module, abstract_steps

    config = load_config(name, None)
    config.model.scan_blocks = True
    (train, inputs), (eval_traced, eval_inputs) = abstract_steps(config)
    lowered = train.lower(lowering_platforms=("cuda",))
    counts = _check_module(lowered, "cuda", inputs, name.endswith("mit_b5"), UNUSED_IN_TRAIN)
    assert counts["fsdp"] > 20, counts
    assert lowered.as_text().count("stablehlo.while") >= 4  # a loop per stage
    lowered = eval_traced.lower(lowering_platforms=("cuda",))
    _check_module(lowered, "cuda", eval_inputs, name.endswith("mit_b5"), UNUSED_IN_EVAL)
