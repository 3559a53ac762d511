"""cbp_jax.metrics, inference, report and eval_lib.evaluate against NumPy (and PyTorch)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cbp_jax import eval_lib, inference, metrics, report
from cbp_jax.data import transforms

# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def np_mmseg_metrics(labels_list, preds_list, n, ignore=255):
    """mmseg's intersect_and_union per image, summed, then the 1.x IoUMetric formulas."""
    area_i = np.zeros(n)
    area_p = np.zeros(n)
    area_l = np.zeros(n)
    for lab, pred in zip(labels_list, preds_list, strict=True):
        mask = lab != ignore
        lab, pred = lab[mask], pred[mask]
        inter = pred[pred == lab]
        area_i += np.histogram(inter, bins=n, range=(0, n - 1))[0]
        area_p += np.histogram(pred, bins=n, range=(0, n - 1))[0]
        area_l += np.histogram(lab, bins=n, range=(0, n - 1))[0]
    union = area_p + area_l - area_i
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = area_i / union * 100
        acc = area_i / area_l * 100
        f1 = 2 * area_i / (area_p + area_l) * 100
    return {
        "IoU": iou,
        "Acc": acc,
        "F1": f1,
        "mIoU": np.nanmean(iou),
        "mAcc": np.nanmean(acc),
        "aAcc": area_i.sum() / area_l.sum() * 100,
    }


def np_resize(x, out_hw):
    """PyTorch bilinear align_corners=False, written from its formula. x: (B, H, W, C)."""

    def axis(out, inp):
        src = np.maximum((np.arange(out) + 0.5) * (inp / out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), inp - 1)
        i1 = np.minimum(i0 + 1, inp - 1)
        return i0, i1, src - i0

    x = np.asarray(x, np.float64)
    h0, h1, lh = axis(out_hw[0], x.shape[1])
    w0, w1, lw = axis(out_hw[1], x.shape[2])
    rows = x[:, h0] * (1 - lh)[None, :, None, None] + x[:, h1] * lh[None, :, None, None]
    return rows[:, :, w0] * (1 - lw)[None, None, :, None] + rows[:, :, w1] * lw[None, None, :, None]


def np_slide(fn, img, crop, stride):
    """mmseg EncoderDecoder.slide_inference, transcribed to NumPy, channels last."""
    (hc, wc), (hs, ws) = crop, stride
    b, h, w, _ = img.shape
    h_grids = max(h - hc + hs - 1, 0) // hs + 1
    w_grids = max(w - wc + ws - 1, 0) // ws + 1
    preds, count = None, np.zeros((b, h, w, 1))
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * hs, wi * ws
            y2, x2 = min(y1 + hc, h), min(x1 + wc, w)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
            crop_img = img[:, y1:y2, x1:x2]
            logit = np_resize(fn(crop_img, np), crop_img.shape[1:3])
            if preds is None:
                preds = np.zeros((b, h, w, logit.shape[-1]))
            preds[:, y1:y2, x1:x2] += logit
            count[:, y1:y2, x1:x2] += 1
    assert (count == 0).sum() == 0
    return preds / count


def read_png(path):
    with Image.open(path) as im:
        return np.asarray(im)


N = 5
MIX = np.random.default_rng(0).normal(size=(3, N)).astype(np.float32)


def per_pixel_fn(x, xp=jnp):
    """A per-pixel (flip-equivariant) full-resolution logits function."""
    return xp.tanh(x @ MIX) * 3.0


def quarter_fn(x, xp=jnp):
    """A 1/4-resolution logits function (4x4 mean pool, then per-pixel map)."""
    b, h, w, c = x.shape
    pooled = x.reshape(b, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))
    return xp.tanh(pooled @ MIX) * 3.0


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _random_case(rng, shape, n):
    labels = rng.integers(0, n, size=shape)
    labels[rng.random(shape) < 0.2] = 255
    labels[labels == 2] = 3  # class 2 never labelled: predicted only -> IoU 0, Acc NaN
    preds = np.where(rng.random(shape) < 0.6, labels, rng.integers(0, n, size=shape))
    preds[preds == 255] = 0
    preds[preds == n - 1] = 0  # class n-1 in neither labels nor preds -> NaN everywhere
    labels[labels == n - 1] = 255
    return labels, preds


