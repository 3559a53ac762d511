"""The one two-process harness: a Python script run as JAX processes 0 .. n-1 on localhost.

The script gets ``sys.argv[1:] = [coordinator port, process id, *args]`` and sets up
``jax.distributed`` itself (gloo collectives on CPU). It runs with the repository on
``PYTHONPATH``, in the repository, without the test session's fake-device ``XLA_FLAGS``.
"""

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(
    script: str, *args: str, num_processes: int = 2, timeout: float = 400
) -> list[str]:
    """Runs the Python ``script`` as ``num_processes`` processes, each with ``sys.argv[1:] =
    [port, process id, *args]``; returns their stdouts in process order."""
    return run_commands(
        lambda port, i: [sys.executable, "-c", script, str(port), str(i), *map(str, args)],
        num_processes=num_processes,
        timeout=timeout,
    )


def run_commands(
    command_of: Callable[[int, int], list[str]],
    *,
    num_processes: int = 2,
    timeout: float = 400,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Runs ``command_of(coordinator port, process id)`` for every process at once; returns
    their stdouts (stderr folded in) in process order.

    A process that fails (or outlives ``timeout``) fails the test with its output's tail; the
    others are killed rather than left waiting on the coordinator. ``env`` (default: this
    one's, with the repository on ``PYTHONPATH`` and no ``XLA_FLAGS``) is each one's.
    """
    port = free_port()
    if env is None:
        env = {**os.environ, "PYTHONPATH": REPO}
        env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            command_of(port, i),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for i in range(num_processes)
    ]
    outs = []
    try:
        for i, proc in enumerate(procs):
            output, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, f"process {i} failed:\n{output[-3000:]}"
            outs.append(output)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outs


def result(stdout: str, prefix: str = "RESULT") -> object:
    """The JSON after ``prefix`` on the last stdout line that starts with it."""
    lines = [x for x in stdout.splitlines() if x.startswith(prefix)]
    assert lines, f"no {prefix!r} line in:\n{stdout[-2000:]}"
    return json.loads(lines[-1][len(prefix) :])
