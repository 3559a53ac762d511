"""The training loop behind ``train.py`` and the factories a run builds from its config.

Phases: (1) devices and processes, (2) data, (3) model, optimizer and sharded state,
(4) resume or pretrained init, (5) the jitted step loop with logging, checkpoints,
preemption and periodic evaluation, (6) the final report.
"""

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from cbp_jax import checkpointing, eval_lib, models, sharding, train_lib
from cbp_jax import data as data_lib

# ----------------------------------------------------------------------------- building blocks


def model_from_config(config: ml_collections.ConfigDict) -> nnx.Module:
    """The segmentor ``config.model`` describes (parameters float32, compute ``dtype``)."""
    overrides = {
        k: (tuple(v) if isinstance(v, list) else v) for k, v in config.model.items() if k != "name"
    }
    overrides["dtype"] = jnp.dtype(overrides.get("dtype") or "float32")
    rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
    return models.create(
        config.model.name, num_classes=config.data.num_classes, rngs=rngs, **overrides
    )


def source_from_config(config: ml_collections.ConfigDict, split: str):
    """The data source for ``split``, validated (layout errors name the expected folders)."""
    d = config.data
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


def mesh_from_config(config: ml_collections.ConfigDict):
    """The ``("data", "fsdp")`` mesh of ``config.mesh`` over all devices (or the first
    ``config.mesh.num_devices`` of a single process)."""
    shape = {k: v for k, v in config.mesh.items() if k != "num_devices"}
    devices = jax.devices()
    if config.mesh.get("num_devices"):
        if jax.process_count() > 1:
            raise ValueError("config.mesh.num_devices is for single-process runs; leave it 0.")
        devices = devices[: config.mesh.num_devices]
    return sharding.make_mesh(shape, devices)


def _check_config(config: ml_collections.ConfigDict, mesh) -> None:
    devices = mesh.devices.size
    if config.batch_size % devices:
        raise ValueError(
            f"config.batch_size={config.batch_size} must divide evenly over {devices} devices; "
            f"use a multiple of {devices}."
        )
    if config.loss.occl and config.loss.views == "batch_halves" and config.batch_size % 2:
        raise ValueError(
            f"config.loss.views='batch_halves' needs an even config.batch_size; got "
            f"{config.batch_size}."
        )
    if config.total_steps < 1:
        raise ValueError(f"config.total_steps={config.total_steps}; must be >= 1.")


class Setup:
    """Everything a run needs that is derived from the config and the mesh."""

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.config, self.mesh = config, mesh
        abstract_model = nnx.eval_shape(lambda: model_from_config(config))
        self.graphdef, abstract_params, _ = train_lib.split_model(abstract_model)
        self.tx = train_lib.make_optimizer(
            abstract_model, abstract_params, config.optimizer, config.total_steps
        )

        def init():
            return train_lib.init_state(model_from_config(config), self.tx)

        abstract_state = jax.eval_shape(init)
        self.state_shardings = sharding.state_shardings(
            abstract_state, config.partition_rules, mesh
        )
        self._init = jax.jit(init, out_shardings=self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)

    def init_state(self):
        """A fresh train state, created directly with its shardings."""
        return self._init()

    def load_pretrained(self, state, path: str):
        """``state`` with encoder (or segmentor) weights from ``path`` in its parameters.

        The optimizer state is left as it is: fresh AdamW / SGD moments are zeros whatever
        the parameter values.
        """
        from cbp_jax import weights

        model = nnx.merge(self.graphdef, state["params"], state["model_state"])
        weights.load_pretrained(model, path)
        _, params, model_state = train_lib.split_model(model)
        loaded = {"params": params, "model_state": model_state}
        return state | jax.device_put(loaded, {k: self.state_shardings[k] for k in loaded})


# ----------------------------------------------------------------------------- logging


