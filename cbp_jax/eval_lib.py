"""Evaluation library: the driver over batches, the mesh evaluator of a run, checkpoints.

``evaluate(logits_fn, batches)`` is the one evaluation loop: test-time inference
(``cbp_jax.inference``), the data-set confusion matrix accumulated on device and read once
(``cbp_jax.metrics``), example panels (``cbp_jax.figures``). Batches are either per-image
NumPy examples (any model, one device) or the padded global batches of
``data.make_eval_loader`` with a ``valid`` mask (the pattern of big_vision's evaluators), so
on a mesh of several processes the sums are global by construction.

``Evaluator`` evaluates the train states of one run with the state as it is sharded for
training, on every device of the mesh, in ``config.eval.dtype`` (float32 by default, as mmseg
tests, whatever the training compute dtype). Its jitted prediction function is built once and
reused by every evaluation of the run; each evaluation logs (and returns as
``compilations``) how many XLA programs it compiled. ``evaluate_checkpoint`` is ``eval.py``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from cbp_jax import (
    compilation,
    factories,
    figures,
    inference,
    metrics,
    report,
    sharding,
)
from cbp_jax import data as data_lib
from cbp_jax import workdir as workdir_lib
from cbp_jax.data.transforms import MEAN, STD


def _host(x) -> np.ndarray:
    """NumPy copy of ``x``; a global array spread over processes is gathered (a collective:
    every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _as_batch(example: dict[str, Any], num_classes: int, ignore_index: int):
    """(image (B, h, w, 3), label (B, H, W), valid (B,) or None) of an example or batch."""
    image, label = example["image"], example["label"]
    if image.ndim == 3:
        image, label = image[None], label[None]
    if label.ndim != 3 or label.shape[0] != image.shape[0]:
        raise ValueError(
            f"label must be (H, W) or (B, H, W) matching the image batch, got label shape "
            f"{tuple(label.shape)} for image shape {tuple(image.shape)}."
        )
    if isinstance(label, np.ndarray):
        metrics.check_labels(label, num_classes, ignore_index)
    return jnp.asarray(image, jnp.float32), jnp.asarray(label), example.get("valid")


@dataclasses.dataclass(frozen=True)
class Panels:
    """Which example panels (image | ground truth | prediction | overlay) an evaluation
    draws: the first ``count`` valid images, as ``<directory>/panel_XXXX.png``.

    Attributes:
      palette: (N, 3) uint8 colours; ``report.default_palette(N)`` when None.
      class_names: N names for the legends; indices when None.
      mean, std: the normalization, undone for the pictures.
    """

    directory: str
    count: int
    palette: np.ndarray | None = None
    class_names: Sequence[str] | None = None
    mean: Sequence[float] = MEAN
    std: Sequence[float] = STD


def evaluate(
    logits_fn: inference.LogitsFn,
    batches: Iterable[dict[str, Any]],
    *,
    num_classes: int,
    settings: inference.Settings | None = None,
    ignore_index: int = 255,
    panels: Panels | None = None,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Any]:
    """Evaluates ``logits_fn`` over ``batches`` with mmseg-exact metrics.

    Each batch is a dict with ``"image"`` float32 normalized (H, W, 3) or (B, H, W, 3),
    ``"label"`` int (H0, W0) or (B, H0, W0) at the ORIGINAL size (images of one batch share
    one size) and optionally ``"valid"`` (B,) bool: images marked False count nowhere. NumPy
    labels are checked on host; then everything stays on device and the confusion matrix is
    read once at the end (panel batches excepted). On several processes every process must
    run this with the same global batches (``data.make_eval_loader``); process 0 writes the
    panels.

    Args:
      logits_fn: (B, h, w, 3) -> (B, h', w', N) logits.
      batches: iterable of batch dicts.
      num_classes: N.
      settings: how ``inference.inference`` runs (whole / slide, ratios, flip, ...);
        default ``inference.Settings()`` (whole image, one scale).
      ignore_index: label value left out of the metrics.
      panels: the example panels to draw; None draws none.
      progress: show a tqdm progress bar (batches).
      total: length for the progress bar when ``batches`` has no ``len``.

    Returns:
      ``metrics.metrics_from_confusion`` of the data-set matrix, plus ``num_images``,
      ``panels`` (the paths written) and ``figures`` (``{"panels/panel_XXXX": (H, W, 3)
      uint8}``, the panels as images; empty on processes other than 0).
    """
    from tqdm.auto import tqdm

    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    settings = settings or inference.Settings()
    acc = metrics.ConfusionAccumulator(num_classes, ignore_index)
    written: list[str] = []
    images: dict[str, np.ndarray] = {}
    for batch in tqdm(batches, total=total, desc="eval", disable=not progress):
        image, label, valid = _as_batch(batch, num_classes, ignore_index)
        scores = inference.inference(
            logits_fn,
            image,
            out_size=tuple(label.shape[1:3]),
            num_classes=num_classes,
            **dataclasses.asdict(settings),
        )
        acc.update_from_scores(label, scores, valid)
        # One chunk in flight: XLA:CPU's in-process all-reduce deadlocked (rendezvous
        # timeout, abort) on 2 devices when chunks queued up unsynchronized (CamVid val).
        acc.wait()
        if panels is not None and len(written) < panels.count:
            drawn = _write_panels(
                image, label, jnp.argmax(scores, -1), valid, batch.get("name"), panels,
                range(len(written), panels.count), num_classes, ignore_index,
            )  # fmt: skip
            written += [path for path, _ in drawn]
            images |= {
                f"panels/{os.path.basename(path)[:-4]}": rgb
                for path, rgb in drawn
                if rgb is not None
            }
    result = metrics.metrics_from_confusion(acc.result())
    result["num_images"] = acc.num_images
    result["panels"] = written
    result["figures"] = images
    return result


def _write_panels(
    image, label, preds, valid, names, panels: Panels, numbers, num_classes, ignore_index
) -> list[tuple[str, np.ndarray | None]]:
    """``(path, (H, W, 3) uint8 or None)`` per valid image of the batch, numbered from
    ``numbers``; process 0 draws and writes them (the others get None)."""
    image, label, preds = _host(image), _host(label), _host(preds)
    keep = np.ones(len(image), bool) if valid is None else _host(valid).astype(bool)
    names = [names] if isinstance(names, str) else names
    if names is None or len(names) != len(image):  # names are per process
        names = [None] * len(image)
    palette = panels.palette if panels.palette is not None else report.default_palette(num_classes)
    drawn = []
    for k, number in zip(np.flatnonzero(keep), numbers, strict=False):
        path = os.path.join(panels.directory, f"panel_{number:04d}.png")
        rgb = None
        if jax.process_index() == 0:
            rgb = figures.panel(
                report.denormalize(image[k], panels.mean, panels.std),
                label[k],
                preds[k],
                palette,
                panels.class_names,
                title=names[k] or None,
                ignore_index=ignore_index,
                path=path,
            )
        drawn.append((path, rgb))
    return drawn


# ----------------------------------------------------------------------------- runs


def eval_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
    """``config.eval.batch_size``, or one image per device of ``mesh`` when it is 0."""
    devices = mesh.devices.size
    size = config.eval.batch_size or devices
    if size % devices or size % jax.process_count():
        raise ValueError(
            f"config.eval.batch_size={config.eval.batch_size} must be a multiple of the "
            f"{devices} devices of the mesh; use 0 for one image per device."
        )
    return size


_CLASSIFIER_TITLES = {"cbp": "CBP", "linear": "learned"}  # config.model.classifier


class Evaluator:
    """Evaluates train states of one run on ``config.data.eval_split`` over the whole mesh.

    Args:
      config: the run's config (``data``, ``eval``, ``model``).
      mesh: the training mesh.
      state_shardings: the train state's shardings (``{"params", "model_state", ...}``; the
        other entries are not read).
      source: the evaluation split (a data source).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh, state_shardings, source):
        self.config, self.mesh, self.source = config, mesh, source
        self.graphdef = factories.eval_graphdef(config)
        self.batch_size = eval_batch_size(config, mesh)
        self.settings = inference.Settings.from_config(config)
        model_shardings = {k: state_shardings[k] for k in ("params", "model_state")}
        self._batch_sharding = sharding.batch_sharding(mesh)
        self._predict = factories.eval_step(self.graphdef, model_shardings, mesh)
        self._class_weights = jax.jit(
            lambda params, model_state: (
                nnx.merge(self.graphdef, params, model_state)
                .classifier.class_weights()
                .astype(jnp.float32)
            ),
            out_shardings=sharding.replicated(mesh),
        )

    def __call__(
        self,
        state,
        *,
        out_dir: str | None = None,
        progress: bool = True,
        extra: dict | None = None,
        compare_weights: np.ndarray | None = None,
        compare_name: str = "learned",
    ) -> dict[str, Any]:
        """Evaluates ``state``; with ``out_dir``, process 0 also writes the report and
        figures there (``report.write_evaluation``) and the example panels in
        ``<out_dir>/panels``. Every process must call it.

        Args:
          state: the model's ``{"params", "model_state"}`` (a train state's other entries
            are not read).
          out_dir: where to write; None writes and draws nothing.
          progress: show a progress bar.
          extra, compare_weights, compare_name: see ``report.write_evaluation``.

        Returns:
          The metrics of ``evaluate`` plus ``compilations`` (XLA programs compiled by this
          call), ``class_weights`` ((N, C) float32), ``prototype_analysis``,
          ``f1_by_frequency_groups`` and ``figures`` (``{name: (H, W, 3) uint8}``, the
          written PNGs by path under ``out_dir`` without ``.png``; empty without ``out_dir``
          and off process 0).
        """
        compiled_before = compilation.compiled()
        result = self._evaluate(state, out_dir, progress)
        result["compilations"] = compilation.compiled() - compiled_before
        logging.info("evaluation compiled %d XLA programs", result["compilations"])
        weights = _host(self._class_weights(state["params"], state["model_state"]))
        result["class_weights"] = weights
        result["prototype_analysis"] = report.prototype_analysis(weights)
        # Fig. 5 groups classes by pixel frequency; the evaluated split's own label counts
        # stand in for the training counts (they come free with the confusion matrix).
        result["f1_by_frequency_groups"] = report.f1_by_frequency_groups(
            np.asarray(result["F1"]),
            np.asarray(result["label_area"]),
            num_groups=self.config.eval.frequency_groups,
            class_names=self.source.class_names,
        )
        if out_dir is not None and jax.process_index() == 0:
            classifier = self.config.model.classifier
            result["figures"] |= report.write_evaluation(
                out_dir,
                result,
                class_names=self.source.class_names,
                model_title=_CLASSIFIER_TITLES.get(classifier, classifier),
                eval_split=self.config.data.eval_split,
                compare_weights=compare_weights,
                compare_name=compare_name,
                extra=extra,
            )
            print(metrics.format_class_table(result, self.source.class_names))
        return result

    def _evaluate(self, state, out_dir: str | None, progress: bool) -> dict[str, Any]:
        """``evaluate`` over the eval split's global batches, on the mesh."""
        c = self.config
        model_state = {"params": state["params"], "model_state": state["model_state"]}

        def logits_fn(images):
            return self._predict(model_state, jax.device_put(images, self._batch_sharding))

        panels = None
        if out_dir is not None and c.eval.num_panels:
            panels = Panels(
                os.path.join(out_dir, "panels"),
                c.eval.num_panels,
                palette=np.asarray(self.source.palette, np.uint8),
                class_names=self.source.class_names,
            )
        transform = data_lib.test_transform(tuple(c.data.test_scale), aligned=c.data.aligned_resize)
        with (
            jax.set_mesh(self.mesh),
            data_lib.make_eval_loader(
                self.source,
                transform,
                global_batch_size=self.batch_size,
                mesh=self.mesh,
                data_axis=sharding.BATCH_AXES,
                num_examples=c.eval.max_images or None,
                num_workers=c.data.num_workers,
            ) as loader,
        ):
            return evaluate(
                logits_fn,
                loader,
                num_classes=c.data.num_classes,
                settings=self.settings,
                panels=panels,
                progress=progress and jax.process_index() == 0,
            )


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    weights: str | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """``eval.py``: evaluates the workdir's checkpoint ``step`` (default the latest), or
    ``weights`` if given, over the whole mesh. Writes the report to ``out_dir`` (default
    ``workdir.eval_dir(workdir, step)``, ``eval_weights`` for ``weights``), returned as
    ``"out_dir"`` with the metrics."""
    sharding.initialize_distributed(**config.distributed)
    compilation.enable_persistent_cache(
        compilation.cache_dir(config.get("compilation_cache", ""), workdir)
    )
    mesh = factories.mesh_from_config(config)
    with jax.set_mesh(mesh):
        if weights:
            state, _ = factories.load_weights(
                factories.train_graphdef(config),
                factories.init_model_state(config, mesh),
                weights,
                factories.model_shardings(config, mesh),
                trust_pickle=config.get("trust_pickle"),
            )
            label, folder = "weights", "weights"
        else:
            step, state = factories.restore(config, workdir, step, mesh)
            label, folder = f"step {step}", step
        out_dir = out_dir or workdir_lib.eval_dir(workdir, folder)
        print(f"Evaluating {label} on {config.data.dataset}/{config.data.eval_split}")
        source = factories.source_from_config(config, config.data.eval_split)
        evaluator = Evaluator(config, mesh, factories.model_shardings(config, mesh), source)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        model = factories.model_summary(config, abstract)
        print(factories.describe_model(model))
        result = evaluator(state, out_dir=out_dir, extra={"evaluated": label, "model": model})
        return result | {"out_dir": out_dir}
