"""Reports and the paper's analyses: the JSON report, the prototype cosine matrix (Fig. 6),
class separability (Eq. 8), F1 by class-frequency groups (Fig. 5), and
:func:`write_evaluation`, which writes an evaluation's report and figures.

Host-side NumPy; nothing here runs on the mesh. ``cbp_jax.figures`` draws the figures.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbp_jax import figures, storage
from cbp_jax import prototypes as prototypes_lib
from cbp_jax.data.transforms import MEAN, STD
from cbp_jax.metrics import class_names_or_indices, nanmean, valid_label_mask


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_report(
    path: str,
    metrics: dict[str, Any],
    class_names: Sequence[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the metrics as JSON (NaN as null) and returns the written dict.

    Layout: ``summary`` (aAcc, mIoU, mAcc, mF1, num_images), ``per_class`` (name, IoU, Acc,
    Precision, F1, label and prediction pixels), ``confusion_matrix`` and ``extra`` (e.g.
    config, checkpoint step, ``prototype_analysis``, ``f1_by_frequency_groups``).
    """
    n = len(metrics["IoU"])
    names = class_names_or_indices(class_names, n)
    report = {
        "summary": {
            k: metrics[k] for k in ("aAcc", "mIoU", "mAcc", "mF1", "num_images") if k in metrics
        },
        "per_class": [
            {
                "class": names[i],
                "IoU": metrics["IoU"][i],
                "Acc": metrics["Acc"][i],
                "Precision": metrics["Precision"][i],
                "F1": metrics["F1"][i],
                "label_pixels": metrics["label_area"][i],
                "pred_pixels": metrics["pred_area"][i],
            }
            for i in range(n)
        ],
        "confusion_matrix": metrics.get("confusion_matrix"),
        "extra": extra or {},
    }
    report = _jsonable(report)
    storage.write_text(path, json.dumps(report, indent=1, allow_nan=False))
    return report


def default_palette(num_classes: int) -> np.ndarray:
    """(N, 3) uint8 PASCAL-VOC-style bit-interleaved colours for classes 0..N-1 (VOC index
    i + 1, so no class is black; black marks ignored pixels)."""
    pal = np.zeros((num_classes, 3), np.uint8)
    for i in range(num_classes):
        c, r, g, b = i + 1, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def denormalize(
    image: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD
) -> np.ndarray:
    """(H, W, 3) normalized float -> uint8 RGB."""
    x = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def cosine_similarity_matrix(prototypes: jax.Array | np.ndarray) -> np.ndarray:
    """(N, C) -> (N, N) float32 cosine similarities of the rows (``prototypes.cosine_matrix``)."""
    w = np.asarray(prototypes, np.float32)
    if np.any(np.linalg.norm(w, axis=1) == 0):
        raise ValueError("a prototype row has zero norm; cosine similarity is undefined.")
    return np.asarray(prototypes_lib.cosine_matrix(jnp.asarray(w)))


def prototype_analysis(prototypes: jax.Array | np.ndarray) -> dict[str, float]:
    """Class separability (Eq. 8, ``cbp_jax.prototypes.class_separability``; 0 for CBP) and
    the largest off-diagonal |cos| and the row-norm range of an (N, C) classifier."""
    w = jnp.asarray(prototypes, jnp.float32)
    norms = np.linalg.norm(np.asarray(prototypes, np.float64), axis=1)
    return {
        "class_separability": float(prototypes_lib.class_separability(w)),
        "max_abs_cos": float(prototypes_lib.max_abs_cosine(w)),
        "norm_min": float(norms.min()),
        "norm_max": float(norms.max()),
    }


def class_pixel_counts(
    labels: Iterable[np.ndarray], num_classes: int, ignore_index: int = 255
) -> np.ndarray:
    """(N,) int64 labelled-pixel count per class over an iterable of label maps (for the
    training-set frequencies of Fig. 5)."""
    counts = np.zeros(num_classes, np.int64)
    for lab in labels:
        lab = np.asarray(lab).reshape(-1)
        lab = lab[valid_label_mask(lab, num_classes, ignore_index)]
        counts += np.bincount(lab, minlength=num_classes)[:num_classes]
    return counts


