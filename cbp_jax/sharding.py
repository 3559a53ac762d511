"""Device meshes, partition rules and multi-host start-up.

The training state and batches are laid out with ``NamedSharding`` on a 2-axis mesh
``("data", "fsdp")``: the batch is split over both axes; parameters and optimizer state are
replicated, or split over ``"fsdp"`` where a partition rule says so. ``jax.jit`` with these
shardings does the rest (data parallelism, FSDP all-gathers, global BatchNorm statistics).

Several processes: one process per GPU (SLURM: ``srun --ntasks-per-node=<GPUs per node>
--gpus-per-task=1``), one per TPU VM host; ``initialize_distributed`` starts them.
"""

import glob
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over every mesh axis
# The path component of a scanned block stack's variables (``models.layers.STACKED``), whose
# leading axis has one entry per block.
STACKED = "stacked"


def detected_cluster() -> tuple[str | None, int | None]:
    """The launcher JAX's own cluster detection finds, and its process count where the
    environment says it (SLURM, Open MPI); ``(None, None)`` for a plain process.

    Cloud TPU VMs are found from the GCE metadata server (``gcloud ... --worker=all``) or
    GKE's ``TPU_WORKER_HOSTNAMES``; their count is left to ``jax.distributed``.
    """
    from jax._src.clusters import ClusterEnv  # no public API exposes the detection

    for env in ClusterEnv._cluster_types:  # JAX's own order, opt-in methods excluded
        if not env.opt_in_only_method and env.is_env_present():
            count = env.get_process_count() if env.name in ("slurm", "ompi") else None
            return env.name, count
    return None, None


