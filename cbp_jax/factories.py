"""What a run builds from its config: the mesh, the model, the data sources, the sharded
train state and the model's weights restored from a workdir or a file.

Training (``trainer``), evaluation (``eval.py``), prediction, export and the bench scripts
build through these functions; nothing here runs a loop. :func:`restore` is the one way to
read a trained model back: it reads only the model's parameters and state (never the
optimizer's), so it serves any optimizer a run was trained with.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from cbp_jax import (
    checkpointing,
    errors,
    losses,
    model_stats,
    models,
    sharding,
    storage,
    train_lib,
    weights,
)
from cbp_jax import data as data_lib
from cbp_jax import workdir as workdir_lib
from cbp_jax.data.sources import missing_root_message
from cbp_jax.models import stacking

ModelState = dict[str, Any]  # {"params": nnx.State, "model_state": nnx.State}


# ----------------------------------------------------------------------------- devices


def mesh_from_config(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The ``("data", "fsdp")`` mesh of ``config.mesh`` over all devices (or the first
    ``config.mesh.num_devices`` of a single process). On a single-process CPU host (one
    device per core, ``cbp_jax.cpu``) it takes as many devices as divide the batch."""
    shape = {k: v for k, v in config.mesh.items() if k != "num_devices"}
    devices = jax.devices()
    if config.mesh.get("num_devices"):
        if jax.process_count() > 1:
            raise ValueError("config.mesh.num_devices is for single-process runs; leave it 0.")
        devices = devices[: config.mesh.num_devices]
    elif jax.process_count() == 1 and devices[0].platform == "cpu":
        count = max(n for n in range(1, len(devices) + 1) if config.batch_size % n == 0)
        devices = devices[:count]
    return sharding.make_mesh(shape, devices)


def devices_left_out(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> str | None:
    """Why the mesh leaves devices of this process idle (a CPU host whose device count does
    not divide the batch), as a line for the log; None when it uses them all."""
    available = jax.local_device_count()
    used = mesh.devices.size
    if jax.process_count() > 1 or used >= available or config.mesh.get("num_devices"):
        return None
    return (
        f"using {used} of {available} CPU devices: config.batch_size={config.batch_size} is "
        f"not divisible by {available}; a batch size that is (e.g. "
        f"{available * max(1, -(-config.batch_size // available))}) uses all of them."
    )


def describe_devices(mesh: jax.sharding.Mesh) -> str:
    """One line: the mesh's devices, their kind and platform, and the processes."""
    devices = mesh.devices.flatten()
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    return (
        f"{devices.size} {devices[0].platform} device(s) ({kinds}) in mesh {dict(mesh.shape)}, "
        f"{jax.process_count()} process(es)"
    )


# ----------------------------------------------------------------------------- the model


def model_from_config(config: ml_collections.ConfigDict, dtype: str | None = None) -> nnx.Module:
    """The segmentor ``config.model`` describes: parameters float32, computing in ``dtype``
    (default ``config.model.dtype``)."""
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model.items() if k != "name"
    }
    overrides["dtype"] = jnp.dtype(dtype or overrides.get("dtype") or "float32")
    rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    return models.create(
        config.model.name, num_classes=config.data.num_classes, rngs=rngs, **overrides
    )


def train_graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
    """The model's graph computing in the training dtype (``config.model.dtype``)."""
    return train_lib.split_model(nnx.eval_shape(lambda: model_from_config(config)))[0]


def eval_graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
    """The model's graph computing in ``config.eval.dtype`` ("" keeps the training dtype).

    Only the compute dtype differs from training: parameters and state are the same arrays.
    """
    dtype = config.eval.dtype or None
    return train_lib.split_model(nnx.eval_shape(lambda: model_from_config(config, dtype)))[0]


def model_summary(config: ml_collections.ConfigDict, abstract: ModelState) -> dict[str, Any]:
    """Name, classifier, parameter count and forward FLOPs of one ``config.data.crop_size``
    image (XLA's count, a multiply-add is 2 FLOPs; GMACs = GFLOPs / 2).

    Args:
      abstract: ``{"params", "model_state"}`` of the model (shape structs suffice).
    """
    # Counted on the unrolled form: XLA's cost analysis counts a scanned body once.
    unrolled = nnx.eval_shape(lambda: model_from_config(with_scan_blocks(config, False)))
    size = tuple(config.data.crop_size)
    flops = model_stats.forward_flops(*train_lib.split_model(unrolled), size)
    return {
        "name": config.model.name,
        "classifier": config.model.classifier,
        "parameters": model_stats.parameter_count(abstract["params"]),
        "image_size": list(size),
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
    }