def test_confusion_and_metrics_match_numpy_mmseg(monkeypatch):
    rng = np.random.default_rng(1)
    n = 7
    batches = [_random_case(rng, (2, 9, 11), n) for _ in range(4)]
    # Force flushes to the host matrix every few updates: exact int64 accumulation.
    monkeypatch.setattr(metrics, "INT32_MAX", 2 * 9 * 11 * 2 + 1)
    acc = metrics.ConfusionAccumulator(n)
    for lab, pred in batches:
        acc.update(jnp.asarray(lab), jnp.asarray(pred))
    conf = acc.result()
    ref_conf = np.zeros((n, n), np.int64)
    for lab, pred in batches:
        m = lab != 255
        np.add.at(ref_conf, (lab[m], pred[m]), 1)
    np.testing.assert_array_equal(conf, ref_conf)

    got = metrics.metrics_from_confusion(conf)
    ref = np_mmseg_metrics(
        [lab for lab, _ in batches], [pred for _, pred in batches], n, ignore=255
    )
    for key in ("IoU", "Acc", "F1"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, equal_nan=True)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12)
    assert got["IoU"][2] == 0.0 and math.isnan(got["Acc"][2])
    assert math.isnan(got["IoU"][n - 1]) and math.isnan(got["F1"][n - 1])
    assert got["mF1"] == pytest.approx(np.nanmean(ref["F1"]), rel=1e-12)


def test_confusion_update_jit_sharded_and_out_of_range():
    rng = np.random.default_rng(2)
    n = 4
    lab = rng.integers(0, n, size=(8, 6, 5))
    pred = rng.integers(0, n, size=(8, 6, 5))
    lab[0, 0, :3] = (255, 9, -1)  # ignored, and two out-of-range values dropped
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    conf = metrics.confusion_matrix_update(
        jnp.zeros((n, n), jnp.int32),
        jax.device_put(lab, sharding),
        jax.device_put(pred, sharding),
        num_classes=n,
    )
    m = (lab >= 0) & (lab < n)
    ref = np.bincount(lab[m] * n + pred[m], minlength=n * n).reshape(n, n)
    np.testing.assert_array_equal(np.asarray(conf), ref)
    # An ignore_index inside [0, N) drops that label's row.
    conf1 = metrics.confusion_matrix_update(
        jnp.zeros((n, n), jnp.int32), lab, pred, num_classes=n, ignore_index=1
    )
    ref[1] = 0
    np.testing.assert_array_equal(np.asarray(conf1), ref)


def test_class_table_lists_every_class():
    m = metrics.metrics_from_confusion(np.array([[3, 1], [0, 0]]))
    table = metrics.format_class_table(m, ["wall", "sky"])
    assert "wall" in table and "sky" in table and "nan" in table
    assert f"{m['mIoU']:.2f}" in table


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((7, 5), (28, 20)), ((7, 5), (13, 17)), ((17, 13), (6, 5))])
def test_resize_bilinear_matches_numpy_reference(src, dst):
    x = np.random.default_rng(3).normal(size=(2, *src, 3)).astype(np.float32)
    got = np.asarray(inference.resize_bilinear(jnp.asarray(x), dst))
    np.testing.assert_allclose(got, np_resize(x, dst), atol=1e-5)


def test_resize_bilinear_matches_opencv_inter_linear():
    import cv2

    x = np.random.default_rng(11).normal(size=(37, 51, 3)).astype(np.float32)
    for dst in ((64, 85), (18, 25)):  # mmseg's test Resize uses cv2 INTER_LINEAR
        ref = cv2.resize(x, dst[::-1], interpolation=cv2.INTER_LINEAR)
        got = np.asarray(inference.resize_bilinear(jnp.asarray(x[None]), dst))[0]
        np.testing.assert_allclose(got, ref, atol=1e-4)


