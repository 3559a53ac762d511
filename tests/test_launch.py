"""Start-up decisions on clusters, over simulated environments (nothing is launched)."""

import os

import pytest

from cbp_jax import sharding

SLURM_2x8 = {  # srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
    "SLURM_GPUS_ON_NODE": "8",
}
OPEN_MPI_4 = {
    "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "2",
}


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variable of the machine running the tests leaks in."""
    for var in list(os.environ):
        if var.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "JAX_COORDINATOR")):
            monkeypatch.delenv(var)
    return monkeypatch


@pytest.mark.parametrize(
    "env,expected", [({}, (None, None)), (SLURM_2x8, ("slurm", 16)), (OPEN_MPI_4, ("ompi", 4))]
)
def test_jax_detection_finds_the_launcher(clean_env, env, expected):
    for var, value in env.items():
        clean_env.setenv(var, value)
    assert sharding.detected_cluster() == expected


def _plan(env, cluster=None, count=None, gpus=0, **explicit):
    return sharding.launch_plan(env, cluster, count, gpus, **explicit)


def test_launch_plans():
    assert _plan({}) == "single"
    assert _plan(SLURM_2x8, "slurm", 16, gpus=8) == "auto"
    assert _plan({**SLURM_2x8, "SLURM_NTASKS": "1"}, "slurm", 1, gpus=8) == "single"  # all GPUs
    assert _plan(OPEN_MPI_4, "ompi", 4) == "auto"
    assert _plan({"TPU_WORKER_HOSTNAMES": "a,b"}, "gketpu") == "auto"  # GKE
    assert _plan({}, "gcetpu") == "auto"  # gcloud ... --worker=all: GCE metadata
    assert _plan({"JAX_COORDINATOR_ADDRESS": "host0:1234"}) == "auto"
    explicit = {"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}
    assert _plan(SLURM_2x8, "slurm", 16, gpus=8, **explicit) == "explicit"  # wins over all
    with pytest.raises(ValueError, match="0 <= process_id < num_processes; got 2, 2"):
        _plan({}, **{**explicit, "process_id": 2})


def test_slurm_one_task_per_node_stops_with_the_srun_line():
    one_per_node = {
        **SLURM_2x8,
        "SLURM_NTASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_LOCALID": "0",
    }
    with pytest.raises(RuntimeError, match="1 task.s. per node but the node has 8 GPUs") as e:
        _plan(one_per_node, "slurm", 2, gpus=8)
    assert "srun --nodes=2 --ntasks-per-node=8 --gpus-per-task=1" in str(e.value)
    # Without the step's layout, tasks / nodes; CPU-only steps are never stopped.
    bare = {k: v for k, v in one_per_node.items() if k != "SLURM_STEP_TASKS_PER_NODE"}
    with pytest.raises(RuntimeError, match="srun --nodes=2"):
        _plan(bare, "slurm", 2, gpus=8)
    assert _plan(bare, "slurm", 2, gpus=0) == "auto"


def test_gpus_on_node_without_starting_jax():
    assert sharding.gpus_on_node({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0"}) == 4
    assert sharding.gpus_on_node({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert sharding.gpus_on_node({"CUDA_VISIBLE_DEVICES": ""}) == 0


def _fake_nvidia_smi(folder, listing: str) -> None:
    """An executable ``nvidia-smi`` that prints ``listing`` for ``-L``."""
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\ncat <<'EOF'\n{listing}\nEOF\n")
    tool.chmod(0o755)


def test_accelerator_note_names_the_install_when_jax_runs_on_cpu(tmp_path, monkeypatch):
    bin_dir, dev = tmp_path / "bin", tmp_path / "dev"
    bin_dir.mkdir()
    dev.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert sharding.accelerator_note("cpu", str(dev)) is None  # nothing here
    (dev / "accel0").touch()
    note = sharding.accelerator_note("cpu", str(dev))
    assert "TPU" in note and "'.[tpu]'" in note and "accel0" in note
    _fake_nvidia_smi(bin_dir, "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)\nGPU 1: NVIDIA H100")
    note = sharding.accelerator_note("cpu", str(dev))
    assert "2 NVIDIA GPU(s) (GPU 0: NVIDIA H100 80GB HBM3" in note and "'.[cuda12]'" in note
    assert sharding.accelerator_note("gpu", str(dev)) is None  # JAX uses it
    _fake_nvidia_smi(bin_dir, "No devices were found")  # the tool without a GPU
    (dev / "accel0").unlink()
    assert sharding.accelerator_note("cpu", str(dev)) is None