def describe_model(summary: dict[str, Any]) -> str:
    """One line of :func:`model_summary`."""
    h, w = summary["image_size"]
    return (
        f"model {summary['name']} ({summary['classifier']} classifier): "
        f"{summary['parameters'] / 1e6:.2f} M parameters, {summary['gflops']:.2f} GFLOPs "
        f"({summary['gmacs']:.2f} GMACs) per {h}x{w} image"
    )


# ----------------------------------------------------------------------------- data


def check_data_root(config: ml_collections.ConfigDict) -> None:
    """Raises ``data.LayoutError`` (where to get the data, how to set ``config.data.root``)
    if the folder data set of ``config`` has no root folder."""
    d = config.data
    if d.dataset == "scenes" or d.format != "folder":
        return
    if not (d.root and storage.path(d.root).is_dir()):
        raise data_lib.LayoutError(missing_root_message(d.dataset, d.root))


def source_from_config(config: ml_collections.ConfigDict, split: str):
    """The data source for ``split``, validated (layout errors name the expected folders)."""
    d = config.data
    check_data_root(config)
    opts = {}
    if d.dataset == "scenes" and d.scenes_num_images:
        opts["num_images"] = d.scenes_num_images
    source = data_lib.make_source(
        d.dataset,
        d.root or None,
        split,
        format=d.format,
        skip_bad_examples=d.skip_bad_examples,
        **opts,
    )
    if source.num_classes != d.num_classes:
        raise ValueError(
            f"config.data.num_classes={d.num_classes} but {d.dataset} has "
            f"{source.num_classes} classes; fix the config."
        )
    return source


# ----------------------------------------------------------------------------- state


class TrainSetup:
    """The train state's structure and layout for a config on a mesh.

    Attributes:
      graphdef: the model's static graph (training compute dtype).
      tx: the optimizer.
      abstract_state: the train state as shape structs.
      state_shardings: ``NamedSharding`` of every leaf of the state.
      batch_sharding: the batch's (leading axis over every mesh axis).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
        abstract_model = nnx.eval_shape(lambda: model_from_config(config))
        self.graphdef, abstract_params, _ = train_lib.split_model(abstract_model)
        self.tx = train_lib.make_optimizer(
            abstract_model, abstract_params, config.optimizer, config.total_steps
        )

        def init():
            return train_lib.init_state(model_from_config(config), self.tx)

        self.abstract_state = jax.eval_shape(init)
        self.state_shardings = sharding.state_shardings(
            self.abstract_state, config.partition_rules, mesh
        )
        self._init = jax.jit(init, out_shardings=self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self._replicated = sharding.replicated(mesh)
        self._loss_config = losses.LossConfig.from_config(config)

    def train_step(self):
        """``step(state, batch) -> (state, metrics)``: the jitted train step, sharded as the
        state and the batch are, the state donated; the mesh may be abstract (lowering for
        another platform)."""
        return jax.jit(
            train_lib.make_train_step(self.graphdef, self.tx, self._loss_config),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, self._replicated),
            donate_argnums=0,
        )

    def init_state(self):
        """A fresh train state, created directly with its shardings."""
        return self._init()

    def model_shardings(self) -> ModelState:
        """The shardings of the state's ``{"params", "model_state"}``."""
        return {k: self.state_shardings[k] for k in ("params", "model_state")}

    def load_pretrained(self, state, path: str, trust_pickle: bool = False):
        """``state`` with encoder (or segmentor) weights from ``path`` in its parameters.

        ``trust_pickle`` lets a PyTorch pickle holding non-tensor objects load (runs its code).
        The optimizer state is left as it is: fresh AdamW / SGD moments are zeros whatever
        the parameter values.
        """
        model_state = {k: state[k] for k in ("params", "model_state")}
        loaded, _ = load_weights(
            self.graphdef, model_state, path, self.model_shardings(), trust_pickle=trust_pickle
        )
        return state | loaded


def eval_step(graphdef: nnx.GraphDef, model_shardings: ModelState, mesh) -> Any:
    """``predict({"params", "model_state"}, images (B, H, W, 3)) -> logits (B, H/4, W/4, N)``,
    jitted with the batch split over every axis of ``mesh`` (which may be abstract)."""
    batch = sharding.batch_sharding(mesh)
    return jax.jit(
        train_lib.make_predict_fn(graphdef),
        in_shardings=(model_shardings, batch),
        out_shardings=batch,
    )


def single_device_mesh() -> jax.sharding.Mesh:
    """A 1 x 1 mesh on the first device (inference on one device)."""
    return sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])