def test_resize_bilinear_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(4).normal(size=(1, 9, 6, 4)).astype(np.float32)
    for dst in ((36, 24), (11, 17), (4, 5)):
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode="bilinear", align_corners=False
        )
        got = np.asarray(inference.resize_bilinear(jnp.asarray(x), dst))
        np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_rescale_and_aligned_sizes():
    # ADE20K-typical 375x500 -> short side 512, then AlignedResize 683 -> 704.
    assert transforms.rescale_size((375, 500), (2048, 512)) == (512, 683)
    assert transforms.rescale_size((375, 500), (512, 2048)) == (512, 683)  # edge order is free
    assert transforms.rescale_size((300, 2000), (2048, 512)) == (307, 2048)  # long edge binds
    assert transforms.aligned_size((512, 683)) == (512, 704)
    assert transforms.aligned_size((513, 640), 32) == (544, 640)
    assert inference.eval_resize_sizes((375, 500), scale=(2048, 512), aligned=True) == [
        (512, 683),
        (512, 704),
    ]
    assert inference.eval_resize_sizes((512, 683), scale=(2048, 512)) == []
    # mmseg 0.x multi-scale: ratio 0.75 of the scale -> (1536, 384) edges.
    assert inference.eval_resize_sizes((512, 683), scale=(2048, 512), ratio=0.75) == [(384, 512)]
    # mmseg 1.x: ratio of the image itself, through _scale_size then imrescale.
    assert inference.eval_resize_sizes((375, 500), ratio=0.5) == [(188, 250)]
    assert inference.eval_resize_sizes((64, 96), aligned=True) == []


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h,w,crop,stride",
    [(24, 40, (16, 16), (12, 12)), (16, 16, (16, 16), (12, 12)), (10, 37, (16, 12), (8, 5))],
)
def test_slide_windows_and_count_match_mmseg_loop(h, w, crop, stride):
    (hc, wc), (hs, ws) = crop, stride
    ref, count = [], np.zeros((h, w))
    for hi in range(max(h - hc + hs - 1, 0) // hs + 1):
        for wi in range(max(w - wc + ws - 1, 0) // ws + 1):
            y2, x2 = min(hi * hs + hc, h), min(wi * ws + wc, w)
            y1, x1 = max(y2 - hc, 0), max(x2 - wc, 0)
            ref.append((y1, y2, x1, x2))
            count[y1:y2, x1:x2] += 1
    assert inference.slide_windows(h, w, crop, stride) == ref
    np.testing.assert_array_equal(inference.slide_count_map(h, w, crop, stride), count)


def test_slide_equals_whole_for_per_pixel_fn():
    x = np.random.default_rng(5).normal(size=(2, 24, 40, 3)).astype(np.float32)
    whole = inference.whole_inference(per_pixel_fn, jnp.asarray(x))
    for window_batch in (1, 4):
        slide = inference.slide_inference(
            per_pixel_fn, jnp.asarray(x), crop=16, stride=12, window_batch=window_batch
        )
        np.testing.assert_allclose(np.asarray(slide), np.asarray(whole), atol=1e-6)
    # Image smaller than the crop: padded windows give the same for a per-pixel function.
    small = jnp.asarray(x[:, :10, :14])
    padded = inference.slide_inference(per_pixel_fn, small, crop=16, stride=12, pad_windows=True)
    np.testing.assert_allclose(
        np.asarray(padded), np.asarray(inference.whole_inference(per_pixel_fn, small)), atol=1e-6
    )


def test_slide_quarter_resolution_matches_numpy_mmseg():
    x = np.random.default_rng(6).normal(size=(1, 24, 40, 3)).astype(np.float32)
    got = inference.slide_inference(quarter_fn, jnp.asarray(x), crop=16, stride=12, window_batch=2)
    ref = np_slide(quarter_fn, x, (16, 16), (12, 12))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_inference_resizes_back_to_label_size():
    x = np.random.default_rng(7).normal(size=(1, 32, 48, 3)).astype(np.float32)
    got = inference.inference(quarter_fn, jnp.asarray(x), out_size=(45, 70), num_classes=N)
    ref = np_resize(np_resize(quarter_fn(x, np), (32, 48)), (45, 70))
    assert got.shape == (1, 45, 70, N)
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)
    with pytest.raises(ValueError, match="channels but num_classes=7"):
        inference.inference(quarter_fn, jnp.asarray(x), out_size=(45, 70), num_classes=7)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_flip_and_multiscale_average_probabilities():
    x = np.random.default_rng(8).normal(size=(1, 32, 48, 3)).astype(np.float32)
    # Flip-equivariant function: flip TTA gives softmax of the single view.
    got = inference.inference(per_pixel_fn, jnp.asarray(x), out_size=(32, 48), flip=True)
    np.testing.assert_allclose(np.asarray(got), _softmax(per_pixel_fn(x, np)), atol=1e-6)

    # Position-dependent function: the flipped view must be flipped back before averaging.
    ramp = np.linspace(-2, 2, 48, dtype=np.float32)[None, None, :, None] * np.arange(N)

    def skew_fn(z, xp=jnp):
        return per_pixel_fn(z, xp) + ramp[:, :, : z.shape[2]]

    got = inference.inference(
        skew_fn, jnp.asarray(x), out_size=(40, 60), ratios=(0.5, 1.0), flip=True, num_classes=N
    )
    views = []
    for size in ((16, 24), (32, 48)):
        xs = np_resize(x, size).astype(np.float32)
        for flip in (False, True):
            xi = xs[:, :, ::-1] if flip else xs
            out = np_resize(skew_fn(xi, np), (40, 60))
            views.append(_softmax(out[:, :, ::-1] if flip else out))
    np.testing.assert_allclose(np.asarray(got), np.mean(views, 0), atol=1e-5)


@pytest.mark.parametrize(
    "settings",
    [{}, {"ratios": (0.5, 1.0), "flip": True}, {"mode": "slide", "crop": 16, "stride": 12}],
    ids=["whole", "multiscale_flip", "slide"],
)
def test_classes_in_row_bands_equal_the_argmax_of_the_scores(settings):
    """inference.classes computes the argmax band by band (here 1, 7 and 1000 rows per band,
    the last band ragged): the same classes as the argmax of inference's full scores."""
    x = np.random.default_rng(9).normal(size=(2, 32, 48, 3)).astype(np.float32)
    ramp = np.linspace(-0.2, 0.2, 12, dtype=np.float32)[None, None, :, None] * np.arange(N)

    def skew_fn(z, xp=jnp):  # position-dependent, so a flip or a wrong row shows
        return quarter_fn(z, xp) + ramp[:, :, : z.shape[2] // 4]

    out_size = (77, 101)
    full = inference.inference(skew_fn, jnp.asarray(x), out_size=out_size, **settings)
    expected = np.asarray(full).argmax(-1)
    assert len(np.unique(expected)) >= 3
    row_bytes = 4 * 2 * out_size[1] * N
    for rows in (1, 7, 1000):
        got = inference.classes(
            skew_fn, jnp.asarray(x), out_size=out_size, band_bytes=rows * row_bytes, **settings
        )
        assert got.dtype == np.int32 and got.shape == (2, *out_size)
        np.testing.assert_array_equal(got, expected, err_msg=f"{rows} rows per band")


def test_inference_aligned_slide_pipeline_shapes():
    seen = []

    def fn(z):
        seen.append(z.shape)
        return per_pixel_fn(z)

    x = jnp.zeros((1, 30, 40, 3))
    out = inference.inference(
        fn, x, out_size=(30, 40), mode="slide", crop=32, stride=24, scale=(80, 30), aligned=True
    )
    # rescale (30, 40) to (30, 40) -> aligned (32, 64) -> windows (32, 32).
    assert set(seen) == {(1, 32, 32, 3)}
    assert out.shape == (1, 30, 40, N)


# --------------------------------------------------------------------------------------------
# Driver and reports
# --------------------------------------------------------------------------------------------


def _label_decoder(x):
    """Logits peaked at round(channel 0), so predictions equal the label encoded there."""
    return -((x[..., :1] - jnp.arange(N, dtype=jnp.float32)) ** 2)


def test_evaluate_report_and_panels(tmp_path):
    rng = np.random.default_rng(9)
    examples, labels_list, preds_list = [], [], []
    for h, w in ((20, 28), (20, 28), (16, 24)):
        label = rng.integers(0, N, size=(h, w))
        label[rng.random((h, w)) < 0.1] = 255
        pred = np.where(rng.random((h, w)) < 0.7, label, rng.integers(0, N, size=(h, w)))
        pred[pred == 255] = 1
        img = np.stack([pred, np.zeros_like(pred), np.zeros_like(pred)], -1).astype(np.float32)
        examples.append({"image": img, "label": label.astype(np.uint8)})
        labels_list.append(label)
        preds_list.append(pred)
    result = eval_lib.evaluate(
        _label_decoder,
        examples,
        num_classes=N,
        panels=eval_lib.Panels(
            str(tmp_path / "panels"), 2, class_names=[f"c{i}" for i in range(N)]
        ),
        progress=False,
    )
    ref = np_mmseg_metrics(labels_list, preds_list, N)
    assert result["mIoU"] == pytest.approx(ref["mIoU"], rel=1e-12)
    assert result["aAcc"] == pytest.approx(ref["aAcc"], rel=1e-12)
    assert result["num_images"] == 3

    assert [os.path.basename(p) for p in result["panels"]] == ["panel_0000.png", "panel_0001.png"]
    assert sorted(result["figures"]) == ["panels/panel_0000", "panels/panel_0001"]
    for path in result["panels"]:  # the drawn figures are what was written
        key = f"panels/{os.path.basename(path)[:-4]}"
        np.testing.assert_array_equal(read_png(path)[..., :3], result["figures"][key])

    groups = report.f1_by_frequency_groups(result["F1"], np.arange(N) + 1, num_groups=2)
    path = tmp_path / "report.json"
    names = [f"c{i}" for i in range(N)]
    report.write_report(str(path), result, names, {"step": 7, "f1_groups": groups})
    written = json.loads(path.read_text())
    assert written["summary"]["mIoU"] == pytest.approx(result["mIoU"])
    assert [r["class"] for r in written["per_class"]] == names
    assert written["per_class"][3]["IoU"] == pytest.approx(result["IoU"][3])
    assert written["extra"]["step"] == 7 and written["extra"]["f1_groups"][0]["classes"] == [
        0,
        1,
        2,
    ]
    assert np.asarray(written["confusion_matrix"]).sum() == sum(
        int((lab != 255).sum()) for lab in labels_list
    )


def test_evaluate_rejects_unreduced_labels():
    label = np.full((8, 8), N, np.uint8)  # e.g. ADE20K label 150 with 150 classes
    with pytest.raises(ValueError, match="reduce_zero_label"):
        eval_lib.evaluate(
            _label_decoder,
            [{"image": np.zeros((8, 8, 3), np.float32), "label": label}],
            num_classes=N,
            progress=False,
        )


def test_report_writes_nan_as_null(tmp_path):
    m = metrics.metrics_from_confusion(np.array([[3, 1, 0], [0, 0, 0], [0, 0, 0]]))
    report.write_report(str(tmp_path / "r.json"), m)
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["per_class"][2]["IoU"] is None
    assert written["per_class"][1]["IoU"] == 0.0


def test_f1_by_frequency_groups_constructed():
    counts = np.array([50, 10, 40, 20, 60, 30, 5])
    f1 = np.array([90.0, 10.0, 70.0, 30.0, 80.0, np.nan, 20.0])
    groups = report.f1_by_frequency_groups(f1, counts, class_names=list("abcdefg"))
    # Ascending: 6(5) 1(10) 3(20) | 5(30) 2(40) | 0(50) 4(60)
    assert [g["name"] for g in groups] == ["rare", "common", "frequent"]
    assert [g["classes"] for g in groups] == [[6, 1, 3], [5, 2], [0, 4]]
    assert [g["mean_f1"] for g in groups] == pytest.approx([20.0, 70.0, 85.0])
    assert groups[0]["class_names"] == ["g", "b", "d"]
    assert (groups[0]["min_pixels"], groups[0]["max_pixels"]) == (5, 20)
    counts_from_labels = report.class_pixel_counts(
        [np.array([[0, 1, 255], [1, 1, 2]]), np.array([2, 2])], 4
    )
    np.testing.assert_array_equal(counts_from_labels, [1, 3, 3, 0])


def test_cosine_similarity_matrix():
    w = np.eye(6, 16) * 2.0
    w[5] = w[0] + w[1]  # cos 1/sqrt(2) with rows 0 and 1
    cos = report.cosine_similarity_matrix(w)
    np.testing.assert_allclose(cos[5, 0], 1 / np.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(np.diag(cos), 1.0, rtol=1e-6)
    assert cos[2, 3] == 0.0
    w[4] = 0.0
    with pytest.raises(ValueError, match="zero norm"):
        report.cosine_similarity_matrix(w)


def test_prototype_analysis_class_separability():
    from cbp_jax.prototypes import category_basis_prototypes

    learned = np.random.default_rng(10).normal(size=(6, 8)) + 0.5
    u = learned / np.linalg.norm(learned, axis=1, keepdims=True)
    cos = u @ u.T
    eq8 = 0.5 * (cos.sum() - np.trace(cos))  # Eq. 8, independent of cbp_jax.prototypes
    got = report.prototype_analysis(learned)
    assert got["class_separability"] == pytest.approx(eq8, rel=1e-5)
    assert got["max_abs_cos"] == pytest.approx(np.abs(cos - np.eye(6)).max(), rel=1e-5)

    cbp = category_basis_prototypes(jax.random.key(0), 6, 8, length=2.0)
    got = report.prototype_analysis(np.asarray(cbp))
    assert abs(got["class_separability"]) < 1e-4 and got["max_abs_cos"] < 1e-5
    assert got["norm_min"] == pytest.approx(2.0, rel=1e-5)
    assert got["norm_max"] == pytest.approx(2.0, rel=1e-5)