def _slurm_tasks_per_node(environ: Mapping[str, str]) -> int:
    """Tasks on this node of a SLURM step (``8(x2)`` / ``8,8`` forms, or tasks / nodes)."""
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if environ.get(var):
            return int(re.match(r"\d+", environ[var]).group())
    nodes = int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
    return max(int(environ.get("SLURM_NTASKS", "1")) // nodes, 1)


def gpus_on_node(environ: Mapping[str, str] | None = None) -> int:
    """GPUs of this node, read without starting JAX: SLURM's count, else
    ``CUDA_VISIBLE_DEVICES``, else the ``/dev/nvidia<N>`` devices."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_GPUS_ON_NODE"):
        return int(environ["SLURM_GPUS_ON_NODE"])
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return len([d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    return len(glob.glob("/dev/nvidia[0-9]*"))


def accelerator_note(backend: str, devices_dir: str = "/dev") -> str | None:
    """One line when this host has an accelerator that JAX does not use (``backend`` is
    ``"cpu"``): an NVIDIA GPU (``nvidia-smi -L`` lists one) or TPU chips (``/dev/accel*``,
    ``/dev/vfio/<n>``), with the command that installs the matching jaxlib. None otherwise."""
    if backend != "cpu":
        return None
    fix = "pip install -e '.[{}]' (in a fresh environment), then check jax.devices()"
    gpus = _nvidia_smi_gpus()
    if gpus:
        return (
            f"JAX runs on CPU but this host has {len(gpus)} NVIDIA GPU(s) ({gpus[0]}): "
            + fix.format("cuda12")
            + "; use '.[cuda13]' with a CUDA 13 driver (nvidia-smi shows the driver's CUDA)."
        )
    chips = glob.glob(os.path.join(devices_dir, "accel*")) + glob.glob(
        os.path.join(devices_dir, "vfio", "[0-9]*")
    )
    if chips:
        return (
            f"JAX runs on CPU but this host has TPU chips ({', '.join(sorted(chips)[:4])}): "
            + fix.format("tpu")
            + "."
        )
    return None


def _nvidia_smi_gpus() -> list[str]:
    """The lines of ``nvidia-smi -L`` that name a GPU (none without the tool or a driver)."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.startswith("GPU ")]


def launch_plan(
    environ: Mapping[str, str],
    cluster: str | None,
    process_count: int | None,
    gpus: int,
    *,
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> str:
    """How to start: ``"explicit"`` (the three arguments), ``"auto"`` (JAX's cluster
    detection) or ``"single"`` (no ``jax.distributed``).

    Args:
      environ: the environment (``os.environ``).
      cluster, process_count: ``detected_cluster()``.
      gpus: ``gpus_on_node()``.
      coordinator_address, num_processes, process_id: ``config.distributed``.

    Raises:
      ValueError: inconsistent explicit arguments.
      RuntimeError: a SLURM step with fewer tasks per node than GPUs (JAX's SLURM detection
        gives each task only its own GPU, so the others would sit idle); the message gives
        the ``srun`` line to use.
    """
    if coordinator_address:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"coordinator_address={coordinator_address!r} needs num_processes >= 1 and "
                f"0 <= process_id < num_processes; got {num_processes}, {process_id}."
            )
        return "explicit"
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "auto"  # jax.distributed.initialize() reads JAX_* variables itself
    if cluster is None or (process_count is not None and process_count <= 1):
        return "single"
    if cluster == "slurm":
        tasks = _slurm_tasks_per_node(environ)
        if tasks < gpus:
            nodes = environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES", "1")
            raise RuntimeError(
                f"SLURM runs {tasks} task(s) per node but the node has {gpus} GPUs: JAX's "
                f"SLURM detection gives each task only its own GPU, so {gpus - tasks} per node "
                "would sit idle. Launch one task per GPU:\n"
                f"  srun --nodes={nodes} --ntasks-per-node={gpus} --gpus-per-task=1 "
                f"python {' '.join(sys.argv) or 'train.py ...'}"
            )
    return "auto"


def initialize_distributed(
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    cpu_collectives: str = "gloo",
) -> bool:
    """Starts ``jax.distributed`` when this is one of several processes; no-op otherwise.

    With an explicit ``coordinator_address`` the three arguments are used as given (e.g. two
    processes on one machine: ``localhost:12345``, 2, 0|1). Without it, JAX's own cluster
    detection decides (``launch_plan``): Cloud TPU VMs and pods (GCE metadata or GKE), SLURM
    and Open MPI with more than one process, ``JAX_COORDINATOR_ADDRESS``. On SLURM, launch one
    task per GPU. Returns whether it initialized.
    """
    if jax.distributed.is_initialized():
        return True
    cluster, count = (None, None) if coordinator_address else detected_cluster()
    plan = launch_plan(
        os.environ,
        cluster,
        count,
        gpus_on_node(),
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    if plan == "single":
        return False
    if plan == "explicit":
        if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    return True


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp")`` mesh; one axis size may be -1 to take the remaining devices.

    Args:
      shape: e.g. ``{"data": -1, "fsdp": 1}`` (pure data parallelism) or
        ``{"data": 2, "fsdp": 4}``.
    """
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} unknown; use {MESH_AXES}.")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"At most one mesh axis may be -1; got {dict(zip(MESH_AXES, sizes, strict=True))}."
        )
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide by the fixed axes ({known}).")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(shape)} needs {math.prod(sizes)} devices; there are {len(devices)}. "
            "Set config.mesh.data = -1 to use them all."
        )
    return jax.make_mesh(
        tuple(sizes),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2**14) -> P:
    """Splits the largest dimension divisible by ``fsdp_size`` over ``"fsdp"``.

    Arrays smaller than ``min_size`` elements, or with no divisible dimension, stay replicated.
    """
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def path_name(path, sep: str = "/") -> str:
    """``"encoder/stages/0/blocks/1/fc1/kernel"`` for a pytree key path (parts joined by
    ``sep``)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return sep.join(parts)


def partition_specs(tree, rules: Sequence[tuple[str, str]], mesh: Mesh):
    """PartitionSpecs for every array leaf of ``tree`` from ``(regex, rule)`` pairs.

    The first rule whose regex matches the leaf's path decides: ``"replicate"``, ``"fsdp"``
    (:func:`fsdp_spec`), or a PartitionSpec written as a comma list of axis names / ``None``
    (e.g. ``"None,fsdp"``). Leaves no rule matches are replicated. Optimizer-state leaves
    carry their parameter's path as a suffix, so one rule set covers both.
    """
    fsdp_size = mesh.shape["fsdp"]
    compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

    def spec(path, leaf):
        shape = np.shape(leaf)
        name = path_name(path)
        for pattern, rule in compiled:
            if pattern.search(name):
                if rule == "replicate":
                    return P()
                if rule == "fsdp":  # a stacked block axis stays whole: split within blocks
                    lead = 1 if STACKED in name.split("/") else 0
                    return P(*[None] * lead, *fsdp_spec(shape[lead:], fsdp_size))
                axes = [None if a.strip() in ("None", "") else a.strip() for a in rule.split(",")]
                if len(axes) != len(shape):
                    raise ValueError(
                        f"partition rule {pattern.pattern!r} -> {rule!r} has {len(axes)} axes; "
                        f"{name} has shape {shape}."
                    )
                return P(*axes)
        return P()

    return jax.tree_util.tree_map_with_path(spec, tree)


def state_shardings(tree, rules: Sequence[tuple[str, str]], mesh: Mesh):
    """``NamedSharding`` for every leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
    specs = partition_specs(tree, rules, mesh)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs)
