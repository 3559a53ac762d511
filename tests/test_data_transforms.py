"""mmseg train/test transforms: sizes, label values, padding, flips, crops, colour."""

import colorsys
import pickle

import numpy as np
import pytest

from cbp_jax import data
from cbp_jax.data import transforms as T

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _example(rng, hw, values=(0, 3, 7, 255)):
    grid = rng.choice(values, size=(6, 6)).astype(np.uint8)
    label = np.kron(grid, np.ones((hw[0] // 6 + 1, hw[1] // 6 + 1), np.uint8))[: hw[0], : hw[1]]
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    return {"image": image, "label": label, "name": "x"}


def test_rescale_size_matches_mmcv_examples():
    # f = min(long_bound / long, short_bound / short); size = int(x * f + 0.5).
    assert T.rescale_size((512, 683), (2048, 512)) == (512, 683)
    assert T.rescale_size((375, 500), (2048, 512)) == (512, 683)
    assert T.rescale_size((360, 480), (512, 2048)) == (512, 683)
    assert T.rescale_size((100, 1000), (2048, 512)) == (205, 2048)


@pytest.mark.parametrize("hw", [(37, 53), (120, 90), (300, 200)])
def test_train_output_sizes_and_label_values(hw):
    tt = data.train_transform((64, 48), (128, 64))
    rng = np.random.default_rng(0)
    for seed in range(8):
        ex = _example(rng, hw)
        out = tt(ex, np.random.default_rng(seed))
        assert out["image"].shape == (64, 48, 3) and out["image"].dtype == np.float32
        assert out["label"].shape == (64, 48) and out["label"].dtype == np.uint8
        assert set(np.unique(out["label"])) <= set(np.unique(ex["label"])) | {255}


def test_padding_values():
    ex = _example(np.random.default_rng(1), (30, 40), values=(1, 2))
    # ratio 1 and base (40, 30): the image keeps 30x40, smaller than the 64x64 crop.
    tt = data.train_transform((64, 64), (40, 30), ratio_range=(1.0, 1.0), flip_prob=1.0)
    out = tt(ex, np.random.default_rng(0))
    assert np.all(out["image"][30:] == 0) and np.all(out["image"][:, 40:] == 0)
    assert np.all(out["label"][30:] == 255) and np.all(out["label"][:, 40:] == 255)
    np.testing.assert_array_equal(out["label"][:30, :40], ex["label"][:, ::-1])


@pytest.mark.parametrize("flip_prob", [0.0, 1.0])
def test_flip_keeps_image_and_label_aligned(flip_prob):
    rng = np.random.default_rng(2)
    ex = _example(rng, (96, 120), values=(1, 5, 9, 12))
    ex["image"] = np.repeat(ex["label"][..., None] * 20, 3, axis=2).astype(np.uint8)
    tt = data.train_transform(
        (48, 48), (120, 96), flip_prob=flip_prob, photometric=False, cat_max_ratio=1.0, **IDENTITY
    )
    for seed in range(5):
        out = tt(ex, np.random.default_rng(seed))
        agree = np.isclose(out["image"][..., 0], 20.0 * out["label"], atol=1)
        mirrored = np.isclose(out["image"][..., 0], 20.0 * out["label"][:, ::-1], atol=1)
        assert agree.mean() > 0.8 > mirrored.mean()  # boundaries blur under bilinear resize
    if flip_prob == 1.0:  # a 1-pixel column ramp flips with the label
        ramp = {"image": np.tile(np.arange(120, dtype=np.uint8)[None, :, None], (96, 1, 3))}
        ramp["label"] = np.tile(np.arange(120, dtype=np.uint8)[None], (96, 1))
        tt2 = data.train_transform(
            (96, 120), (120, 96), ratio_range=(1, 1), photometric=False, **IDENTITY
        )
        out = tt2(ramp, np.random.default_rng(0))
        np.testing.assert_array_equal(out["label"][0], np.arange(120)[::-1])
        np.testing.assert_array_equal(out["image"][0, :, 0], np.arange(120)[::-1])


def _crop_ok(label, ratio=0.75):
    values, counts = np.unique(label, return_counts=True)
    counts = counts[values != 255]
    return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_cat_max_ratio_redraws_crops():
    label = np.ones((100, 100), np.uint8)
    label[:30, :30] = 2  # only crops near the top-left corner hold enough of class 2
    ex = {"image": np.zeros((100, 100, 3), np.uint8), "label": label}
    kw = dict(ratio_range=(1, 1), flip_prob=0.0, photometric=False)
    ok = {}
    for ratio in (1.0, 0.75):
        tt = data.train_transform((40, 40), (100, 100), cat_max_ratio=ratio, **kw)
        outs = [tt(ex, np.random.default_rng(s))["label"] for s in range(300)]
        ok[ratio] = np.mean([_crop_ok(o) for o in outs])
    # One draw succeeds with p; 11 draws with 1 - (1 - p)^11 (mmseg: first + 10 re-draws).
    p = ok[1.0]
    assert 0.01 < p < 0.3
    assert abs(ok[0.75] - (1 - (1 - p) ** 11)) < 0.12
    # When no crop can satisfy it, the last draw is still returned at full size.
    flat = {"image": ex["image"], "label": np.ones((100, 100), np.uint8)}
    out = data.train_transform((40, 40), (100, 100), **kw)(flat, np.random.default_rng(0))
    assert out["label"].shape == (40, 40)


class _Scripted:
    """A stand-in for np.random.Generator returning scripted draws in order."""

    def __init__(self, draws):
        self.draws = list(draws)

    def integers(self, *args):
        return self.draws.pop(0)

    def uniform(self, *args):
        return self.draws.pop(0)


def test_photometric_steps_against_colorsys():
    red = np.zeros((2, 2, 3), np.uint8)
    red[...] = (255, 0, 0)
    # brightness off, mode 0, saturation off, hue on with shift +18, contrast off.
    out = T.photometric_distortion(red, _Scripted([0, 0, 0, 1, 18, 0]))
    r, g, b = colorsys.hsv_to_rgb(36 / 360, 1.0, 1.0)  # 18 on OpenCV's 0..180 = 36 degrees
    np.testing.assert_allclose(out[0, 0], np.round([255 * r, 255 * g, 255 * b]), atol=1)
    grey = np.full((2, 2, 3), 100, np.uint8)
    # brightness +30.7 (truncated), mode 1 with contrast x2, saturation/hue off.
    out = T.photometric_distortion(grey, _Scripted([1, 30.7, 1, 1, 2.0, 0, 0]))
    np.testing.assert_array_equal(out, np.full((2, 2, 3), 255, np.uint8))  # (130.7*2) clipped
    out = T.photometric_distortion(grey, _Scripted([1, -30.7, 1, 1, 0.5, 0, 0]))
    np.testing.assert_array_equal(out, np.full((2, 2, 3), 34, np.uint8))  # int(69 * 0.5)


def test_normalize_and_determinism():
    ex = _example(np.random.default_rng(3), (80, 100))
    tt = data.train_transform((32, 32), (100, 80))
    a = tt(ex, np.random.default_rng(7))
    b = pickle.loads(pickle.dumps(tt))(ex, np.random.default_rng(7))
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    img = np.full((4, 4, 3), 200, np.uint8)
    np.testing.assert_allclose(
        T.normalize(img)[0, 0], (200 - np.array(T.MEAN)) / np.array(T.STD), rtol=1e-6
    )


def test_test_transform_sizes():
    ex = _example(np.random.default_rng(4), (375, 500))
    out = data.test_transform((2048, 512))(ex)
    assert out["image"].shape == (512, 683, 3)
    np.testing.assert_array_equal(out["label"], ex["label"])  # original size, untouched
    et = data.test_transform((2048, 512), aligned=True)
    out = et(ex)
    assert out["image"].shape == (512, 704, 3) and et.output_size((375, 500)) == (512, 704)
    with pytest.raises(ValueError, match="crop_size"):
        data.train_transform((0, 5), (10, 10))
