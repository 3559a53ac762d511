"""Loading the experiment configs and the bench scripts in tests (not a test module)."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_module(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name: str, arg: str | None = "smoke"):
    """``configs/<name>.py``'s ``get_config(arg)``."""
    return _load_module(name, os.path.join(ROOT, "configs", f"{name}.py")).get_config(arg)


def load_bench(name: str):
    """The script ``bench/<name>.py`` as a module (bench/ is not a package)."""
    return _load_module(name, os.path.join(ROOT, "bench", f"{name}.py"))


def fresh_train_state(config):
    """A fresh (seeded) train state with optimizer moments on one device, as a checkpoint
    of the run would hold it."""
    import jax

    from cbp_jax import factories

    mesh = factories.single_device_mesh()
    with jax.set_mesh(mesh):
        return factories.TrainSetup(config, mesh).init_state()


def perturbed_state(config, seed: int):
    """A fresh state with every parameter and BatchNorm statistic moved off its init, so
    that a wrong layout or a training-mode BatchNorm shows in the logits."""
    import zlib

    import jax
    import numpy as np

    state = fresh_train_state(config)
    leaves, tree = jax.tree.flatten(state["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys, strict=True)
    ]
    state["params"] = jax.tree.unflatten(tree, leaves)

    def stats(path, x):
        name = jax.tree_util.keystr(path)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        if name.endswith("['mean']"):
            return rng.normal(0, 0.3, x.shape).astype(np.float32)
        if name.endswith("['var']"):
            return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        return x

    state["model_state"] = jax.tree_util.tree_map_with_path(stats, state["model_state"])
    return state


def perturbed_workdir(config, path: str) -> str:
    """A workdir with one checkpoint (step 3) of a perturbed model (``perturbed_state``)."""
    import os

    from cbp_jax import checkpointing
    from cbp_jax import workdir as workdir_lib

    state = perturbed_state(config, seed=3)
    checkpointer = checkpointing.Checkpointer(
        os.path.join(path, "checkpoints"), every=1, async_save=False
    )
    checkpointer.save(3, state, {}, force=True)
    checkpointer.close()
    workdir_lib.write_config(path, config)
    return path
