"""Faults injected for real: a full disk, truncated checkpoints, a second process on the
workdir, a NaN run restarted with a lower rate, a bad data file mid-run, bad config values and
weight files, SIGTERM during start-up. docs/reliability.md tabulates them."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_helpers import ROOT, load_config
from data_helpers import make_ade20k
from test_train import _env, read_losses, tiny_config

from cbp_jax import checkpointing, config_checks, errors, factories, logs, trainer, weights
from cbp_jax import workdir as workdir_lib
from cbp_jax.data import loader as loader_lib


def _small_state(seed: int) -> dict:
    """About 1.2 MB of incompressible float32: one fits a 2 MB disk, two do not."""
    return {
        "w": jax.random.normal(jax.random.key(seed), (300_000,)),
        "step": jnp.asarray(seed, jnp.int32),
    }


def _run(args, **kwargs):
    return subprocess.run(
        [sys.executable, *args], env=_env(), text=True, capture_output=True, cwd=ROOT, **kwargs
    )


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (as root), else a folder made read-only: a real write failure either way."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)]).returncode
        == 0
    )
    yield disk, mounted
    if mounted:
        subprocess.run(["umount", str(disk)], check=True)
    else:
        os.chmod(disk / "ck", 0o755)


def test_failed_async_save_stops_with_one_message_and_keeps_previous(small_disk):
    disk, mounted = small_disk
    ck = checkpointing.Checkpointer(str(disk / "ck"), every=1, keep=3, async_save=True)
    ck.save(1, _small_state(1), {"step": 1}, force=True)
    ck.wait()
    if not mounted:
        os.chmod(disk / "ck", 0o555)
    with pytest.raises(checkpointing.CheckpointSaveError) as info:
        ck.save(2, _small_state(2), {"step": 2}, force=True)
        for _ in range(200):  # the training loop's per-step check
            ck.check_saves()
            time.sleep(0.05)
    message = str(info.value)
    assert "step 2" in message and str(disk / "ck") in message
    assert "MiB free" in message and "steps [1]" in message and "rerun" in message
    assert sorted(os.listdir(disk / "ck")) == ["1"]  # no *.orbax-checkpoint-tmp left behind
    ck.close()  # the failure was reported once; closing does not raise it again
    restored = checkpointing.Checkpointer(str(disk / "ck"), every=1).restore_latest(_small_state(0))
    assert restored[0] == 1 and np.array_equal(restored[1]["w"], _small_state(1)["w"])


@pytest.mark.parametrize("damage", ["truncate_data_file", "delete_manifest"])
def test_broken_latest_checkpoint_falls_back_and_is_kept(tmp_path, damage, caplog):
    ck = checkpointing.Checkpointer(str(tmp_path), every=1, async_save=False)
    for step in (1, 2):
        ck.save(step, _small_state(step), {"step": step}, force=True)
    ck.close()
    ocdbt = tmp_path / "2" / "state" / "ocdbt.process_0"
    if damage == "truncate_data_file":
        for f in (ocdbt / "d").iterdir():
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    else:
        (tmp_path / "2" / "state" / "manifest.ocdbt").unlink(missing_ok=True)
        (ocdbt / "manifest.ocdbt").unlink()
    with caplog.at_level(logging.WARNING):
        step, state, data_state = checkpointing.Checkpointer(str(tmp_path), every=1).restore_latest(
            _small_state(0)
        )
    assert step == 1 and data_state == {"step": 1}
    assert np.array_equal(state["w"], _small_state(1)["w"])
    assert os.path.isdir(tmp_path / "2.broken")  # set aside, not deleted
    assert any(f"{tmp_path}/2 does not restore" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- the workdir


_HOLD_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from cbp_jax import workdir
workdir.WorkdirLock({path!r}).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _lock_holder(path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK.format(root=ROOT, path=str(path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_second_process_on_a_workdir_stops_naming_the_holder(tmp_path):
    holder = _lock_holder(tmp_path)
    try:
        with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {holder.pid} on host"):
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
        # train.py stops at once, before touching the workdir's config or logs.
        result = _run(
            ["train.py", "--config", "configs/scenes_mit_b0.py:smoke", "--workdir", str(tmp_path)]
        )
        assert result.returncode == 1 and f"in use by pid {holder.pid}" in result.stderr
        assert "Traceback" not in result.stderr
        assert sorted(os.listdir(tmp_path)) == ["train.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    holder = _lock_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING):
        lock = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    assert any(f"pid {holder.pid}" in r.getMessage() for r in caplog.records)
    lock.release()
    with caplog.at_level(logging.WARNING):  # a clean release leaves nothing to warn about
        caplog.clear()
        workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()
    assert not caplog.records


def test_resume_with_another_config_stops_before_writing(tmp_path):
    config = tiny_config(total_steps=3)
    workdir_lib.write_config(str(tmp_path), config)
    os.makedirs(tmp_path / "checkpoints" / "3")
    before = (tmp_path / "config.json").read_text()
    other = tiny_config(total_steps=3, **{"model.name": "segformer_b1", "data.num_classes": 9})
    with pytest.raises(workdir_lib.ConfigMismatchError) as info:
        trainer.train_and_evaluate(other, str(tmp_path))
    assert "model.name: 'segformer_b0' -> 'segformer_b1'" in str(info.value)
    assert "data.num_classes: 8 -> 9" in str(info.value) and "--workdir" in str(info.value)
    assert (tmp_path / "config.json").read_text() == before
    # What a resume may change passes.
    allowed = tiny_config(total_steps=50, log_every=5, **{"optimizer.lr": 1e-4})
    allowed.checkpoint.every = 7
    workdir_lib.check_resume_config(str(tmp_path), allowed)
    # A field newer than the run's config.json (a later version of the code) passes too.
    saved = json.loads(before)
    del saved["model"]["remat"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    workdir_lib.check_resume_config(str(tmp_path), tiny_config(total_steps=3))
    with pytest.raises(workdir_lib.ConfigMismatchError, match="model.depths"):
        workdir_lib.check_eval_config(str(tmp_path), tiny_config(**{"model.depths": (2, 2, 2, 2)}))


@pytest.mark.slow
def test_eval_on_an_empty_workdir_stops_at_once_and_creates_nothing(tmp_path):
    workdir = tmp_path / "never_trained"
    result = _run(["eval.py", "--config", "configs/scenes_mit_b0.py:smoke", "--workdir", workdir])
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert "--weights" in result.stderr and not workdir.exists()
    os.makedirs(workdir / "checkpoints" / "3")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5; it has steps \[3\]"):
        workdir_lib.check_evaluable(str(workdir), tiny_config(), step=5)


# ----------------------------------------------------------------------------- messages


def test_bad_config_values_are_named_with_their_fix():
    config = load_config("scenes_mit_b0")
    config.optimizer.lr = -1e-3
    config.optimizer.warmup_steps = -5
    config.data.ratio_range = (2.0, 0.5)
    config.loss.tau = 0.0
    with pytest.raises(config_checks.ConfigError) as info:
        config_checks.validate(config)
    message = str(info.value)
    for field in ("optimizer.lr=-0.001", "optimizer.warmup_steps=-5", "loss.tau=0.0"):
        assert f"config.{field}: must be" in message
    assert "data.ratio_range" in message and "--config.optimizer.lr=" in message
    config_checks.validate(load_config("scenes_mit_b0"))  # the shipped configs are valid


@pytest.mark.slow
def test_unknown_override_names_the_nearest_fields():
    config = load_config("scenes_mit_b0")
    message = config_checks.unknown_override_message(["--config.optimizer.lrr=1"], config)
    assert "no field 'optimizer.lrr'" in message and "optimizer.lr" in message
    result = _run(["train.py", "--config", "configs/scenes_mit_b0.py:smoke", "--config.foo=1"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--config.foo: the config has no field 'foo'" in result.stderr


def test_bad_weight_files_say_what_is_wrong(tmp_path):
    torch = pytest.importorskip("torch")
    junk = tmp_path / "random.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(ValueError, match="is not a valid PyTorch checkpoint") as info:
        weights.read_state_dict(junk)
    assert "trust_pickle" not in str(info.value)
    objects = tmp_path / "objects.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": torch.nn.Linear(1, 1)}, objects)
    with pytest.raises(ValueError, match=r"--config.trust_pickle=True"):
        weights.read_state_dict(objects)
    assert "w" in weights.read_state_dict(objects, trust_pickle=True)[0]
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(np.random.default_rng(1).bytes(4000))
    with pytest.raises(ValueError, match=f"{broken}.*not a valid safetensors file"):
        weights.read_state_dict(broken)


def test_metrics_jsonl_stays_json_with_one_row_per_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    writer = logs.JsonlWriter(path)
    for step in (1, 2, 3):
        writer.write_scalars(step, {"loss": float("nan") if step == 3 else 1.0 / step})
    writer.write_scalars(3, {"eval/mIoU": 12.5})
    writer.close()
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a kill -9 mid-line
    writer = logs.JsonlWriter(path, resume_step=2)  # resumes: redoes step 3
    writer.write_scalars(3, {"loss": 0.25})
    writer.close()
    rows = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2] == {"step": 3, "loss": 0.25}
    writer = logs.JsonlWriter(path)
    writer.write_scalars(4, {"loss": float("inf")})
    writer.write_scalars(4, {"eval/mIoU": 1.0})
    writer.close()
    last = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
    assert last == {"step": 4, "loss": None, "eval/mIoU": 1.0}


@pytest.mark.slow
def test_sigterm_during_startup_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/scenes_mit_b0.py:smoke"]
        + ["--workdir", str(tmp_path), "--config.data.scenes_num_images=32"],
        env=_env(),
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    time.sleep(3)  # importing JAX: long before the first step
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "SIGTERM during start-up: nothing new to save. Rerun the same command" in output


@pytest.mark.slow
def test_ctrl_c_during_compilation_stops_at_once(tmp_path):
    """SIGINT while XLA compiles the first train step (the main thread inside the compiler):
    the process stops before the compilation ends, in one line, status 130, and a rerun of
    the same command can take the workdir."""
    command = [sys.executable, "train.py", "--config", "configs/scenes_mit_b0.py:smoke"]
    command += ["--workdir", str(tmp_path), "--config.data.scenes_num_images=32"]
    proc = subprocess.Popen(
        command, env=_env(), cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    seen = []
    for line in proc.stdout:  # until the compilation of the train step starts
        seen.append(line)
        if "compiling the train step" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=300)
    output = "".join(seen) + rest
    assert proc.returncode == 130, output[-3000:]
    assert "SIGINT during start-up: nothing new to save. Rerun the same command" in output
    assert "compiled and ran once" not in output and "Traceback" not in output, output[-3000:]
    lock = workdir_lib.acquire_lock(str(tmp_path), lease_timeout=300)  # not held any more
    lock.release()


def test_second_ctrl_c_stops_without_saving(tmp_path):
    """Once training runs, the first Ctrl-C asks for a stop with a checkpoint (the flag the
    loop reads); a second one exits at once with status 130, saying the last checkpoint
    stays."""
    script = (
        "import os, signal, sys, time\n"
        "from cbp_jax import preemption\n"
        "watcher = preemption.watch(stop_at_once=True)\n"
        "watcher.on_stop_at_once(lambda: print('cleanup ran', flush=True))\n"
        "watcher.training_started()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.5)\n"
        "print('requested', watcher.requested, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('not stopped')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=_env(), cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 130, done.stderr
    assert done.stdout.splitlines() == ["requested True", "cleanup ran"], done.stdout
    assert "SIGINT a second time: stopping without saving; the last checkpoint stays" in (
        done.stderr
    )
    assert "Ctrl-C again to stop at once" in done.stderr  # the first one's warning


# ----------------------------------------------------------------------------- whole stories


@pytest.mark.slow
def test_nonfinite_stop_then_lower_lr_restart_trains_to_the_end(tmp_path):
    # Step 1 runs at 1e-3 (the warm-up start), step 2 at 1e30: its update is not finite.
    config = tiny_config(total_steps=4)
    config.checkpoint.every = 1
    config.optimizer.update(lr=1e30, warmup_steps=1, warmup_start_factor=1e-33)
    with pytest.raises(errors.NonFiniteLossError) as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    assert "by step 2" in message and f"step 1 in {tmp_path}/checkpoints/1" in message
    assert "--config.optimizer.lr" in message
    assert workdir_lib.checkpoint_steps(str(tmp_path)) == [1]  # nothing after it was saved

    config.optimizer.lr = 1e-3  # the advice: a lower rate, same command
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    assert summary["step"] == 4 and sorted(summary["losses"]) == [2, 3, 4]
    assert all(np.isfinite(list(summary["losses"].values())))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 2's non-finite row was redone
    assert rows[1]["nonfinite_steps"] == 0


@pytest.mark.slow
def test_bad_file_mid_run_saves_then_names_the_file_and_the_way_on(tmp_path):
    config = load_config("ade20k_mit_b0")
    config.data.root = make_ade20k(str(tmp_path / "data"), n_train=16, n_val=1)
    config.update(total_steps=3, batch_size=8, init_from="")
    config.checkpoint.update(every=100, async_save=False)
    config.eval.max_images = 1
    # Truncate the image that the second batch reads first.
    source = factories.source_from_config(config, "train")
    perm = np.random.default_rng([config.seed, 0, loader_lib._STREAM_TAG]).permutation(16)
    bad = source.image_paths[perm[8]]
    with open(bad, "r+b") as f:
        f.truncate(20)
    workdir = str(tmp_path / "work")
    with pytest.raises(errors.BadTrainingDataError) as info:
        trainer.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert os.path.basename(bad) in message and "batch 2" in message
    assert "--config.data.skip_bad_examples=True" in message
    assert "python -m cbp_jax.data check" in message
    assert workdir_lib.checkpoint_steps(workdir) == [1]  # saved first

    config.data.skip_bad_examples = True
    summary = trainer.train_and_evaluate(config, workdir)
    assert summary["step"] == 3 and sorted(summary["losses"]) == [2, 3]
    assert sorted(read_losses(workdir)) == [1, 2, 3]


def test_reliability_doc_lists_every_fault_tested():
    doc = open(os.path.join(ROOT, "docs", "reliability.md")).read()
    for fault in ("tmpfs", "truncated", "manifest", "kill -9", "lr=1e30", "--config.foo"):
        assert fault in doc, fault
