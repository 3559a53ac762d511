"""The train and eval programs of the four model families, lowered for TPU and CUDA here.

No accelerator is needed to lower: on an abstract 4 x 2 ("data", "fsdp") mesh each program is
traced once and lowered for each platform. The module text must then hold no CPU-only
custom call, only the formulations meant for that platform (those chosen per platform carry
a named scope), and the shardings the config's partition rules give every state leaf and the
batch (Shardy's ``sdy.sharding`` annotations of ``@main``'s arguments).
"""

import re

import jax
import jax.numpy as jnp
import pytest
from config_helpers import load_config
from jax.sharding import AbstractMesh, AxisType

from cbp_jax import factories

PLATFORMS = ("tpu", "cuda")
CPU_ONLY_CUSTOM_CALL = re.compile(
    r"^(lapack_|cpu_|xla_ffi_python_cpu_callback|xla_python_cpu_callback|ducc_|onednn|"
    r"__onednn|mkl|xnn|ynn)"
)
CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.$-]+)")
# One argument of @main in as_text(debug_info=True): %argN: tensor<...> {attributes} loc("name")
MAIN_ARG = re.compile(r'%arg\d+: tensor<[^>]*>(?: \{((?:[^{}]|\{[^{}]*\})*)\})? loc\("([^"]*)"\)')
CPU_SCOPES = ("dwconv_shifted", "class_sums_by_slices")
# Inputs a program may leave unread (jit prunes them from @main): the dropout / drop-path
# RNG state of blocks whose rate is 0, the optimizer's injected learning rate (the schedule
# computes it), and at evaluation every RNG state and the auxiliary head.
UNUSED_IN_TRAIN = re.compile(r"\['rngs'\]|\.hyperparams\['learning_rate'\]")
UNUSED_IN_EVAL = re.compile(r"\['rngs'\]|\['aux_(head|classifier)'\]")

FAMILIES = {  # config, whether its encoder has depthwise convolutions
    "segformer_b5": ("ade20k_mit_b5", True),
    "upernet_convnext_base": ("ade20k_convnext_base", True),
    "upernet_swin_base": ("ade20k_swin_base", False),
    "fcn_resnet101": ("ade20k_fcn_resnet101", False),
}


