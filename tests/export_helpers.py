"""Small segmenters for the export tests (not a test module): every paper family at a tiny
width, with random weights drawn without running the model's init (seconds on a busy CPU)."""

import os

import jax
import numpy as np
from config_helpers import load_config
from flax import nnx

from cbp_jax import checkpointing, factories, predict, prototypes, train_lib
from cbp_jax import workdir as workdir_lib

# config name -> overrides that shrink its smoke variant (one block per stage) further.
TINY = {
    "ade20k_mit_b0": {},
    "ade20k_convnext_base": dict(dims=(16, 32, 64, 128), head_width=32, aux_width=16),
    "ade20k_swin_base": dict(embed_dim=16, num_heads=(1, 2, 2, 4), head_width=32, aux_width=16),
    "ade20k_fcn_resnet101": dict(stem_channels=16, base_channels=8, head_width=24, aux_width=12),
}


def tiny_config(name: str, classifier: str, num_classes: int = 7, **overrides):
    """``configs/<name>.py:smoke`` with ``TINY[name]``, ``classifier`` and ``overrides``."""
    config = load_config(name, "smoke")
    config.data.num_classes = num_classes  # not the data set's: ids stand in for names
    config.model.update({"classifier": classifier, **TINY[name], **overrides})
    return config


def random_state(config, seed: int) -> dict:
    """``{"params", "model_state"}`` of ``config``'s model with random values: kernels
    N(0, 1 / fan_in), norm scales 1 + N(0, 0.2), biases N(0, 0.2), BatchNorm means N(0, 0.3)
    and variances U(0.5, 1.5), the config's CBP prototypes, fresh RNG streams."""
    abstract = nnx.eval_shape(lambda: factories.model_from_config(config, "float32"))
    _, params, model_state = train_lib.split_model(abstract)
    rng = np.random.default_rng(seed)
    m = config.model

    def fill(path, x):
        name = jax.tree_util.keystr(path)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if "['prototypes']" in name:
            key = jax.random.key(config.seed)
            return prototypes.category_basis_prototypes(key, *x.shape, m.cbp_length)
        if not np.issubdtype(x.dtype, np.floating):
            return np.zeros(x.shape, x.dtype)
        if "['mean']" in name:
            return rng.normal(0, 0.3, x.shape).astype(np.float32)
        if "['var']" in name:
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        if len(x.shape) >= 2:
            fan_in = int(np.prod(x.shape[:-1]))
            return (rng.normal(size=x.shape) / fan_in**0.5).astype(np.float32)
        if "['scale']" in name:
            return (1 + rng.normal(0, 0.2, x.shape)).astype(np.float32)
        return rng.normal(0, 0.2, x.shape).astype(np.float32)

    fill_tree = lambda t: jax.tree_util.tree_map_with_path(fill, t)  # noqa: E731
    return {"params": fill_tree(params), "model_state": fill_tree(model_state)}


def tiny_segmenter(name: str, classifier: str, seed: int = 0, **overrides) -> predict.Segmenter:
    config = tiny_config(name, classifier, **overrides)
    return predict.Segmenter(config, random_state(config, seed))


def model_workdir(config, state: dict, path: str, step: int = 3) -> str:
    """A workdir with ``config`` and one checkpoint holding only the model (``state``), all
    that ``predict`` / ``export.py`` restore."""
    checkpointer = checkpointing.Checkpointer(
        os.path.join(path, "checkpoints"), every=1, async_save=False
    )
    checkpointer.save(step, state, {}, force=True)
    checkpointer.close()
    workdir_lib.write_config(path, config)
    return path
