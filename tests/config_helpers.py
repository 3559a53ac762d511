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
