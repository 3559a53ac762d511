"""The training loop behind ``train.py`` and the factories a run builds from its config.

Phases: (1) devices and processes, (2) data, (3) model, optimizer and sharded state,
(4) resume or pretrained init, (5) the jitted step loop with logging, checkpoints,
preemption and periodic evaluation, (6) the final report.

The run logs what it is doing at each phase (workdir, devices, model size, data, the
compilation of the train step), then every ``config.log_every`` steps its metrics, the step
rate, images/s and the ETA (``cbp_jax.logs``); compilation is left out of rate and ETA. A
run that is already trained to ``config.total_steps`` and evaluated there says so and stops.
"""

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from cbp_jax import (
    checkpointing,
    compilation,
    config_checks,
    eval_lib,
    logs,
    model_stats,
    models,
    sharding,
    train_lib,
)
from cbp_jax import data as data_lib
from cbp_jax import preemption as preemption_lib
from cbp_jax import workdir as workdir_lib
from cbp_jax.data.sources import missing_root_message

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


def remat_note(config: ml_collections.ConfigDict, backend: str) -> str | None:
    """Why ``model.remat`` does nothing on ``backend``, or None where it works."""
    if not config.model.get("remat") or backend != "cpu":
        return None
    return (
        "model.remat=True saves no memory on CPU: XLA:CPU drops the optimization barriers "
        "that keep the recomputation apart before it merges common subexpressions, so the "
        "backward pass reuses the forward activations (docs/benchmarks.md, memory). It "
        "works on GPU and TPU."
    )


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


def check_data_root(config: ml_collections.ConfigDict) -> None:
    """Raises ``data.LayoutError`` (where to get the data, how to set ``config.data.root``)
    if the folder data set of ``config`` has no root folder."""
    d = config.data
    if d.dataset != "scenes" and d.format == "folder" and not os.path.isdir(d.root or ""):
        raise data_lib.LayoutError(missing_root_message(d.dataset, d.root))


def mesh_from_config(config: ml_collections.ConfigDict):
    """The ``("data", "fsdp")`` mesh of ``config.mesh`` over all devices (or the first
    ``config.mesh.num_devices`` of a single process)."""
    shape = {k: v for k, v in config.mesh.items() if k != "num_devices"}
    devices = jax.devices()
    if config.mesh.get("num_devices"):
        if jax.process_count() > 1:
            raise ValueError("config.mesh.num_devices is for single-process runs; leave it 0.")
        devices = devices[: config.mesh.num_devices]
    elif jax.process_count() == 1 and devices[0].platform == "cpu":
        # One device per core (cbp_jax.cpu): as many as divide the batch.
        count = max(n for n in range(1, len(devices) + 1) if config.batch_size % n == 0)
        devices = devices[:count]
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
    check_data_root(config)  # before the workdir is created


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
        self.abstract_state = abstract_state
        self.state_shardings = sharding.state_shardings(
            abstract_state, config.partition_rules, mesh
        )
        self._init = jax.jit(init, out_shardings=self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)

    def init_state(self):
        """A fresh train state, created directly with its shardings."""
        return self._init()

    def load_pretrained(self, state, path: str, trust_pickle: bool = False):
        """``state`` with encoder (or segmentor) weights from ``path`` in its parameters.

        ``trust_pickle`` lets a PyTorch pickle holding non-tensor objects load (runs its code).

        The optimizer state is left as it is: fresh AdamW / SGD moments are zeros whatever
        the parameter values.
        """
        from cbp_jax import weights

        model = nnx.merge(self.graphdef, state["params"], state["model_state"])
        weights.load_pretrained(model, path, trust_pickle=trust_pickle)
        _, params, model_state = train_lib.split_model(model)
        loaded = {"params": params, "model_state": model_state}
        return state | jax.device_put(loaded, {k: self.state_shardings[k] for k in loaded})


class NonFiniteLossError(RuntimeError):
    """The loss or an update became NaN or infinite; the last periodic checkpoint is kept."""


class BadTrainingDataError(RuntimeError):
    """A bad data file was met mid-run; the state before its batch was saved."""


