"""The training loop behind ``train.py``.

Phases: (1) devices, processes and the workdir, (2) data, (3) model, optimizer and sharded
state (``cbp_jax.factories``), (4) resume or pretrained init, (5) the jitted step loop with
logging, checkpoints, preemption and periodic evaluation, (6) the final evaluation.

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
import ml_collections
import numpy as np
from absl import logging

from cbp_jax import (
    checkpointing,
    compilation,
    config_checks,
    eval_lib,
    factories,
    logs,
    sharding,
    storage,
)
from cbp_jax import data as data_lib
from cbp_jax import preemption as preemption_lib
from cbp_jax import workdir as workdir_lib
from cbp_jax.data import views as views_lib
from cbp_jax.errors import BadTrainingDataError, NonFiniteLossError


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


def check_run_config(config: ml_collections.ConfigDict, mesh) -> None:
    """Raises ``ConfigError`` for a batch the mesh or the OCCL views cannot split, or no
    steps; ``data.LayoutError`` for a missing data folder (before the workdir is made)."""
    devices = mesh.devices.size
    if config.batch_size % devices:
        raise config_checks.ConfigError(
            f"config.batch_size={config.batch_size} does not divide over the {devices} devices "
            f"of the mesh; pass a multiple of {devices} (e.g. --config.batch_size="
            f"{devices * max(1, round(config.batch_size / devices))})."
        )
    if config.loss.occl and config.loss.views == "batch_halves" and config.batch_size % 2:
        raise config_checks.ConfigError(
            f"config.loss.views='batch_halves' splits each batch into two halves, so "
            f"config.batch_size must be even, got {config.batch_size}: pass --config.batch_size="
            f"{config.batch_size + 1} (or {config.batch_size - 1}), or --config.loss.views="
            "random_pixels."
        )
    if config.total_steps < 1:
        raise config_checks.ConfigError(f"config.total_steps={config.total_steps}; must be >= 1.")
    factories.check_data_root(config)


def itstime(step: int, every: int, total_steps: int, *, last: bool = True) -> bool:
    """Whether a periodic action runs after ``step``: every ``every`` steps (0: never) and,
    with ``last``, after the final step (big_vision's ``itstime``)."""
    return bool(every and step % every == 0) or (last and step == total_steps)


# ----------------------------------------------------------------------------- the run


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
    mesh = factories.mesh_from_config(config)
    check_run_config(config, mesh)
    workdir = os.fspath(storage.resolve(workdir))  # local: absolute; gs://...: as it is
    lock = None
    if jax.process_index() == 0:
        workdir_lib.check_resume_config(workdir, config)  # before anything is written
        storage.path(workdir).mkdir(parents=True, exist_ok=True)
        lock = workdir_lib.acquire_lock(workdir, lease_timeout=config.workdir_lease_timeout)
        preemption.on_stop_at_once(lock.release)
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
        logging.info("%s", factories.describe_devices(mesh))
        if note := factories.devices_left_out(config, mesh):
            logging.warning("%s", note)
        if note := sharding.accelerator_note(jax.default_backend()):
            logging.warning("%s", note)
        with jax.set_mesh(mesh):
            return _train_in_workdir(config, workdir, mesh, preemption)
    finally:
        preemption_lib.stop_watching()
        if lock is not None:
            lock.release()


def _finished(total_steps: int, report: str) -> dict[str, Any]:
    """The summary of a run that is trained and evaluated already; says so."""
    metrics = json.loads(storage.path(report).read_text())["summary"]
    ev = {k: metrics[k] for k in ("mIoU", "mAcc", "aAcc")}
    print(
        f"Finished: this run is trained to step {total_steps} (config.total_steps) and "
        f"evaluated there: mIoU {ev['mIoU']:.2f}, report {report}. Nothing to do; raise "
        "--config.total_steps to train on, run eval.py to evaluate again, or pass another "
        "--workdir for a new run."
    )
    return {"step": total_steps, "losses": {}, "eval": ev, "finished": True}


def _train_in_workdir(config, workdir, mesh, preemption) -> dict[str, Any]:
    # 2. Data.
    loader = _train_loader(config, mesh)
    # 3. Model, optimizer, sharded state, and the evaluator (compiled once per run).
    setup = factories.TrainSetup(config, mesh)
    model_info = factories.model_summary(config, setup.abstract_state)
    logging.info("%s", factories.describe_model(model_info))
    if note := remat_note(config, jax.default_backend()):
        logging.warning("%s", note)
    logging.info("creating the sharded train state (compiling its initializer)")
    state = setup.init_state()
    eval_source = factories.source_from_config(config, config.data.eval_split)
    evaluator = eval_lib.Evaluator(config, mesh, setup.state_shardings, eval_source)
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, checkpointing.CHECKPOINTS_NAME),
        every=config.checkpoint.every,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    writer = None
    try:
        # 4. Resume (from the newest checkpoint that restores), or pretrained weights.
        start, state = _resume_or_init(config, setup, state, checkpointer, loader)
        writer = logs.create_writer(workdir, resume_step=start)
        if start == 0:
            writer.write_hparams(workdir_lib.flat_fields(workdir_lib.config_as_dict(config)))
        if preemption.requested:
            print(f"Preempted during start-up: nothing new to save (step {start}).")
            return {"step": start, "losses": {}, "preempted": True}
        # 5. The loop.
        train_step = setup.train_step()
        loop = _Loop(config, workdir, loader, checkpointer, writer, evaluator, preemption)
        state, summary = loop.run(train_step, state, start, mesh.devices.size)
        # 6. The final evaluation.
        step = summary["step"]
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
        if writer is not None:
            writer.close()
        checkpointer.close()


