"""Figures: the cosine heatmap (Fig. 6), F1 by frequency (Fig. 5), panels, and the
Evaluator writing them and returning them as images."""

import json
import os

import jax
import numpy as np
import pytest
from config_helpers import load_config
from PIL import Image

from cbp_jax import eval_lib, factories, figures, report


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def colour(v: float) -> np.ndarray:
    """The uint8 RGB the heatmap's colour map gives cosine ``v``."""
    from matplotlib import colormaps

    rgba = colormaps[figures.COSINE_CMAP]((v + 1.0) / 2.0)
    return np.rint(np.asarray(rgba[:3]) * 255).astype(np.int64)


def colour_counts(img: np.ndarray) -> dict[tuple[int, ...], int]:
    rgb = img.reshape(-1, 3).astype(np.int64)
    codes, counts = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2], return_counts=True)
    pairs = zip(codes.tolist(), counts.tolist(), strict=True)
    return {(c >> 16, c >> 8 & 255, c & 255): n for c, n in pairs}


def dominant_colour(img: np.ndarray) -> np.ndarray:
    """The most frequent colour other than the white background."""
    counts = colour_counts(img)
    counts.pop((255, 255, 255), None)
    return np.asarray(max(counts, key=counts.get))


def has_colour(img: np.ndarray, rgb: np.ndarray) -> bool:
    return bool(np.any(np.all(np.abs(img.astype(np.int64) - rgb) <= 1, axis=-1)))


@pytest.fixture
def captured(monkeypatch):
    """The matplotlib Figures the drawing functions build (still rendered as usual)."""
    figs = []
    render = figures._render

    def capture(fig, path):
        figs.append(fig)
        return render(fig, path)

    monkeypatch.setattr(figures, "_render", capture)
    return figs


def test_tick_labels_names_or_every_kth_index():
    names = [f"class{i}" for i in range(12)]
    assert figures.tick_labels(names) == (list(range(12)), names)
    pos, labels = figures.tick_labels([f"c{i}" for i in range(150)])
    assert pos == list(range(0, 150, 4)) and labels == [str(i) for i in pos]
    assert len(labels) <= figures.MAX_TICK_LABELS


@pytest.mark.parametrize("v", [1.0, 0.5, -1.0])
def test_cosine_heatmap_colour_scale_fixed_to_plus_minus_one(v):
    img = figures.cosine_heatmap(np.full((3, 3), v), ["a", "b", "c"])
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    np.testing.assert_allclose(dominant_colour(img), colour(v), atol=1)
    # The colour bar spans [-1, 1] whatever the data: its ends are drawn too.
    assert has_colour(img, colour(1.0)) and has_colour(img, colour(-1.0))
    if v != 1.0:  # a constant matrix is not stretched to the top of the scale
        assert colour_counts(img).get(tuple(colour(1.0)), 0) < 0.02 * img.shape[0] * img.shape[1]