# Errors whose message is complete (what happened, what was kept, the fix): the entry
# points print them without a traceback.
STOP_ERRORS = (
    config_checks.ConfigError,
    data_lib.LayoutError,
    workdir_lib.WorkdirBusyError,
    workdir_lib.ConfigMismatchError,
    NonFiniteLossError,
    BadTrainingDataError,
    checkpointing.CheckpointSaveError,
    checkpointing.NoUsableCheckpointError,
)


# ----------------------------------------------------------------------------- training


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoints), then evaluates.

    A run already trained to ``config.total_steps`` and evaluated there is left as it is: it
    says it is finished and returns its final metrics (``"finished": True``).

    Returns a summary: ``{"step", "losses" (per logged step), "eval" (final metrics)}``.

    Raises:
      workdir_lib.WorkdirBusyError: another run holds the workdir.
      workdir_lib.ConfigMismatchError: the workdir holds a run of another config.
      NonFiniteLossError, BadTrainingDataError, checkpointing.CheckpointSaveError: the run
        stopped; the message says what was kept and how to go on.
    """
    preemption = preemption_lib.watch()
    # 1. Devices and processes; the workdir's owner and config.
    sharding.initialize_distributed(**config.distributed)
    mesh = mesh_from_config(config)
    _check_config(config, mesh)
    workdir = os.path.abspath(workdir)
    lock = None
    if jax.process_index() == 0:
        workdir_lib.check_resume_config(workdir, config)  # before anything is written
        os.makedirs(workdir, exist_ok=True)
        lock = workdir_lib.WorkdirLock(workdir).acquire()
    try:
        report = workdir_lib.finished_report(workdir, config.total_steps)
        if report is not None:
            return _finished(config.total_steps, report)
        if jax.process_index() == 0:
            workdir_lib.write_config(workdir, config)
        compilation.enable_persistent_cache(
            compilation.cache_dir(config.get("compilation_cache", ""), workdir)
        )
        logging.info("workdir %s", workdir)
        logging.info("%s", describe_devices(mesh))
        with jax.set_mesh(mesh):
            return _train_in_workdir(config, workdir, mesh, preemption)
    finally:
        preemption_lib.stop_watching()
        if lock is not None:
            lock.release()


def _finished(total_steps: int, report: str) -> dict[str, Any]:
    """The summary of a run that is trained and evaluated already; says so."""
    with open(report) as f:
        metrics = json.load(f)["summary"]
    ev = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")}
    print(
        f"Finished: this run is trained to step {total_steps} (config.total_steps) and "
        f"evaluated there: mIoU {ev['mIoU']:.2f}, report {report}. Nothing to do; raise "
        "--config.total_steps to train on, run eval.py to evaluate again, or pass another "
        "--workdir for a new run."
    )
    return {"step": total_steps, "losses": {}, "eval": ev, "finished": True}


def describe_devices(mesh) -> str:
    """One line: the mesh's devices, their kind and platform, and the processes."""
    devices = mesh.devices.flatten()
    kinds = ", ".join(sorted({d.device_kind for d in devices}))
    return (
        f"{devices.size} {devices[0].platform} device(s) ({kinds}) in mesh {dict(mesh.shape)}, "
        f"{jax.process_count()} process(es)"
    )