def f1_by_frequency_groups(
    f1: np.ndarray,
    pixel_counts: np.ndarray,
    *,
    num_groups: int = 3,
    group_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Fig. 5: per-class F1 averaged within groups of classes sorted by training frequency.

    Classes are sorted by ascending training pixel count (rarest first; ties keep class order)
    and split into ``num_groups`` groups of equal size (``np.array_split``: the first groups
    take one more class when N does not divide). The paper uses 15 groups of 10 on ADE20K.

    Args:
      f1: (N,) per-class F1 (NaN for classes with no pixels are left out of the means).
      pixel_counts: (N,) training pixel count per class.
      num_groups: how many groups.
      group_names: one name per group; default ``("rare", "common", "frequent")`` for 3
        groups, else ``"group_i"``.
      class_names: optional names listed in each group.

    Returns:
      One dict per group, rarest first: ``name``, ``classes`` (indices), ``class_names``,
      ``min_pixels``, ``max_pixels``, ``mean_f1`` (NaN-ignoring).
    """
    f1 = np.asarray(f1, np.float64)
    counts = np.asarray(pixel_counts, np.int64)
    if f1.shape != counts.shape or f1.ndim != 1:
        raise ValueError(f"f1 {f1.shape} and pixel_counts {counts.shape} must both be (N,).")
    if not 1 <= num_groups <= len(f1):
        raise ValueError(f"num_groups must be in [1, {len(f1)}], got {num_groups}.")
    if group_names is None:
        if num_groups == 3:
            group_names = ("rare", "common", "frequent")
        else:
            group_names = [f"group_{i}" for i in range(num_groups)]
    if len(group_names) != num_groups:
        raise ValueError(f"got {len(group_names)} group names for {num_groups} groups.")
    names = class_names_or_indices(class_names, len(f1))
    order = np.argsort(counts, kind="stable")
    groups = []
    for name, idx in zip(group_names, np.array_split(order, num_groups), strict=True):
        groups.append(
            {
                "name": name,
                "classes": idx.tolist(),
                "class_names": [names[i] for i in idx],
                "min_pixels": int(counts[idx].min()),
                "max_pixels": int(counts[idx].max()),
                "mean_f1": nanmean(f1[idx]),
            }
        )
    return groups


def write_evaluation(
    out_dir: str,
    result: dict[str, Any],
    *,
    class_names: Sequence[str],
    model_title: str,
    eval_split: str,
    compare_weights: np.ndarray | None = None,
    compare_name: str = "learned",
    extra: dict[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Writes an evaluation to ``out_dir``: ``report.json``, ``prototype_cosine.png``
    (Fig. 6; with ``compare_weights`` also ``prototype_cosine_pair.png``) and
    ``f1_by_frequency.png`` (Fig. 5).

    Args:
      result: the evaluation's metrics with ``class_weights`` (N, C), ``prototype_analysis``
        and ``f1_by_frequency_groups`` (``eval_lib.Evaluator`` returns them).
      class_names: N names.
      model_title: the classifier's name in the titles (e.g. "CBP").
      eval_split: the evaluated split, named in Fig. 5's title and the report.
      compare_weights: (N, C) rows of another classifier of the same classes (e.g. a learned
        baseline's), drawn beside this one.
      compare_name: the title of ``compare_weights``' heatmap.
      extra: more entries for the report's ``extra``.

    Returns:
      The figures as ``{file name without .png: (H, W, 3) uint8}``.
    """
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    analysis, groups = result["prototype_analysis"], result["f1_by_frequency_groups"]
    cos = cosine_similarity_matrix(result["class_weights"])
    drawn = {
        "prototype_cosine": figures.cosine_heatmap(
            cos,
            class_names,
            title=f"Cosine similarity of the {model_title} classifier's class weights",
            class_separability=analysis["class_separability"],
            path=out / "prototype_cosine.png",
        ),
        "f1_by_frequency": figures.f1_by_frequency(
            {model_title: groups},
            title=f"Mean F1 by class frequency on {eval_split} (Fig. 5)",
            path=out / "f1_by_frequency.png",
        ),
    }
    if compare_weights is not None:
        drawn["prototype_cosine_pair"] = figures.cosine_heatmap_pair(
            cosine_similarity_matrix(compare_weights),
            cos,
            class_names,
            titles=(compare_name, model_title),
            path=out / "prototype_cosine_pair.png",
        )
    write_report(
        out / "report.json",
        result,
        class_names,
        extra={
            "prototype_analysis": analysis,
            "f1_by_frequency_groups": groups,
            "frequency_groups_counted_on": eval_split,
            **(extra or {}),
        },
    )
    return drawn
