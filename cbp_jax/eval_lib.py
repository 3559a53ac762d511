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

import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from cbp_jax import compilation, figures, inference, metrics, report, sharding, train_lib
from cbp_jax import data as data_lib
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


def evaluate(
    logits_fn: inference.LogitsFn,
    batches: Iterable[dict[str, Any]],
    *,
    num_classes: int,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scale: tuple[int, int] | None = None,
    aligned: bool = False,
    size_divisor: int = 32,
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    ignore_index: int = 255,
    window_batch: int = 1,
    pad_windows: bool = False,
    panel_dir: str | None = None,
    num_panels: int = 0,
    palette: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
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
      mode, crop, stride, scale, aligned, size_divisor, ratios, flip, window_batch,
        pad_windows: see ``inference.inference``.
      ignore_index: label value left out of the metrics.
      panel_dir: where to write ``panel_XXXX.png`` (``figures.panel``: image | ground truth
        | prediction | overlay, with a legend of the classes present).
      num_panels: how many panels to write (the first valid images).
      palette: (N, 3) uint8 colours; ``report.default_palette(N)`` when None.
      class_names: N names for the panel legends; indices when None.
      mean, std: the normalization, undone for the panels.
      progress: show a tqdm progress bar (batches).
      total: length for the progress bar when ``batches`` has no ``len``.

    Returns:
      ``metrics.metrics_from_confusion`` of the data-set matrix, plus ``num_images``,
      ``panels`` (the paths written) and ``figures`` (``{"panels/panel_XXXX": (H, W, 3)
      uint8}``, the panels as images; empty on processes other than 0).
    """
    from tqdm.auto import tqdm

    if num_panels and panel_dir is None:
        raise ValueError("num_panels > 0 needs panel_dir, the folder to write the PNGs to.")
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    if palette is None:
        palette = report.default_palette(num_classes)
    acc = metrics.ConfusionAccumulator(num_classes, ignore_index)
    panels: list[str] = []
    images: dict[str, np.ndarray] = {}
    for batch in tqdm(batches, total=total, desc="eval", disable=not progress):
        image, label, valid = _as_batch(batch, num_classes, ignore_index)
        scores = inference.inference(
            logits_fn,
            image,
            out_size=tuple(label.shape[1:3]),
            mode=mode,
            crop=crop,
            stride=stride,
            scale=scale,
            aligned=aligned,
            size_divisor=size_divisor,
            ratios=ratios,
            flip=flip,
            num_classes=num_classes,
            window_batch=window_batch,
            pad_windows=pad_windows,
        )
        acc.update_from_scores(label, scores, valid)
        # One chunk in flight: XLA:CPU's in-process all-reduce deadlocked (rendezvous
        # timeout, abort) on 2 devices when chunks queued up unsynchronized (CamVid val).
        acc.wait()
        if len(panels) < num_panels:
            drawn = _write_panels(
                image, label, jnp.argmax(scores, -1), valid, batch.get("name"),
                panel_dir, range(len(panels), num_panels), palette, class_names, ignore_index,
                mean, std,
            )  # fmt: skip
            panels += [path for path, _ in drawn]
            images |= {
                f"panels/{os.path.basename(path)[:-4]}": rgb
                for path, rgb in drawn
                if rgb is not None
            }
    result = metrics.metrics_from_confusion(acc.result())
    result["num_images"] = acc.num_images
    result["panels"] = panels
    result["figures"] = images
    return result


def _write_panels(
    image,
    label,
    preds,
    valid,
    names,
    panel_dir,
    numbers,
    palette,
    class_names,
    ignore_index,
    mean,
    std,
) -> list[tuple[str, np.ndarray | None]]:
    """``(path, (H, W, 3) uint8 or None)`` per valid image of the batch, numbered from
    ``numbers``; process 0 draws and writes them (the others get None)."""
    image, label, preds = _host(image), _host(label), _host(preds)
    keep = np.ones(len(image), bool) if valid is None else _host(valid).astype(bool)
    names = [names] if isinstance(names, str) else names
    if names is None or len(names) != len(image):  # names are per process
        names = [None] * len(image)
    drawn = []
    for k, number in zip(np.flatnonzero(keep), numbers, strict=False):
        path = os.path.join(panel_dir, f"panel_{number:04d}.png")
        rgb = None
        if jax.process_index() == 0:
            rgb = figures.panel(
                report.denormalize(image[k], mean, std),
                label[k],
                preds[k],
                palette,
                class_names,
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


def eval_graphdef(config: ml_collections.ConfigDict) -> nnx.GraphDef:
    """The model's graph computing in ``config.eval.dtype`` ("" keeps the training dtype).

    Only the compute dtype differs from training: parameters and state are the same arrays.
    """
    from cbp_jax import trainer  # the run's factories (trainer imports this module)

    config = ml_collections.ConfigDict(config.to_dict())
    if config.eval.dtype:
        config.model.dtype = config.eval.dtype
    return train_lib.split_model(nnx.eval_shape(lambda: trainer.model_from_config(config)))[0]


_CLASSIFIER_TITLES = {"cbp": "CBP", "linear": "learned"}  # config.model.classifier


class Evaluator:
    """Evaluates train states of one run on ``config.data.eval_split`` over the whole mesh.

    Args:
      config: the run's config (``data``, ``eval``, ``model``).
      mesh: the training mesh.
      state_shardings: the train state's shardings (``{"params", "model_state", ...}``).
      source: the evaluation split (a data source).
    """

    def __init__(self, config: ml_collections.ConfigDict, mesh, state_shardings, source):
        self.config, self.mesh, self.source = config, mesh, source
        self.graphdef = eval_graphdef(config)
        self.batch_size = eval_batch_size(config, mesh)
        model_shardings = {k: state_shardings[k] for k in ("params", "model_state")}
        batch = sharding.batch_sharding(mesh)
        self._batch_sharding = batch
        self._predict = jax.jit(
            train_lib.make_predict_fn(self.graphdef),
            in_shardings=(model_shardings, batch),
            out_shardings=batch,
        )
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
        """Evaluates ``state``; writes ``report.json``, ``panels/panel_XXXX.png``, the cosine
        heatmap ``prototype_cosine.png`` (Fig. 6) and ``f1_by_frequency.png`` (Fig. 5) to
        ``out_dir`` (process 0) when given. Every process must call it.

        Args:
          state: the train state (``params``, ``model_state``).
          out_dir: where to write the report and figures; None writes and draws nothing.
          progress: show a progress bar.
          extra: more entries for the report's ``extra``.
          compare_weights: (N, C) rows of another classifier of the same classes (e.g. a
            learned baseline's) to draw beside this one in ``prototype_cosine_pair.png``.
          compare_name: the title of ``compare_weights``' heatmap.

        Returns:
          The metrics of ``evaluate`` plus ``compilations`` (XLA programs compiled by this
          call), ``prototype_analysis``, ``f1_by_frequency_groups`` and ``figures``
          (``{name: (H, W, 3) uint8}``, the written PNGs by path under ``out_dir`` without
          ``.png``, e.g. for TensorBoard; empty without ``out_dir`` and off process 0).
        """
        c, e = self.config, self.config.eval
        compiled_before = compilation.compiled()
        model_state = {"params": state["params"], "model_state": state["model_state"]}

        def logits_fn(images):
            return self._predict(model_state, jax.device_put(images, self._batch_sharding))

        transform = data_lib.test_transform(tuple(c.data.test_scale), aligned=c.data.aligned_resize)
        num_panels = e.num_panels if out_dir is not None else 0
        with (
            jax.set_mesh(self.mesh),
            data_lib.make_eval_loader(
                self.source,
                transform,
                global_batch_size=self.batch_size,
                mesh=self.mesh,
                data_axis=sharding.BATCH_AXES,
                num_examples=e.max_images or None,
                num_workers=c.data.num_workers,
            ) as loader,
        ):
            result = evaluate(
                logits_fn,
                loader,
                num_classes=c.data.num_classes,
                mode=e.mode,
                crop=tuple(e.crop) if e.mode == "slide" else None,
                stride=tuple(e.stride) if e.mode == "slide" else None,
                ratios=tuple(e.ratios),
                flip=e.flip,
                panel_dir=os.path.join(out_dir, "panels") if num_panels else None,
                num_panels=num_panels,
                palette=np.asarray(self.source.palette, np.uint8),
                class_names=self.source.class_names,
                progress=progress and jax.process_index() == 0,
            )
            weights = _host(self._class_weights(state["params"], state["model_state"]))
        result["compilations"] = compilation.compiled() - compiled_before
        logging.info("evaluation compiled %d XLA programs", result["compilations"])
        analysis = report.prototype_analysis(weights)
        # Fig. 5 groups classes by pixel frequency; the evaluated split's own label counts
        # stand in for the training counts (they come free with the confusion matrix).
        groups = report.f1_by_frequency_groups(
            np.asarray(result["F1"]),
            np.asarray(result["label_area"]),
            num_groups=e.frequency_groups,
            class_names=self.source.class_names,
        )
        if out_dir is not None and jax.process_index() == 0:
            os.makedirs(out_dir, exist_ok=True)
            result["figures"] |= self._draw_figures(
                out_dir, weights, analysis, groups, compare_weights, compare_name
            )
            report.write_report(
                os.path.join(out_dir, "report.json"),
                result,
                self.source.class_names,
                extra={
                    "prototype_analysis": analysis,
                    "f1_by_frequency_groups": groups,
                    "frequency_groups_counted_on": c.data.eval_split,
                    **(extra or {}),
                },
            )
            print(metrics.format_class_table(result, self.source.class_names))
        return result | {"prototype_analysis": analysis, "f1_by_frequency_groups": groups}

    def _draw_figures(
        self, out_dir, weights, analysis, groups, compare_weights, compare_name
    ) -> dict[str, np.ndarray]:
        """Fig. 6 (and its pair with ``compare_weights``) and Fig. 5 as PNGs in ``out_dir``;
        returns them as ``{file name without .png: (H, W, 3) uint8}``."""
        names = self.source.class_names
        model = _CLASSIFIER_TITLES.get(self.config.model.classifier, self.config.model.classifier)
        cos = report.cosine_similarity_matrix(weights)
        out = {
            "prototype_cosine": figures.cosine_heatmap(
                cos,
                names,
                title=f"Cosine similarity of the {model} classifier's class weights",
                class_separability=analysis["class_separability"],
                path=os.path.join(out_dir, "prototype_cosine.png"),
            ),
            "f1_by_frequency": figures.f1_by_frequency(
                {model: groups},
                title=f"Mean F1 by class frequency on {self.config.data.eval_split} (Fig. 5)",
                path=os.path.join(out_dir, "f1_by_frequency.png"),
            ),
        }
        if compare_weights is not None:
            out["prototype_cosine_pair"] = figures.cosine_heatmap_pair(
                report.cosine_similarity_matrix(compare_weights),
                cos,
                names,
                titles=(compare_name, model),
                path=os.path.join(out_dir, "prototype_cosine_pair.png"),
            )
        return out


def evaluate_checkpoint(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    step: int | None = None,
    weights: str | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluates the workdir's checkpoint ``step`` (default latest), or ``weights`` if given."""
    from cbp_jax import checkpointing, trainer  # the run's factories (trainer imports us)

    sharding.initialize_distributed(**config.distributed)
    compilation.enable_persistent_cache(
        compilation.cache_dir(config.get("compilation_cache", ""), workdir)
    )
    mesh = trainer.mesh_from_config(config)
    with jax.set_mesh(mesh):
        setup = trainer.Setup(config, mesh)
        state = setup.init_state()
        if weights:
            state = setup.load_pretrained(state, weights, config.get("trust_pickle"))
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
        source = trainer.source_from_config(config, config.data.eval_split)
        evaluator = Evaluator(config, mesh, setup.state_shardings, source)
        model = trainer.model_summary(config, setup)
        print(trainer.describe_model(model))
        return evaluator(state, out_dir=out_dir, extra={"evaluated": label, "model": model})
