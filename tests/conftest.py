"""Test setup: 8 fake CPU devices, set before JAX starts."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402

assert jax.device_count() == 8, "tests/conftest.py must run before anything imports jax"

# Tests train the same small models several times: reuse compiled programs across them.
jax.config.update("jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "cbp_jax_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
