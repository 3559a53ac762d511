"""A user's mistakes at the command line end in one line naming the file or flag and the
fix, without a traceback: a config file that does not compile, an unknown variant, bad
eval ratios, a weights file of random bytes, an output path that is a folder."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "ade20k_mit_b0.py:smoke")


def _run(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    command = [sys.executable, os.path.join(ROOT, script), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """The run's error line; fails unless it exited 1 with no traceback."""
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_config_mistakes_are_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    x = (\n")
    line = _one_error_line(_run("eval.py", "--config", str(broken), cwd=tmp_path))
    assert line == f"error: --config {broken}: {broken}:2: SyntaxError: '(' was never closed"

    line = _one_error_line(_run("predict.py", "--config", SMOKE[:-1], cwd=tmp_path))
    assert line.startswith(f"error: --config {SMOKE[:-1]}: ValueError: unknown config variant")
    assert "'smok'; known: ('smoke', 'baseline', 'paper')" in line

    line = _one_error_line(_run("train.py", "--config", str(tmp_path / "none.py"), cwd=tmp_path))
    assert line == f"error: --config {tmp_path / 'none.py'}: no such file {tmp_path / 'none.py'}."

    for ratios in ("(0.0,1.0)", "()"):
        done = _run("eval.py", "--config", SMOKE, f"--config.eval.ratios={ratios}", cwd=tmp_path)
        line = _one_error_line(done)
        assert line.startswith("  config.eval.ratios=") and "must be a non-empty tuple" in line
        assert "fix --config.eval.ratios=..." in line


@pytest.mark.slow
def test_weights_of_random_bytes_are_one_line(tmp_path):
    (tmp_path / "random.safetensors").write_bytes(os.urandom(5000))
    done = _run("eval.py", "--config", SMOKE, "--weights", "random.safetensors", cwd=tmp_path)
    line = _one_error_line(done)
    assert line.startswith("error: 'random.safetensors' is not a valid safetensors file")
    assert "Download it again or pass another file." in line

    (tmp_path / "a_folder.jaxexport").mkdir()
    done = _run("export.py", "--config", SMOKE, "--weights", "random.safetensors",
                "--to", "jax", "--out", "a_folder.jaxexport", cwd=tmp_path)  # fmt: skip
    line = _one_error_line(done)  # before the weights are read
    expected = "--out a_folder.jaxexport is a folder; name a file to write (or remove it)."
    assert line == f"error: {expected}"