def test_cosine_heatmap_labels_title_and_png(tmp_path, captured):
    w = np.eye(4, 8)
    w[3] = w[0] + w[1]  # |cos| 0.707 with rows 0 and 1
    cos = report.cosine_similarity_matrix(w)
    path = str(tmp_path / "sub" / "heat.png")
    img = figures.cosine_heatmap(
        cos, ["sky", "road", "car", "tree"], class_separability=1.41, path=path
    )
    np.testing.assert_array_equal(read_png(path), img)
    ax, bar = captured[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["sky", "road", "car", "tree"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["sky", "road", "car", "tree"]
    assert "max off-diagonal |cos| = 0.707" in ax.get_title()
    assert "class separability (Eq. 8) = 1.41" in ax.get_title()
    assert ax.images[0].get_clim() == (-1.0, 1.0) and bar.get_ylim() == (-1.0, 1.0)
    with pytest.raises(ValueError, match="got 3 class names for 4 classes"):
        figures.cosine_heatmap(cos, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(N, N\)"):
        figures.cosine_heatmap(np.zeros((3, 4)))


def test_cosine_heatmap_pair_one_colour_bar(captured):
    learned = report.cosine_similarity_matrix(np.random.default_rng(0).normal(size=(5, 8)))
    cbp = np.eye(5)
    img = figures.cosine_heatmap_pair(learned, cbp, list("abcde"))
    assert img.dtype == np.uint8 and img.shape[1] > img.shape[0]
    a, b, bar = captured[0].axes
    assert a.get_title().startswith("learned") and b.get_title().startswith("CBP")
    assert "max off-diagonal |cos| = 0.000" in b.get_title()
    assert [t.get_text() for t in b.get_xticklabels()] == list("abcde")
    assert a.images[0].get_clim() == b.images[0].get_clim() == (-1.0, 1.0)
    with pytest.raises(ValueError, match="same classes"):
        figures.cosine_heatmap_pair(learned, np.eye(4))


def test_f1_by_frequency_bars_per_model(tmp_path, captured):
    f1 = np.array([10.0, 20.0, 30.0, 40.0, np.nan, 60.0])
    counts = np.array([1, 2, 3, 4, 5, 6]) * 1000
    learned = report.f1_by_frequency_groups(f1, counts)
    cbp = report.f1_by_frequency_groups(f1 + 5, counts)
    path = str(tmp_path / "f1.png")
    img = figures.f1_by_frequency({"learned": learned, "CBP + OCCL": cbp}, path=path)
    np.testing.assert_array_equal(read_png(path), img)
    assert img.std() > 0
    ax = captured[0].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["learned", "CBP + OCCL"]
    bars = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(bars, [15.0, 35.0, 60.0, 20.0, 40.0, 65.0])
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert [t.split("\n")[0] for t in ticks] == ["rare", "common", "frequent"]
    assert ticks[0].endswith("1k-2k px")
    with pytest.raises(ValueError, match="'b' has groups"):
        figures.f1_by_frequency(
            {"a": learned, "b": report.f1_by_frequency_groups(f1, counts, num_groups=2)}
        )


def test_panel_layers_at_label_resolution():
    rng = np.random.default_rng(1)
    palette = report.default_palette(4)
    label = rng.integers(0, 4, size=(30, 40))
    label[:3] = 255
    pred = rng.integers(0, 4, size=(30, 40))
    pred[-2:] = 255
    image = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)  # a tiny test-scale input
    layers = figures.panel_layers(image, label, pred, palette)
    assert list(layers) == ["image", "ground truth", "prediction", "overlay"]
    assert all(v.shape == (30, 40, 3) and v.dtype == np.uint8 for v in layers.values())
    np.testing.assert_array_equal(layers["ground truth"], figures.colorize(label, palette))
    np.testing.assert_array_equal(layers["prediction"], figures.colorize(pred, palette))
    np.testing.assert_array_equal(layers["overlay"][-2:], layers["image"][-2:])  # ignored
    blend = (layers["image"][:5].astype(float) + layers["prediction"][:5]) / 2
    np.testing.assert_allclose(layers["overlay"][:5], blend, atol=0.51)

    # Large labels are shown at most max_side, keeping the aspect; labels stay crisp.
    big = np.kron(label, np.ones((20, 20), np.int64))  # (600, 800) of 20x20 blocks
    layers = figures.panel_layers(image, big, big, palette, max_side=400)
    assert layers["ground truth"].shape == (300, 400, 3)
    np.testing.assert_array_equal(
        layers["ground truth"], figures.colorize(np.kron(label, np.ones((10, 10), int)), palette)
    )
    with pytest.raises(ValueError, match="one size"):
        figures.panel_layers(image, label, pred[:-1], palette)


def test_legend_classes_present_most_pixels_first():
    label = np.array([[2, 2, 2, 255], [0, 0, 255, 255]])
    pred = np.array([[2, 0, 0, 0], [0, 5, 5, 9]])  # 9 is out of range for 6 classes
    assert figures.legend_classes(label, pred, 6) == [0, 2, 5]


def test_panel_legend_names_and_title(tmp_path, captured):
    names = ["sky", "road", "car", "tree", "person"]
    palette = report.default_palette(5)
    label = np.zeros((24, 32), np.int64)
    label[10:] = 1
    label[0, 0] = 255
    pred = label.copy()
    pred[12:20, 4:10] = 4
    path = str(tmp_path / "panels" / "p.png")
    img = figures.panel(np.zeros((12, 16, 3), np.uint8), label, pred, palette, names,
                        title="img_001", path=path)  # fmt: skip
    np.testing.assert_array_equal(read_png(path), img)
    fig = captured[0]
    assert [ax.get_title() for ax in fig.axes] == [
        "image", "ground truth", "prediction", "overlay (prediction)"
    ]  # fmt: skip
    assert all(ax.images[0].get_array().shape[:2] == (24, 32) for ax in fig.axes)
    assert fig.get_suptitle() == "img_001"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["road", "sky", "person", "ignored"]


@pytest.mark.slow
def test_evaluator_writes_figures(tmp_path):
    """Smoke scenes on the 8-device mesh: the PNGs in out_dir are the returned images."""
    config = load_config("scenes_mit_b0", "smoke")
    config.data.update(scenes_num_images=2, num_workers=0)
    config.eval.update(max_images=2, num_panels=1, frequency_groups=2)
    mesh = factories.mesh_from_config(config)
    with jax.set_mesh(mesh):
        setup = factories.TrainSetup(config, mesh)
        state = setup.init_state()
    source = factories.source_from_config(config, config.data.eval_split)
    evaluator = eval_lib.Evaluator(config, mesh, setup.state_shardings, source)
    learned = np.random.default_rng(0).normal(size=(source.num_classes, 16))
    out = tmp_path / "eval"
    result = evaluator(state, out_dir=str(out), progress=False, compare_weights=learned)
    names = ["panels/panel_0000", "prototype_cosine", "f1_by_frequency", "prototype_cosine_pair"]
    assert sorted(result["figures"]) == sorted(names)
    for name in names:
        img = result["figures"][name]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.std() > 0
        np.testing.assert_array_equal(read_png(os.path.join(out, f"{name}.png")), img)
    assert json.load(open(out / "report.json"))["summary"]["num_images"] == 2
    assert evaluator(state, progress=False)["figures"] == {}  # no out_dir: nothing drawn