class MetricWriter:
    """Scalars to ``<workdir>/metrics.jsonl`` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        for name, value in scalars.items():
            self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class Preemption:
    """Turns SIGTERM (pod preemption, ``kill``) into a flag the loop checks once per step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del frame
        logging.warning("Signal %d received: saving a checkpoint and exiting.", signum)
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good state was saved."""


# ----------------------------------------------------------------------------- training


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoints), then evaluates.

    Returns a summary: ``{"step", "losses" (per logged step), "eval" (final metrics)}``.
    """
    # 1. Devices and processes.
    sharding.initialize_distributed(**config.distributed)
    mesh = mesh_from_config(config)
    _check_config(config, mesh)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=1))
    logging.info("mesh %s over %d process(es)", dict(mesh.shape), jax.process_count())

    with jax.set_mesh(mesh):
        # 2. Data.
        d = config.data
        source = source_from_config(config, d.train_split)
        transform = data_lib.train_transform(
            tuple(d.crop_size), tuple(d.base_scale), tuple(d.ratio_range), d.cat_max_ratio
        )
        loader = data_lib.make_train_loader(
            source,
            transform,
            global_batch_size=config.batch_size,
            mesh=mesh,
            data_axis=sharding.BATCH_AXES,
            seed=config.seed,
            num_workers=d.num_workers,
        )

        # 3. Model, optimizer, sharded state, and the evaluator (compiled once per run).
        setup = Setup(config, mesh)
        state = setup.init_state()
        evaluator = eval_lib.Evaluator(
            config, mesh, setup.state_shardings, source_from_config(config, d.eval_split)
        )

        # 4. Resume, or start from pretrained weights.
        checkpointer = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"),
            every=config.checkpoint.every,
            keep=config.checkpoint.keep,
            async_save=config.checkpoint.async_save,
        )
        start = checkpointer.latest_step()
        if start is not None:
            state, data_state = checkpointer.restore(start, state)
            loader.set_state(data_state)
            print(f"Resuming from the checkpoint of step {start} in {checkpointer.directory}")
        else:
            start = 0
            if config.init_from:
                state = setup.load_pretrained(state, config.init_from)

        # 5. The loop.
        loss_cfg = train_lib.LossConfig.from_config(config)
        train_step = jax.jit(
            train_lib.make_train_step(setup.graphdef, setup.tx, loss_cfg),
            in_shardings=(setup.state_shardings, setup.batch_sharding),
            out_shardings=(setup.state_shardings, sharding.replicated(mesh)),
            donate_argnums=0,
        )
        writer = MetricWriter(workdir)
        preemption = Preemption()
        losses: dict[int, float] = {}
        summary: dict[str, Any] = {}
        progress = _progress(start, config.total_steps)
        try:
            step = start
            for step in range(start + 1, config.total_steps + 1):
                state, metrics = train_step(state, next(loader))
                last = step == config.total_steps
                if step % config.log_every == 0 or last or preemption.requested:
                    scalars = _log(step, metrics, config, progress, writer)
                    if scalars["nonfinite_steps"]:
                        good_step = int(state["step"])  # non-finite steps left the state alone
                        if good_step not in checkpointer.manager.all_steps():
                            checkpointer.save(good_step, state, loader.get_state(), force=True)
                        checkpointer.wait()
                        raise NonFiniteLossError(
                            f"Non-finite loss or update by step {step} (logged: {scalars}). "
                            f"The last good state was saved in {checkpointer.directory}; lower "
                            "config.optimizer.lr or enable config.optimizer.clip_norm, then "
                            "restart."
                        )
                    losses[step] = scalars["loss"]
                progress.update(1)
                if step % config.checkpoint.every == 0 or last or preemption.requested:
                    checkpointer.save(step, state, loader.get_state(), force=True)
                if preemption.requested:
                    checkpointer.wait()
                    print(f"Preempted: saved step {step}; rerun the same command to resume.")
                    summary["preempted"] = True
                    break
                if config.eval.every and step % config.eval.every == 0 and not last:
                    out = os.path.join(workdir, f"eval_{step}")
                    ev = evaluator(state, out_dir=out)
                    writer.write(step, {f"eval/{k}": ev[k] for k in ("mIoU", "mAcc", "aAcc")})
        finally:
            progress.close()
            checkpointer.wait()
            preemption.restore()
            loader.close()

        summary |= {"step": step, "losses": losses}
        if step == config.total_steps and not summary.get("preempted"):
            out = os.path.join(workdir, "eval")
            ev = evaluator(state, out_dir=out, extra={"step": step})
            writer.write(step, {f"eval/{k}": ev[k] for k in ("mIoU", "mAcc", "aAcc")})
            summary["eval"] = {k: ev[k] for k in ("mIoU", "mAcc", "aAcc")}
            print(
                f"step {step}: mIoU {ev['mIoU']:.2f}  mAcc {ev['mAcc']:.2f}  "
                f"aAcc {ev['aAcc']:.2f}  (report: {out}/report.json)"
            )
        writer.close()
        checkpointer.close()
    return summary


def _progress(start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        disable=jax.process_index() != 0,
        dynamic_ncols=True,
    )


def _log(step, metrics, config, progress, writer) -> dict[str, float]:
    """Fetches the step's metrics (the only host round trip, every ``log_every`` steps)."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    scalars["lr"] = train_lib.lr_at(config.optimizer, config.total_steps, step - 1)
    scalars["time"] = time.time()
    writer.write(step, {k: v for k, v in scalars.items() if k != "time"})
    shown = {k: f"{scalars[k]:.4f}" for k in ("loss", "ce", "occl_centroid") if k in scalars}
    progress.set_postfix(shown | {"lr": f"{scalars['lr']:.2e}"}, refresh=False)
    return scalars
