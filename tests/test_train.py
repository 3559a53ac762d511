"""End-to-end training: smoke runs, sharding equivalence, resume after kill -9, preemption,
two processes with jax.distributed."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import multiprocess
import numpy as np
import pytest
from config_helpers import ROOT, load_config
from data_helpers import CAMVID_ROOT, make_ade20k, make_cocostuff_raw

from cbp_jax import checkpointing, factories, trainer
from cbp_jax.data import cocostuff
from cbp_jax.data import views as views_lib


def tiny_config(**overrides):
    """The scenes smoke config: SegFormer-B0 with one block per stage on 64x64 crops."""
    c = load_config("scenes_mit_b0")
    c.batch_size = 8
    c.data.scenes_num_images = 32
    c.eval.max_images = 2
    c.checkpoint.async_save = False
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def read_losses(workdir: str) -> dict[int, float]:
    """Losses by step from metrics.jsonl (a resumed run's later lines win)."""
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "loss" in row:
                out[row["step"]] = row["loss"]
    return out


# ----------------------------------------------------------------------------- smoke runs


def test_smoke_camvid_loss_falls_and_checkpoints(tmp_path):  # the fast tier's run
    if CAMVID_ROOT is None:
        pytest.skip("CamVid is not here (../shared/datasets/camvid or $CBP_CAMVID_ROOT)")
    config = load_config("camvid_mit_b0")
    config.data.root = CAMVID_ROOT
    config.update(total_steps=8, batch_size=8)
    config.checkpoint.update(every=4, async_save=False)
    config.eval.max_images = 2
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    losses = [summary["losses"][s] for s in sorted(summary["losses"])]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:2])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4", "8"]
    report = json.load(open(tmp_path / "eval_8" / "report.json"))
    assert len(report["per_class"]) == 11 and report["summary"]["num_images"] == 2
    assert report["extra"]["prototype_analysis"]["max_abs_cos"] < 1e-5
    assert os.path.exists(tmp_path / "eval_8" / "prototype_cosine.png")


@pytest.mark.slow
def test_objects_views_train_with_the_loader_s_view_map(tmp_path):
    """loss.views="objects": the loader ships each pixel's view (every object of the batch
    in one view), the step reads it, and OCCL's centroid term trains."""
    config = tiny_config(total_steps=2, **{"loss.views": "objects"})
    config.batch_size = 4
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    assert summary["step"] == 2 and all(np.isfinite(list(summary["losses"].values())))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert all(row["occl_centroid"] > 0 for row in rows if "occl_centroid" in row)

    loader = trainer._train_loader(config, factories.mesh_from_config(config))
    try:
        batch = next(loader)
    finally:
        loader.close()
    labels, view_map = np.asarray(batch["label"]), np.asarray(batch["views"])
    assert view_map.shape == labels.shape and set(np.unique(view_map)) == {0, 1}
    for label, image_views in zip(labels, view_map, strict=True):
        ids, _ = views_lib.objects(label)
        for k in range(ids.max() + 1):
            assert len(np.unique(image_views[ids == k])) == 1


@pytest.mark.slow
def test_smoke_ade20k_layout_folder(tmp_path):
    root = make_ade20k(str(tmp_path / "data"), n_train=8, n_val=2)
    config = load_config("ade20k_mit_b0")
    config.data.root = root
    config.init_from = ""
    config.update(total_steps=8, batch_size=8)
    config.optimizer.update(lr=1e-3, warmup_steps=1)
    config.checkpoint.update(every=4, async_save=False)
    summary = trainer.train_and_evaluate(config, str(tmp_path / "work"))
    losses = [summary["losses"][s] for s in range(1, 9)]
    assert summary["step"] == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:2])
    assert sorted(os.listdir(tmp_path / "work" / "checkpoints")) == ["4", "8"]
    report = json.load(open(tmp_path / "work" / "eval_8" / "report.json"))
    assert len(report["per_class"]) == 150


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "ade20k_swin_base",
        "cocostuff10k_swin_base",
        "ade20k_fcn_resnet101",
        "cocostuff10k_fcn_resnet101",
    ],
)
def test_smoke_swin_and_fcn_rows(tmp_path, name):
    """The paper's UperNet Swin-B and FCN ResNet-101 rows, ``:smoke``, on generated data."""
    config = load_config(name)
    if name.startswith("ade20k"):
        config.data.root = make_ade20k(str(tmp_path / "data"), n_train=8, n_val=1)
    else:
        raw = make_cocostuff_raw(str(tmp_path / "raw"), n_train=8, n_test=1)
        config.data.root = str(tmp_path / "coco")
        cocostuff.convert_cocostuff10k(raw, config.data.root, num_workers=1)
    config.update(total_steps=2, batch_size=8)
    config.checkpoint.update(every=2, async_save=False)
    config.eval.max_images = 1
    summary = trainer.train_and_evaluate(config, str(tmp_path / "work"))
    assert summary["step"] == 2 and all(np.isfinite(list(summary["losses"].values())))
    report = json.load(open(tmp_path / "work" / "eval_2" / "report.json"))
    assert len(report["per_class"]) == config.data.num_classes


