"""Two JAX processes (gloo on CPU): ShardByJaxProcess + global arrays = one process's batches."""

import multiprocess
import numpy as np
import pytest

from cbp_jax import data

_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from cbp_jax import data

mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
src = data.make_source("scenes", split="train", num_images=10)
tt = data.train_transform((32, 32), (80, 60))
out = []
with data.make_train_loader(src, tt, global_batch_size=4, mesh=mesh, seed=7) as loader:
    for _ in range(3):
        batch = next(loader)
        assert batch["image"].shape == (4, 32, 32, 3)
        # Per-example sums, reduced over the global array by XLA (gloo all-reduce).
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        sums = jax.jit(lambda x: x.sum(axis=(1, 2, 3)), out_shardings=replicated)(batch["image"])
        labels = jax.jit(lambda x: x.sum(axis=(1, 2)), out_shardings=replicated)(batch["label"])
        out.append([np.asarray(sums).tolist(), np.asarray(labels).tolist()])
et = data.test_transform((160, 120))
val = data.make_source("scenes", split="val", num_images=5)
with data.make_eval_loader(val, et, global_batch_size=4, mesh=mesh) as loader:
    for batch in loader:
        index = jax.jit(lambda x: x, out_shardings=replicated)(batch["index"])
        labels = jax.jit(lambda x: x.sum(axis=(1, 2)), out_shardings=replicated)(batch["label"])
        out.append([np.asarray(index).tolist(), np.asarray(labels).tolist()])
print("RESULT" + json.dumps(out))
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_build_the_single_process_batches():
    outs = [multiprocess.result(o) for o in multiprocess.run_processes(_SCRIPT, timeout=240)]
    assert outs[0] == outs[1]  # both processes see the same global values
    src = data.make_source("scenes", split="train", num_images=10)
    tt = data.train_transform((32, 32), (80, 60))
    with data.make_train_loader(src, tt, global_batch_size=4, seed=7) as loader:
        for step in range(3):
            batch = next(loader)
            np.testing.assert_allclose(
                outs[0][step][0], batch["image"].sum(axis=(1, 2, 3)), rtol=1e-5
            )
            np.testing.assert_array_equal(outs[0][step][1], batch["label"].sum(axis=(1, 2)))
    val = data.make_source("scenes", split="val", num_images=5)
    with data.make_eval_loader(val, data.test_transform((160, 120)), global_batch_size=4) as loader:
        for step, batch in enumerate(loader, start=3):
            assert outs[0][step][0] == batch["index"].tolist()
            np.testing.assert_array_equal(
                outs[0][step][1], batch["label"].astype(np.int64).sum(axis=(1, 2))
            )
    assert outs[0][3][0] + outs[0][4][0] == [0, 1, 2, 3, 4, -1, -1, -1]
