"""The persistent compilation cache: a second process compiles nothing the first did."""

import json
import os
import subprocess
import sys

import pytest
from config_helpers import load_config

from cbp_jax import compilation, eval_lib, trainer

_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from cbp_jax import compilation
compilation.enable_persistent_cache(sys.argv[1])
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0))
f(jnp.ones((32, 16))).block_until_ready()
print(json.dumps({"compiled": compilation.compiled(), "loaded": compilation.loaded_from_cache()}))
"""


def _run(cache: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, cache], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_every_program_from_the_cache(tmp_path):
    cache = str(tmp_path / "compilation_cache")
    first = _run(cache)
    assert first["compiled"] >= 1 and first["loaded"] == 0
    assert os.listdir(cache)
    second = _run(cache)
    assert second == {"compiled": 0, "loaded": first["compiled"]}


def test_cache_dir_setting(tmp_path):
    assert compilation.cache_dir("workdir", "w") == os.path.join("w", "compilation_cache")
    assert compilation.cache_dir("", "w") == ""
    assert compilation.cache_dir("/c", "w") == "/c"


@pytest.mark.slow
def test_evaluating_a_trained_workdir_compiles_nothing_new(tmp_path):
    config = load_config("scenes_mit_b0")
    config.total_steps = 2
    workdir = str(tmp_path / "run")
    trainer.train_and_evaluate(config, workdir)
    assert os.listdir(os.path.join(workdir, "compilation_cache"))
    result = eval_lib.evaluate_checkpoint(config, workdir)
    assert result["compilations"] == 0