# ----------------------------------------------------------------------------- sharding


@pytest.mark.slow
def test_data_parallel_and_fsdp_match_one_device(tmp_path):
    runs = {
        "one_device": {"mesh.data": 1, "mesh.num_devices": 1},
        "data_parallel": {"mesh.data": 8},
        "fsdp": {"mesh.data": 2, "mesh.fsdp": 4},
    }
    losses = {}
    for name, mesh in runs.items():
        config = tiny_config(total_steps=3, **mesh)
        config.eval.max_images = 1
        losses[name] = trainer.train_and_evaluate(config, str(tmp_path / name))["losses"]
    for name in ("data_parallel", "fsdp"):
        for step in (1, 2, 3):
            np.testing.assert_allclose(losses[name][step], losses["one_device"][step], atol=1e-4)


def test_fsdp_rules_shard_large_parameters():
    config = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 4})
    mesh = factories.mesh_from_config(config)
    with jax.set_mesh(mesh):
        setup = factories.TrainSetup(config, mesh)
        specs = {
            checkpointing.path_name(p): s.spec
            for p, s in jax.tree_util.tree_leaves_with_path(setup.state_shardings)
        }
    sharded = [n for n, s in specs.items() if "fsdp" in str(s)]
    assert any(n.startswith("params/encoder") for n in sharded)
    assert not any(n.startswith(("params/head", "params/classifier")) for n in sharded)
    # Optimizer moments follow their parameters.
    assert any(n.startswith("opt_state") and "encoder" in n for n in sharded)


# ----------------------------------------------------------------------------- robustness


def _train_command(workdir, *extra):
    return [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "scenes_mit_b0.py:smoke"),
        "--workdir",
        str(workdir),
        "--config.data.scenes_num_images=32",
        "--config.eval.max_images=1",
        *extra,
    ]


def _env(devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = ROOT
    return env


def _wait_for_checkpoint(workdir, proc, timeout=600):
    ckpt = os.path.join(workdir, "checkpoints")
    start = time.time()
    while time.time() - start < timeout:
        if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_kill9_resume_matches_uninterrupted(tmp_path):
    args = ["--config.total_steps=16", "--config.checkpoint.every=2", "--config.batch_size=4"]
    subprocess.run(
        _train_command(tmp_path / "straight", *args), env=_env(), check=True, capture_output=True
    )
    reference = read_losses(tmp_path / "straight")

    workdir = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_command(workdir, *args),
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _wait_for_checkpoint(workdir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert saved < 16, "the run finished before it could be killed; make it longer"
    result = subprocess.run(
        _train_command(workdir, *args), env=_env(), text=True, capture_output=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Resuming from the checkpoint of step" in result.stdout
    resumed = read_losses(workdir)
    for step in range(saved + 1, 17):
        np.testing.assert_allclose(
            resumed[step], reference[step], rtol=1e-6, err_msg=f"step {step}"
        )


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    args = ["--config.total_steps=400", "--config.checkpoint.every=1000", "--config.batch_size=4"]
    proc = subprocess.Popen(
        _train_command(tmp_path, *args),
        env=_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = tmp_path / "metrics.jsonl"
    start = time.time()
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - start < 600
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "Preempted: saved step" in output
    steps = [int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 400


def _final_params(workdir, step: int) -> list[np.ndarray]:
    """The parameters of a run's checkpoint ``step``, on the host, in tree order."""
    config = factories.read_run_config(str(workdir))
    mesh = factories.single_device_mesh()
    _, restored = factories.restore(config, str(workdir), step, mesh)
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(restored["params"]))]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [1, 2])
def test_two_processes_train_as_one(tmp_path, fsdp):
    """Two jax.distributed processes of 2 devices each train the steps one process of 4
    devices trains on the same global batches: same losses, same final parameters (to float
    rounding: the all-reduces sum in another order), with the parameters split over the
    "fsdp" axis too."""
    # SGD: AdamW would move a parameter whose gradient is rounding noise (a conv bias before
    # BatchNorm) by the full learning rate in a noise-given direction, in either run.
    steps, mesh = 3, [f"--config.mesh.fsdp={fsdp}", "--config.optimizer.name=sgd"]
    common = [f"--config.total_steps={steps}", "--config.batch_size=4", *mesh]
    single = tmp_path / "one_process"
    run = subprocess.run(
        _train_command(single, *common), env=_env(devices=4), text=True, capture_output=True
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    multi = tmp_path / "two_processes"
    multiprocess.run_commands(
        lambda port, i: _train_command(
            multi,
            *common,
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        ),
        env=_env(devices=2),
        timeout=900,
    )
    one, two = read_losses(single), read_losses(multi)
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    assert all(np.isfinite(list(two.values())))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
    assert str(steps) in os.listdir(multi / "checkpoints")
    params_one, params_two = _final_params(single, steps), _final_params(multi, steps)
    assert len(params_one) == len(params_two) > 50
    for a, b in zip(params_one, params_two, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