def _train_loader(config: ml_collections.ConfigDict, mesh):
    """The training split's loader: random mmseg transforms, global sharded batches."""
    d = config.data
    source = factories.source_from_config(config, d.train_split)
    transform = data_lib.train_transform(
        tuple(d.crop_size), tuple(d.base_scale), tuple(d.ratio_range), d.cat_max_ratio
    )
    if config.loss.occl and config.loss.views == "objects":
        transform = views_lib.WithObjectViews(transform, config.loss.single_object)
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
    return loader


def _resume_or_init(config, setup, state, checkpointer, loader):
    """``(first step, state)``: the newest checkpoint that restores (and its data-iterator
    position), else step 0 with ``config.init_from``'s weights when set."""
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
    return start, state


class _Loop:
    """The step loop's periodic actions: log, checkpoint, evaluate, stop when preempted."""

    def __init__(self, config, workdir, loader, checkpointer, writer, evaluator, preemption):
        self.config, self.workdir, self.loader = config, workdir, loader
        self.checkpointer, self.writer = checkpointer, writer
        self.evaluator, self.preemption = evaluator, preemption

    def run(self, train_step, state, start: int, num_devices: int):
        """Steps ``start + 1 .. config.total_steps``; returns ``(state, summary)``."""
        c = self.config
        if start < c.total_steps:
            logging.info(
                "steps %d to %d; compiling the train step (the first step waits for it)",
                start + 1, c.total_steps,
            )  # fmt: skip
        # Called after every step; its first call (after the compiling step) starts the clock.
        progress = logs.ReportProgress(
            num_train_steps=c.total_steps,
            batch_size=c.batch_size,
            num_devices=num_devices,
            every_steps=c.log_every,
        )
        summary: dict[str, Any] = {"step": start, "losses": {}}
        compile_start = time.perf_counter()
        for step in range(start + 1, c.total_steps + 1):
            state, metrics = train_step(state, self._next_batch(step, state))
            summary["step"] = step
            if step == start + 1:
                jax.block_until_ready(metrics)
                self.preemption.training_started()  # a signal now saves this run's work
                elapsed = time.perf_counter() - compile_start
                logging.info("train step compiled and ran once in %.1f s", elapsed)
            self.checkpointer.check_saves()
            preempted = self.preemption.reached(step, self.checkpointer.manager)
            if itstime(step, c.log_every, c.total_steps) or preempted:
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if progress(step):
                    scalars |= progress.rates
                self.writer.write_scalars(step, scalars)
                if scalars["nonfinite_steps"]:
                    raise _nonfinite_stop(step, scalars, self.checkpointer)
                summary["losses"][step] = scalars["loss"]
            else:
                progress(step)
            if itstime(step, c.checkpoint.every, c.total_steps) or preempted:
                if int(jax.device_get(state["nonfinite_steps"])):  # skipped since the last log
                    raise _nonfinite_stop(step, None, self.checkpointer)
                self.checkpointer.save(step, state, self.loader.get_state(), force=True)
            if preempted:
                self.checkpointer.wait()
                print(f"Preempted: saved step {step}; rerun the same command to resume.")
                summary["preempted"] = True
                break
            if step < c.total_steps and itstime(step, c.eval.every, c.total_steps, last=False):
                with progress.timed("eval", wait_jax_async_dispatch=False):  # it syncs
                    out = workdir_lib.eval_dir(self.workdir, step)
                    _write_eval(self.writer, step, self.evaluator(state, out_dir=out))
        self.checkpointer.wait()
        return state, summary

    def _next_batch(self, step: int, state) -> dict:
        """The loader's next batch; a bad data file saves the state first, then stops."""
        try:
            return next(self.loader)
        except Exception as e:
            bad = _bad_example_in(e)
            if bad is None:
                raise
            raise self._bad_data_stop(step, state, bad) from e

    def _bad_data_stop(self, step: int, state, bad) -> BadTrainingDataError:
        """Saves the state before batch ``step`` (when it is finite) and says so."""
        saved_step, checkpointer = step - 1, self.checkpointer
        if saved_step > 0 and int(jax.device_get(state["nonfinite_steps"])) == 0:
            if saved_step not in checkpointer.manager.all_steps():
                checkpointer.save(saved_step, state, self.loader.get_state(), force=True)
            checkpointer.wait()
            kept = f"Step {saved_step} is saved in {checkpointer.directory}, so nothing is lost"
        else:
            kept = "No step was trained yet, so nothing is lost"
        d = self.config.data
        return BadTrainingDataError(
            f"Bad training example in batch {step}: {bad}. {kept}. Fix or remove the file and "
            "rerun the same command, or rerun it with --config.data.skip_bad_examples=True to "
            "skip bad examples; `python -m cbp_jax.data check --dataset "
            f"{d.dataset} --root {d.root or '<root>'}` lists every bad file."
        )


def _write_eval(writer, step: int, ev: dict[str, Any]) -> None:
    """An evaluation's metrics (and its figures, when it returns some) as ``eval/<name>``."""
    writer.write_scalars(step, {f"eval/{k}": ev[k] for k in ("mIoU", "mAcc", "aAcc")})
    if ev.get("figures"):
        writer.write_images(step, {f"eval/{k}": v for k, v in ev["figures"].items()})


def _bad_example_in(error: BaseException) -> "data_lib.BadExampleError | None":
    """The ``BadExampleError`` in ``error``'s chain of causes (loader threads wrap it)."""
    while error is not None:
        if isinstance(error, data_lib.BadExampleError):
            return error
        error = error.__cause__ or error.__context__
    return None


_NAN_KEYS = ("loss", "grad_norm", "param_norm", "nonfinite_steps")


def _nonfinite_stop(step: int, scalars: dict | None, checkpointer) -> NonFiniteLossError:
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