def model_shardings(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> ModelState:
    """``NamedSharding``s of the model's ``{"params", "model_state"}`` on ``mesh``, laid out
    as the train state lays them out (``config.partition_rules``)."""
    _, params, model_state = train_lib.split_model(
        nnx.eval_shape(lambda: model_from_config(config))
    )
    abstract = {"params": params, "model_state": model_state}
    return sharding.state_shardings(abstract, config.partition_rules, mesh)


def init_model_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> ModelState:
    """A freshly initialized ``{"params", "model_state"}``, created with its shardings."""

    def init():
        _, params, model_state = train_lib.split_model(model_from_config(config))
        return {"params": params, "model_state": model_state}

    return jax.jit(init, out_shardings=model_shardings(config, mesh))()


def load_weights(
    graphdef, model_state: ModelState, path: str, shardings, *, trust_pickle=False, verbose=True
):
    """``(model_state with the weights of path, weights.LoadReport)``: any checkpoint format
    ``cbp_jax.weights`` reads, placed with ``shardings``; ``verbose`` prints its summary."""
    model = nnx.merge(graphdef, model_state["params"], model_state["model_state"])
    try:
        report = weights.load_pretrained(model, path, trust_pickle=trust_pickle, verbose=verbose)
    except (ValueError, RuntimeError) as e:  # the loader's messages name the file and the fix
        raise errors.WeightsFileError(str(e)) from None
    _, params, rest = train_lib.split_model(model)
    loaded = jax.device_put({"params": params, "model_state": rest}, shardings)
    return loaded, report


def with_scan_blocks(config: ml_collections.ConfigDict, scan: bool) -> ml_collections.ConfigDict:
    """``config`` building the same model with ``model.scan_blocks=scan`` (a copy when it
    differs)."""
    if bool(config.model.get("scan_blocks", models.ModelConfig.scan_blocks)) == scan:
        return config
    twin = ml_collections.ConfigDict(config.to_dict())
    twin.model.scan_blocks = scan
    return twin


def _abstract_model_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """``(model, {"params", "model_state"} as shape structs with their shardings)``."""
    model = nnx.eval_shape(lambda: model_from_config(config))
    _, params, model_state = train_lib.split_model(model)
    target = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
        {"params": params, "model_state": model_state},
        model_shardings(config, mesh),
    )
    return model, target


def restore(
    config: ml_collections.ConfigDict,
    workdir: str,
    step: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[int, ModelState]:
    """``(step, {"params", "model_state"})`` of the workdir's checkpoint ``step`` (default
    the latest), placed on ``mesh`` (default: the first device) as training lays it out.

    Only the model is read, not the optimizer state. A checkpoint written with the other
    ``model.scan_blocks`` (the workdir's ``config.json`` says which) is converted to this
    config's layout on the way (``models.stacking``: exact, values are only split and
    stacked). Raises ``FileNotFoundError`` (no such workdir, checkpoint or step; the message
    lists them) or ``workdir.ConfigMismatchError`` (``config`` builds another model than the
    workdir's) before anything is compiled.
    """
    workdir_lib.check_evaluable(workdir, config, step)
    step = max(workdir_lib.checkpoint_steps(workdir)) if step is None else step
    mesh = mesh or single_device_mesh()
    saved = workdir_lib.read_saved_config(workdir) or {}
    saved_scan = saved.get("model", {}).get("scan_blocks", False)
    source_config = with_scan_blocks(config, bool(saved_scan))
    source_model, source = _abstract_model_state(source_config, mesh)
    directory = os.path.join(workdir, checkpointing.CHECKPOINTS_NAME)
    logging.info("restoring the model of step %d from %s", step, directory)
    state = checkpointing.restore_subset(directory, step, source)
    if source_config is config:
        return step, state
    model, target = _abstract_model_state(config, mesh)
    logging.info("converting it to model.scan_blocks=%s", not saved_scan)
    stacks = stacking.module_plan(source_model), stacking.module_plan(model)
    converted = {part: stacking.convert_tree(state[part], *stacks, target[part]) for part in state}
    return step, jax.device_put(converted, model_shardings(config, mesh))


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a workdir's run was trained with (its ``config.json``)."""
    saved = workdir_lib.read_saved_config(workdir)
    if saved is None:
        raise FileNotFoundError(
            f"{os.path.join(workdir, workdir_lib.CONFIG_NAME)} does not exist: pass the "
            "--workdir of a training run."
        )
    return ml_collections.ConfigDict(json.loads(json.dumps(saved)))
