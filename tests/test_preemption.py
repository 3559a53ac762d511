"""SIGTERM: one process's flag, and the step several processes agree on (Orbax + JAX)."""

import os
import signal

import multiprocess
import orbax.checkpoint as ocp
import pytest

from cbp_jax import preemption


def test_one_process_stops_at_the_step_after_sigterm(tmp_path):
    manager = ocp.CheckpointManager(
        str(tmp_path), options=ocp.CheckpointManagerOptions(create=True)
    )
    watcher = preemption.watch()
    try:
        assert not watcher.reached(1, manager)
        os.kill(os.getpid(), signal.SIGTERM)
        # No jax.distributed client: Orbax's check is False, the Python flag decides.
        assert not manager.reached_preemption(2)
        assert watcher.reached(2, manager)
    finally:
        preemption.stop_watching()
        manager.close()


_SCRIPT = r"""
import json, os, signal, sys, time
from cbp_jax import preemption
watcher = preemption.watch()  # before jax.distributed, as train.py does
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
manager = ocp.CheckpointManager(sys.argv[3], options=ocp.CheckpointManagerOptions(create=True))
stop = None
for step in range(1, 200):
    multihost_utils.process_allgather(np.int32(step))  # a collective per step
    if jax.process_index() == 0 and step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    if watcher.reached(step, manager):
        stop = step
        break
print("RESULT" + json.dumps({"stop": stop, "python_handler_ran": watcher.requested}))
"""


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step(tmp_path):
    """A SIGTERM to process 0 only: both processes stop (and would save) at one step."""
    outs = multiprocess.run_processes(_SCRIPT, tmp_path / "ckpt", timeout=300)
    results = [multiprocess.result(out) for out in outs]
    assert results[0]["stop"] is not None and results[0]["stop"] > 3, results
    assert results[0]["stop"] == results[1]["stop"], results
    # JAX's C++ handler took the signal: Python's flag stayed False on the signalled process.
    assert not results[0]["python_handler_ran"], results
