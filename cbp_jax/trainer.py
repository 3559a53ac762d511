"""The training loop behind ``train.py`` and the evaluation behind ``eval.py``.

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
import numpy as np
from absl import logging
from flax import nnx

from cbp_jax import checkpointing, evaluation, models, sharding, train_lib
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


# ----------------------------------------------------------------------------- evaluation


def evaluate_state(
    config: ml_collections.ConfigDict,
    graphdef,
    state,
    *,
    out_dir: str | None = None,
    progress: bool = True,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Evaluates ``state`` on ``config.data.eval_split``; writes a report if ``out_dir``.

    Each process evaluates its share of the images on its first local device with a host
    copy of the state; the confusion matrices are summed over processes.
    """
    host_state = _host_copy({k: state[k] for k in ("params", "model_state")})
    device = jax.local_devices()[0]
    local_mesh = jax.make_mesh(
        (1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=[device]
    )
    with jax.set_mesh(local_mesh):
        return _evaluate_on_device(config, graphdef, host_state, device, out_dir, progress, extra)


def _host_copy(tree):
    """NumPy copy of a (possibly multi-host sharded) pytree, typed PRNG keys included."""
    from jax.experimental import multihost_utils

    raw = checkpointing.keys_as_data(tree)
    if jax.process_count() > 1:
        raw = multihost_utils.process_allgather(raw, tiled=True)
    else:
        raw = jax.device_get(raw)
    return checkpointing.keys_from_data(raw, tree)


def _evaluate_on_device(config, graphdef, host_state, device, out_dir, progress, extra):
    e = config.eval
    local_state = jax.device_put(host_state, device)
    predict = jax.jit(train_lib.make_predict_fn(graphdef))

    def logits_fn(images):
        return predict(local_state, jax.device_put(images, device))

    source = source_from_config(config, config.data.eval_split)
    transform = data_lib.test_transform(
        tuple(config.data.test_scale), aligned=config.data.aligned_resize
    )
    examples = (
        {"image": ex["image"], "label": ex["label"][None]}
        for ex in data_lib.eval_examples(source, transform)
    )
    total = len(source)
    if e.max_images:
        examples = (ex for ex, _ in zip(examples, range(e.max_images), strict=False))
        total = min(total, e.max_images)
    total = -(-total // jax.process_count())
    write_panels = out_dir is not None and jax.process_index() == 0 and e.num_panels > 0
    metrics = evaluation.evaluate(
        logits_fn,
        examples,
        num_classes=config.data.num_classes,
        mode=e.mode,
        crop=tuple(e.crop) if e.mode == "slide" else None,
        stride=tuple(e.stride) if e.mode == "slide" else None,
        ratios=tuple(e.ratios),
        flip=e.flip,
        panel_dir=os.path.join(out_dir, "panels") if write_panels else None,
        num_panels=e.num_panels if write_panels else 0,
        palette=np.asarray(source.palette, np.uint8),
        progress=progress and jax.process_index() == 0,
        total=total,
    )
    classifier = nnx.merge(graphdef, local_state["params"], local_state["model_state"]).classifier
    weights = np.asarray(classifier.class_weights())
    analysis = evaluation.prototype_analysis(weights)
    # Fig. 5 groups classes by pixel frequency; the evaluated split's own label counts stand
    # in for the training counts (they come free with the confusion matrix).
    groups = evaluation.f1_by_frequency_groups(
        np.asarray(metrics["F1"]),
        np.asarray(metrics["label_area"]),
        num_groups=config.eval.frequency_groups,
        class_names=source.class_names,
    )
    if out_dir is not None and jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        evaluation.save_similarity_heatmap(os.path.join(out_dir, "prototype_cosine.png"), weights)
        evaluation.write_report(
            os.path.join(out_dir, "report.json"),
            metrics,
            source.class_names,
            extra={
                "prototype_analysis": analysis,
                "f1_by_frequency_groups": groups,
                "frequency_groups_counted_on": config.data.eval_split,
                **(extra or {}),
            },
        )
        print(evaluation.format_class_table(metrics, source.class_names))
    return metrics | {"prototype_analysis": analysis, "f1_by_frequency_groups": groups}


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    weights: str | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluates the workdir's checkpoint ``step`` (default latest), or ``weights`` if given."""
    sharding.initialize_distributed(**config.distributed)
    mesh = mesh_from_config(config)
    with jax.set_mesh(mesh):
        setup = Setup(config, mesh)
        state = setup.init_state()
        if weights:
            state = setup.load_pretrained(state, weights)
            label = "weights"
        else:
            checkpointer = checkpointing.Checkpointer(
                os.path.join(workdir, "checkpoints"), every=1, async_save=False
            )
            step = checkpointer.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(
                    f"No checkpoint in {checkpointer.directory}. Train first "
                    f"(python train.py --config ... --workdir {workdir}) or pass --weights."
                )
            if step not in checkpointer.manager.all_steps():
                raise FileNotFoundError(
                    f"No checkpoint of step {step} in {checkpointer.directory}; it has steps "
                    f"{sorted(checkpointer.manager.all_steps())}."
                )
            state, _ = checkpointer.restore(step, state)
            checkpointer.close()
            label = f"step {step}"
        print(f"Evaluating {label} on {config.data.dataset}/{config.data.eval_split}")
        out_dir = out_dir or os.path.join(
            workdir, f"eval_{step if step is not None else 'weights'}"
        )
        return evaluate_state(
            config, setup.graphdef, state, out_dir=out_dir, extra={"evaluated": label}
        )


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

        # 3. Model, optimizer, sharded state.
        setup = Setup(config, mesh)
        state = setup.init_state()

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
                    ev = evaluate_state(config, setup.graphdef, state, out_dir=out)
                    writer.write(step, {f"eval/{k}": ev[k] for k in ("mIoU", "mAcc", "aAcc")})
        finally:
            progress.close()
            checkpointer.wait()
            preemption.restore()
            loader.close()

        summary |= {"step": step, "losses": losses}
        if step == config.total_steps and not summary.get("preempted"):
            out = os.path.join(workdir, "eval")
            ev = evaluate_state(config, setup.graphdef, state, out_dir=out, extra={"step": step})
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