def model_summary(config: ml_collections.ConfigDict, setup: "Setup") -> dict[str, Any]:
    """Name, classifier, parameter count and forward FLOPs of one ``config.data.crop_size``
    image (XLA's count, a multiply-add is 2 FLOPs; GMACs = GFLOPs / 2)."""
    params = setup.abstract_state["params"]
    size = tuple(config.data.crop_size)
    flops = model_stats.forward_flops(
        setup.graphdef, params, setup.abstract_state["model_state"], size
    )
    return {
        "name": config.model.name,
        "classifier": config.model.classifier,
        "parameters": model_stats.parameter_count(params),
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


def _train_in_workdir(config, workdir, mesh, preemption) -> dict[str, Any]:
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
    logging.info(
        "data %s/%s: %d images, batch %d (%d per device) of %dx%d crops",
        d.dataset, d.train_split, len(source), config.batch_size,
        config.batch_size // mesh.devices.size, *d.crop_size,
    )  # fmt: skip

    # 3. Model, optimizer, sharded state, and the evaluator (compiled once per run).
    setup = Setup(config, mesh)
    model_info = model_summary(config, setup)
    logging.info("%s", describe_model(model_info))
    if note := remat_note(config, jax.default_backend()):
        logging.warning("%s", note)
    logging.info("creating the sharded train state (compiling its initializer)")
    state = setup.init_state()
    evaluator = eval_lib.Evaluator(
        config, mesh, setup.state_shardings, source_from_config(config, d.eval_split)
    )

    # 4. Resume (from the newest checkpoint that restores), or start from pretrained weights.
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        start, state, data_state = restored
        loader.set_state(data_state)
        print(f"Resuming from the checkpoint of step {start} in {checkpointer.directory}")
    else:
        start = 0
        logging.info("no checkpoint in %s: starting from step 0", checkpointer.directory)
        if config.init_from:
            state = setup.load_pretrained(state, config.init_from, config.get("trust_pickle"))
    # The non-finite counter belongs to this process: a restart (e.g. with a lower learning
    # rate after a non-finite stop) starts counting from zero.
    state["nonfinite_steps"] = jax.device_put(
        np.zeros((), np.int32), setup.state_shardings["nonfinite_steps"]
    )

    # 5. The loop.
    loss_cfg = train_lib.LossConfig.from_config(config)
    train_step = jax.jit(
        train_lib.make_train_step(setup.graphdef, setup.tx, loss_cfg),
        in_shardings=(setup.state_shardings, setup.batch_sharding),
        out_shardings=(setup.state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    writer = logs.create_writer(workdir, resume_step=start)
    if start == 0:
        writer.write_hparams(workdir_lib.flat_fields(workdir_lib.config_as_dict(config)))
    # Called after every step; its first call (after the step that compiles) starts the clock.
    progress = logs.ReportProgress(
        num_train_steps=config.total_steps,
        batch_size=config.batch_size,
        num_devices=mesh.devices.size,
        every_steps=config.log_every,
    )
    losses: dict[int, float] = {}
    summary: dict[str, Any] = {}
    step = start
    try:
        if preemption.requested:
            print(f"Preempted during start-up: nothing new to save (step {start}).")
            return {"step": start, "losses": losses, "preempted": True}
        if start < config.total_steps:
            logging.info(
                "steps %d to %d; compiling the train step (the first step waits for it)",
                start + 1, config.total_steps,
            )  # fmt: skip
        compile_start = time.perf_counter()
        for step in range(start + 1, config.total_steps + 1):
            batch = _next_batch(loader, step, state, checkpointer, config)
            state, metrics = train_step(state, batch)
            if step == start + 1:
                jax.block_until_ready(metrics)
                logging.info(
                    "train step compiled and ran once in %.1f s",
                    time.perf_counter() - compile_start,
                )
            checkpointer.check_saves()
            last = step == config.total_steps
            preempted = preemption.reached(step, checkpointer.manager)
            scalars = None
            if step % config.log_every == 0 or last or preempted:
                scalars = _log(step, metrics, config)  # waits for the step
            if progress(step) and scalars is not None:
                scalars |= progress.rates
            if scalars is not None:
                writer.write_scalars(step, scalars)
                if scalars["nonfinite_steps"]:
                    raise _nonfinite_stop(step, scalars, checkpointer)
                losses[step] = scalars["loss"]
            if step % config.checkpoint.every == 0 or last or preempted:
                if int(jax.device_get(state["nonfinite_steps"])):  # skipped since the last log
                    raise _nonfinite_stop(step, None, checkpointer)
                checkpointer.save(step, state, loader.get_state(), force=True)
            if preempted:
                checkpointer.wait()
                print(f"Preempted: saved step {step}; rerun the same command to resume.")
                summary["preempted"] = True
                break
            if config.eval.every and step % config.eval.every == 0 and not last:
                with progress.timed("eval", wait_jax_async_dispatch=False):  # it syncs
                    ev = evaluator(state, out_dir=workdir_lib.eval_dir(workdir, step))
                _write_eval(writer, step, ev)
        checkpointer.wait()
        summary |= {"step": step, "losses": losses}
        if step == config.total_steps and not summary.get("preempted"):
            out = workdir_lib.eval_dir(workdir, step)
            ev = evaluator(state, out_dir=out, extra={"step": step, "model": model_info})
            _write_eval(writer, step, ev)
            summary["eval"] = {k: ev[k] for k in ("mIoU", "mAcc", "aAcc")}
            if jax.process_index() == 0:
                print(f"Step {step} evaluated; report: {os.path.join(out, 'report.json')}")
        return summary
    finally:
        loader.close()
        writer.close()
        checkpointer.close()


def _write_eval(writer, step: int, ev: dict[str, Any]) -> None:
    """An evaluation's metrics (and its figures, when it returns some) as ``eval/<name>``."""
    writer.write_scalars(step, {f"eval/{k}": ev[k] for k in ("mIoU", "mAcc", "aAcc")})
    if ev.get("figures"):
        writer.write_images(step, {f"eval/{k}": v for k, v in ev["figures"].items()})


def _next_batch(loader, step: int, state, checkpointer, config) -> dict:
    """The loader's next batch; a bad data file saves the state first, then stops."""
    try:
        return next(loader)
    except Exception as e:
        bad = _bad_example_in(e)
        if bad is None:
            raise
        saved_step = step - 1
        if saved_step > 0 and int(jax.device_get(state["nonfinite_steps"])) == 0:
            if saved_step not in checkpointer.manager.all_steps():
                checkpointer.save(saved_step, state, loader.get_state(), force=True)
            checkpointer.wait()
            kept = f"Step {saved_step} is saved in {checkpointer.directory}, so nothing is lost"
        else:
            kept = "No step was trained yet, so nothing is lost"
        d = config.data
        raise BadTrainingDataError(
            f"Bad training example in batch {step}: {bad}. {kept}. Fix or remove the file and "
            "rerun the same command, or rerun it with --config.data.skip_bad_examples=True to "
            "skip bad examples; `python -m cbp_jax.data check --dataset "
            f"{d.dataset} --root {d.root or '<root>'}` lists every bad file."
        ) from e


def _bad_example_in(error: BaseException) -> "data_lib.BadExampleError | None":
    """The ``BadExampleError`` in ``error``'s chain of causes (loader threads wrap it)."""
    while error is not None:
        if isinstance(error, data_lib.BadExampleError):
            return error
        error = error.__cause__ or error.__context__
    return None


def _nonfinite_stop(step: int, scalars: dict | None, checkpointer) -> "NonFiniteLossError":
    """The error for a non-finite loss or update: nothing of this run after its last
    periodic checkpoint is saved (a diverging state is finite for a while); that checkpoint
    is named as the restart point."""
    checkpointer.wait()
    steps = checkpointer.manager.all_steps()
    logged = ""
    if scalars is not None:
        logged = " (" + ", ".join(f"{k}={scalars[k]:.4g}" for k in _NAN_KEYS if k in scalars) + ")"
    if steps:
        kept = (
            f"The newest checkpoint, step {max(steps)} in "
            f"{os.path.join(checkpointer.directory, str(max(steps)))}, is kept and nothing "
            f"later was saved; rerunning resumes from it. If it has diverged too (see "
            "param_norm in metrics.jsonl), move that folder aside to resume from the one before."
        )
    else:
        kept = "No checkpoint was saved before it; rerunning starts from scratch."
    return NonFiniteLossError(
        f"Non-finite loss or update by step {step}{logged}. {kept} Lower config.optimizer.lr "
        "(e.g. --config.optimizer.lr=VALUE/10) or set --config.optimizer.clip_norm=1.0, then "
        "rerun the same command."
    )


_NAN_KEYS = ("loss", "grad_norm", "param_norm", "nonfinite_steps")


def _log(step, metrics, config) -> dict[str, float]:
    """Fetches the step's metrics (the only host round trip, every ``log_every`` steps)."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    return scalars
