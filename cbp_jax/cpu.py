"""CPU hosts: one JAX device per core, so that data parallelism keeps every core busy.

XLA:CPU runs one program on one device with only part of its ops split over threads.
Splitting the host into one device per core and sharding the batch over them, as on GPUs,
keeps the cores busier in training and inference (docs/benchmarks.md). Same numbers: BatchNorm
statistics and OCCL centroids are global over the sharded batch. This module imports
nothing heavy: call :func:`use_cores_as_devices` before JAX is imported. On GPU/TPU hosts
it only adds CPU devices that go unused.
"""

import os
import sys

_FLAG = "--xla_force_host_platform_device_count"


def use_cores_as_devices(max_devices: int = 8) -> None:
    """Sets ``XLA_FLAGS`` for one CPU device per core (at most ``max_devices``).

    Leaves an explicit ``--xla_force_host_platform_device_count`` alone. Raises if JAX is
    already imported (the flag would be ignored silently).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if _FLAG in flags:
        return
    if "jax" in sys.modules:
        raise RuntimeError("use_cores_as_devices() must run before jax is imported.")
    count = max(1, min(os.cpu_count() or 1, max_devices))
    os.environ["XLA_FLAGS"] = f"{flags} {_FLAG}={count}".strip()
