"""Figures people can read: the prototype cosine heatmap (Fig. 6), F1 by class frequency
(Fig. 5) and image | ground truth | prediction | overlay panels.

Each drawing function takes NumPy arrays, returns the figure as an (H, W, 3) uint8 RGB image
(e.g. for TensorBoard) and writes it as a PNG when given a path. Matplotlib draws through its
Agg canvas directly (no pyplot, no global backend) and is imported on first use only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from cbp_jax import storage
from cbp_jax.metrics import class_names_or_indices, valid_label_mask

DPI = 100
COSINE_CMAP = "RdBu_r"  # blue -1, white 0, red +1
MAX_TICK_LABELS = 40  # class-name ticks up to this many classes, else every k-th index
MAX_LEGEND_ENTRIES = 24


# ----------------------------------------------------------------------------- rendering


def colorize(label: np.ndarray, palette: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """(H, W) class map -> (H, W, 3) uint8; ignored and out-of-range pixels are black."""
    label = np.asarray(label)
    valid = valid_label_mask(label, len(palette), ignore_index)
    out = np.zeros((*label.shape, 3), np.uint8)
    out[valid] = palette[label[valid]]
    return out


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _render(fig, path: str | None) -> np.ndarray:
    """Draws ``fig`` to (H, W, 3) uint8 and writes those pixels to ``path`` when given."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.array(canvas.buffer_rgba())[..., :3]
    if path is not None:
        file = storage.path(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        with file.open("wb") as f:
            Image.fromarray(rgb).save(f, format="PNG")
    return rgb


# ----------------------------------------------------------------------------- Fig. 6


def tick_labels(
    class_names: Sequence[str], max_labels: int = MAX_TICK_LABELS
) -> tuple[list[int], list[str]]:
    """Tick positions and labels for an N-class axis: every class by name when N <=
    ``max_labels``, else every k-th class by index (k = ceil(N / max_labels))."""
    n = len(class_names)
    if n <= max_labels:
        return list(range(n)), [str(s) for s in class_names]
    idx = list(range(0, n, math.ceil(n / max_labels)))
    return idx, [str(i) for i in idx]


def _check_cosine(cos: np.ndarray, name: str = "cos") -> np.ndarray:
    cos = np.asarray(cos, np.float64)
    if cos.ndim != 2 or cos.shape[0] != cos.shape[1]:
        raise ValueError(f"{name} must be an (N, N) cosine matrix, got shape {cos.shape}.")
    return cos


def max_off_diagonal(cos: np.ndarray) -> float:
    """The largest |cos| between two different classes of an (N, N) cosine matrix."""
    cos = _check_cosine(cos)
    if len(cos) < 2:
        return 0.0
    return float(np.abs(cos[~np.eye(len(cos), dtype=bool)]).max())


def _heatmap_side(n: int) -> float:
    """Inches per heatmap: room for up to ``MAX_TICK_LABELS`` name ticks, capped at 8."""
    return float(np.clip(2.5 + 0.15 * min(n, MAX_TICK_LABELS), 4.5, 8.0))


def _draw_heatmap(ax, cos: np.ndarray, names: Sequence[str], title: str):
    """One cosine matrix on ``ax`` with a fixed [-1, 1] scale; returns the image artist."""
    im = ax.imshow(cos, cmap=COSINE_CMAP, vmin=-1.0, vmax=1.0, interpolation="nearest")
    pos, labels = tick_labels(names)
    fontsize = 7 if len(labels) <= 20 else 5.5
    ax.set_xticks(pos, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(pos, labels, fontsize=fontsize)
    if len(names) > MAX_TICK_LABELS:
        ax.set_xlabel("class index (names in report.json)")
    ax.set_title(title, fontsize=9)
    return im


def _heatmap_title(title: str, cos: np.ndarray, class_separability: float | None) -> str:
    stats = f"max off-diagonal |cos| = {max_off_diagonal(cos):.3f}"
    if class_separability is not None:
        stats += f", class separability (Eq. 8) = {class_separability:.3g}"
    return f"{title}\n{stats}"


def cosine_heatmap(
    cos: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    title: str = "Cosine similarity of the class prototypes",
    class_separability: float | None = None,
    path: str | None = None,
) -> np.ndarray:
    """Fig. 6: the (N, N) cosine matrix of the classifier rows as a labelled heatmap.

    Diverging colours fixed to [-1, 1] (blue, white, red) with a colour bar; class-name ticks
    when N <= 40, else every k-th index; the title adds the largest off-diagonal |cos| and,
    when given, the class separability.

    Args:
      cos: (N, N) cosine similarities (``report.cosine_similarity_matrix``).
      class_names: N names; indices when None.
      title: the first title line.
      class_separability: Eq. 8 of the full classifier (``report.prototype_analysis``).
      path: the PNG to write, if any.

    Returns:
      The figure as (H, W, 3) uint8 RGB.
    """
    cos = _check_cosine(cos)
    names = class_names_or_indices(class_names, len(cos))
    side = _heatmap_side(len(cos))
    fig = _figure(side + 1.2, side + 0.6)
    ax = fig.add_subplot()
    im = _draw_heatmap(ax, cos, names, _heatmap_title(title, cos, class_separability))
    fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
    return _render(fig, path)


def cosine_heatmap_pair(
    cos_a: np.ndarray,
    cos_b: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    titles: tuple[str, str] = ("learned", "CBP"),
    path: str | None = None,
) -> np.ndarray:
    """Fig. 6 (a) | (b): two (N, N) cosine matrices side by side with one colour bar.

    Args:
      cos_a, cos_b: (N, N) cosine matrices of the same N classes, e.g. a learned classifier's
        and CBP's.
      class_names: N names; indices when None.
      titles: one title per matrix; each gets its largest off-diagonal |cos| added.
      path: the PNG to write, if any.

    Returns:
      The figure as (H, W, 3) uint8 RGB.
    """
    cos_a, cos_b = _check_cosine(cos_a, "cos_a"), _check_cosine(cos_b, "cos_b")
    if cos_a.shape != cos_b.shape:
        raise ValueError(
            f"cos_a {cos_a.shape} and cos_b {cos_b.shape} must cover the same classes."
        )
    names = class_names_or_indices(class_names, len(cos_a))
    side = _heatmap_side(len(cos_a))
    fig = _figure(2 * side + 1.2, side + 0.6)
    axes = fig.subplots(1, 2)
    for ax, cos, title in zip(axes, (cos_a, cos_b), titles, strict=True):
        im = _draw_heatmap(ax, cos, names, _heatmap_title(title, cos, None))
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="cosine similarity")
    return _render(fig, path)


# ----------------------------------------------------------------------------- Fig. 5


def _compact(n: int) -> str:
    """1234567 -> '1.2M'."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def f1_by_frequency(
    series: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    title: str = "Mean F1 by class frequency (Fig. 5)",
    path: str | None = None,
) -> np.ndarray:
    """Fig. 5: grouped bars of the mean F1 of each class-frequency group, one bar per model.

    Args:
      series: model name -> its ``report.f1_by_frequency_groups`` output (rarest group
        first), e.g. ``{"learned": groups_a, "CBP + OCCL": groups_b}``; every model must use
        the same groups.
      title: the plot title.
      path: the PNG to write, if any.

    Returns:
      The figure as (H, W, 3) uint8 RGB.
    """
    if not series:
        raise ValueError("f1_by_frequency needs at least one model's groups in `series`.")
    models = list(series)
    groups = series[models[0]]
    names = [g["name"] for g in groups]
    for m in models[1:]:
        if [g["name"] for g in series[m]] != names:
            raise ValueError(
                f"series {m!r} has groups {[g['name'] for g in series[m]]}, but "
                f"{models[0]!r} has {names}; group both with the same num_groups."
            )
    n = len(names)
    fig = _figure(float(np.clip(2.0 + 0.55 * n * math.sqrt(len(models)), 6.0, 16.0)), 4.5)
    ax = fig.add_subplot()
    x = np.arange(n)
    width = 0.8 / len(models)
    for k, m in enumerate(models):
        f1 = np.array([g["mean_f1"] for g in series[m]], np.float64)
        bars = ax.bar(x + (k - (len(models) - 1) / 2) * width, np.nan_to_num(f1), width, label=m)
        ax.bar_label(
            bars, [f"{v:.1f}" if np.isfinite(v) else "n/a" for v in f1], fontsize=7, padding=1
        )
    ax.set_xticks(
        x,
        [
            f"{g['name']}\n{len(g['classes'])} cl.\n"
            f"{_compact(g['min_pixels'])}-{_compact(g['max_pixels'])} px"
            for g in groups
        ],
        fontsize=7 if n <= 8 else 6,
    )
    ax.set_xlabel("class groups, rarest first (labelled pixels per class)")
    ax.set_ylabel("mean F1 (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _render(fig, path)


# ----------------------------------------------------------------------------- panels


def _nearest(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) -> ``hw`` by nearest-neighbour sampling at pixel centres."""
    h, w = label.shape
    rows = np.minimum((np.arange(hw[0]) + 0.5) * h / hw[0], h - 1).astype(np.int64)
    cols = np.minimum((np.arange(hw[1]) + 0.5) * w / hw[1], w - 1).astype(np.int64)
    return label[np.ix_(rows, cols)]


def panel_size(label_hw: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The (h, w) every panel layer is shown at: the label's size, scaled down (keeping the
    aspect) so the longer side is at most ``max_side``."""
    h, w = label_hw
    s = min(1.0, max_side / max(h, w))
    return max(1, round(h * s)), max(1, round(w * s))


def panel_layers(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    palette: np.ndarray,
    *,
    ignore_index: int = 255,
    max_side: int = 512,
    alpha: float = 0.5,
) -> dict[str, np.ndarray]:
    """The four (h, w, 3) uint8 layers of a panel, all at ``panel_size(label.shape)``.

    The image (any size, e.g. the small test-scale input) is resized bilinearly; labels and
    predictions by nearest neighbour. The overlay blends the prediction's colours over the
    image (``alpha``); ignored pixels are black in the maps and plain image in the overlay.

    Args:
      image: (H', W', 3) uint8 RGB.
      label, pred: (H, W) int class maps.
      palette: (N, 3) uint8 class colours.

    Returns:
      ``{"image", "ground truth", "prediction", "overlay"}``.
    """
    image, label, pred = np.asarray(image), np.asarray(label), np.asarray(pred)
    if label.ndim != 2 or pred.shape != label.shape:
        raise ValueError(
            f"label and pred must be (H, W) maps of one size, got {label.shape} and {pred.shape}."
        )
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}.")
    hw = panel_size(label.shape, max_side)
    img = Image.fromarray(np.asarray(image, np.uint8))
    if img.size != (hw[1], hw[0]):
        img = img.resize((hw[1], hw[0]), Image.BILINEAR)
    img = np.asarray(img)
    label, pred = _nearest(label, hw), _nearest(pred, hw)
    pred_rgb = colorize(pred, palette, ignore_index)
    shown = valid_label_mask(pred, len(palette), ignore_index)[..., None]
    blend = np.rint((1 - alpha) * img + alpha * pred_rgb.astype(np.float64)).astype(np.uint8)
    return {
        "image": img,
        "ground truth": colorize(label, palette, ignore_index),
        "prediction": pred_rgb,
        "overlay": np.where(shown, blend, img),
    }


def legend_classes(
    label: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255
) -> list[int]:
    """The classes present in ``label`` or ``pred`` (any shapes), most pixels first."""
    counts = np.zeros(num_classes, np.int64)
    for m in (np.asarray(label).reshape(-1), np.asarray(pred).reshape(-1)):
        counts += np.bincount(
            m[valid_label_mask(m, num_classes, ignore_index)], minlength=num_classes
        )
    present = np.flatnonzero(counts)
    return present[np.argsort(-counts[present], kind="stable")].tolist()


def panel(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    palette: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    title: str | None = None,
    ignore_index: int = 255,
    max_side: int = 512,
    path: str | None = None,
) -> np.ndarray:
    """Image | ground truth | prediction | overlay, titled, at the label's resolution, with a
    legend of the classes present in the label or the prediction (``panel_layers``).

    Args:
      image: (H', W', 3) uint8 RGB at any size.
      label, pred: (H, W) int class maps.
      palette: (N, 3) uint8 class colours.
      class_names: N names; indices when None.
      title: the figure title, e.g. the image name.
      ignore_index: the label value drawn black and listed as "ignored".
      max_side: the longest side the layers are shown at.
      path: the PNG to write, if any.

    Returns:
      The figure as (H, W, 3) uint8 RGB.
    """
    from matplotlib.patches import Patch

    palette = np.asarray(palette, np.uint8)
    names = class_names_or_indices(class_names, len(palette))
    layers = panel_layers(image, label, pred, palette, ignore_index=ignore_index, max_side=max_side)
    h, w = next(iter(layers.values())).shape[:2]
    ax_w = float(np.clip(w / DPI, 2.5, 4.0))  # about one inch per 100 shown pixels
    ax_h = ax_w * h / w
    present = legend_classes(label, pred, len(palette), ignore_index)
    shown = present[:MAX_LEGEND_ENTRIES]
    handles = [Patch(facecolor=palette[c] / 255.0, edgecolor="0.5", label=names[c]) for c in shown]
    if len(present) > len(shown):
        handles.append(Patch(color="none", label=f"+{len(present) - len(shown)} more"))
    if np.any(np.asarray(label) == ignore_index):
        handles.append(Patch(facecolor="black", edgecolor="0.5", label="ignored"))
    ncol = min(len(handles), 8) or 1
    legend_h = 0.2 * math.ceil(len(handles) / ncol) + 0.15 if handles else 0.0
    fig = _figure(4 * ax_w + 0.3, ax_h + legend_h + (0.6 if title else 0.3))
    for ax, (name, layer) in zip(fig.subplots(1, 4), layers.items(), strict=True):
        ax.imshow(layer, interpolation="nearest" if name != "image" else "antialiased")
        ax.set_title(name if name != "overlay" else "overlay (prediction)", fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=7)
    return _render(fig, path)