def _abstract_mesh():
    return AbstractMesh((4, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)


def _sdy_dims(spec, ndim: int) -> str:
    """Shardy's text for a PartitionSpec: P(None, "fsdp") on 2 dims -> [{}, {"fsdp"}]."""
    dims = []
    for i in range(ndim):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        dims.append("{" + ", ".join(f'"{a}"' for a in axes) + "}")
    return "[" + ", ".join(dims) + "]"


def _main_args(text: str) -> dict[str, str]:
    """``{argument name: its attributes}`` of ``@main``."""
    signature = text[text.index("func.func public @main(") :]
    signature = signature[: signature.index("\n")]
    return {name: attrs or "" for attrs, name in MAIN_ARG.findall(signature)}


def _check_module(
    lowered, platform: str, inputs: dict, depthwise: bool, may_be_unused: re.Pattern
) -> dict[str, int]:
    """Checks a lowered program; returns counts of what it checked."""
    text = lowered.as_text(debug_info=True)
    assert "mhlo.num_partitions = 8 : i32" in text
    assert 'sdy.mesh @mesh = <["data"=4, "fsdp"=2]>' in text
    cpu_calls = sorted({c for c in CUSTOM_CALL.findall(text) if CPU_ONLY_CUSTOM_CALL.match(c)})
    assert not cpu_calls, f"{platform}: CPU-only custom calls {cpu_calls}"
    for scope in CPU_SCOPES:
        assert scope not in text, f"{platform}: the CPU formulation {scope} is in the module"
    if depthwise:
        assert "dwconv_xla" in text, f"{platform}: no XLA depthwise convolution"
    args = _main_args(text)
    checked = fsdp = 0
    for name, (sharding, ndim) in inputs.items():
        if name not in args:  # an input the program never reads is pruned
            assert may_be_unused.search(name), f"{platform}: {name} is not an input"
            continue
        want = f"#sdy.sharding<@mesh, {_sdy_dims(sharding.spec, ndim)}>"
        assert want in args[name], f"{platform}: {name} has {args[name]!r}, want {want}"
        checked += 1
        fsdp += '"fsdp"' in want
    return {"checked": checked, "fsdp": fsdp}


def _named(prefix: str, shardings, abstract) -> dict:
    """``{loc name: (sharding, ndim)}`` for every leaf, named as jit names its arguments."""
    flat_shardings = jax.tree_util.tree_flatten_with_path(shardings)[0]
    flat_abstract = jax.tree.leaves(abstract)
    return {
        prefix + jax.tree_util.keystr(path): (s, _lowered_ndim(a))
        for (path, s), a in zip(flat_shardings, flat_abstract, strict=True)
    }


def _lowered_ndim(a) -> int:
    """A typed PRNG key lowers to its key data, one (threefry: 2 words) axis more."""
    return a.ndim + int(jnp.issubdtype(a.dtype, jax.dtypes.prng_key))


def abstract_steps(config) -> tuple[tuple, tuple]:
    """The train and eval steps of ``config`` on the abstract 4 x 2 mesh, traced:
    ``((train, its named inputs), (eval, its named inputs))`` for :func:`_check_module`."""
    config.mesh.update(data=4, fsdp=2)
    mesh = _abstract_mesh()
    setup = factories.TrainSetup(config, mesh)
    h, w = config.data.crop_size
    batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, h, w, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((config.batch_size, h, w), jnp.int32),
    }
    train_inputs = _named("state", setup.state_shardings, setup.abstract_state)
    train_inputs |= _named("batch", {k: setup.batch_sharding for k in batch}, batch)
    train = setup.train_step().trace(setup.abstract_state, batch)
    model_state = {k: setup.abstract_state[k] for k in ("params", "model_state")}
    images = jax.ShapeDtypeStruct((8, h, w, 3), jnp.float32)
    eval_inputs = _named("state", setup.model_shardings(), model_state)
    eval_inputs |= _named("images", setup.batch_sharding, images)
    eval_fn = factories.eval_step(factories.eval_graphdef(config), setup.model_shardings(), mesh)
    return (train, train_inputs), (eval_fn.trace(model_state, images), eval_inputs)


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_train_and_eval_steps_lower_for_tpu_and_cuda(model):
    name, depthwise = FAMILIES[model]
    (traced, train_inputs), (eval_traced, eval_inputs) = abstract_steps(load_config(name, None))
    for platform in PLATFORMS:
        lowered = traced.lower(lowering_platforms=(platform,))
        counts = _check_module(lowered, platform, train_inputs, depthwise, UNUSED_IN_TRAIN)
        assert counts["fsdp"] > 50, counts  # the encoder's weights and their moments
        assert '"data", "fsdp"' in _main_args(lowered.as_text(debug_info=True))["batch['image']"]
        lowered = eval_traced.lower(lowering_platforms=(platform,))
        counts = _check_module(lowered, platform, eval_inputs, depthwise, UNUSED_IN_EVAL)
        assert counts["fsdp"] > 20, counts


def test_cpu_lowering_keeps_the_cpu_formulations():
    """The control: the same check on a small model lowered for CPU finds the CPU forms, so
    their absence above means something."""
    config = load_config("scenes_mit_b0", "smoke")
    config.mesh.update(data=4, fsdp=2)
    setup = factories.TrainSetup(config, _abstract_mesh())
    h, w = config.data.crop_size
    batch = {
        "image": jax.ShapeDtypeStruct((8, h, w, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((8, h, w), jnp.int32),
    }
    traced = setup.train_step().trace(setup.abstract_state, batch)
    text = traced.lower(lowering_platforms=("cpu",)).as_text(debug_info=True)
    assert "dwconv_shifted" in text and "dwconv_xla" not in text
    tpu = traced.lower(lowering_platforms=("tpu",)).as_text(debug_info=True)
    assert "dwconv_xla" in tpu and "dwconv_shifted" not in tpu
