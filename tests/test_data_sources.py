"""Sources: layouts, label mappings, the COCO-Stuff converter, bad-data errors."""

import os
import pickle

import cv2
import numpy as np
import pytest
from data_helpers import CAMVID_ROOT, make_ade20k, make_cocostuff_raw, write_image
from PIL import Image
from scipy.io import savemat

from cbp_jax import data
from cbp_jax.data import classes, cocostuff

needs_camvid = pytest.mark.skipif(CAMVID_ROOT is None, reason="CamVid not found (CBP_CAMVID_ROOT)")


def test_class_tables():
    assert len(classes.ADE20K_CLASSES) == len(classes.ADE20K_PALETTE) == 150
    assert len(classes.COCOSTUFF_CLASSES) == len(classes.COCOSTUFF_PALETTE) == 171
    assert len(classes.CAMVID_CLASSES) == len(classes.CAMVID_PALETTE) == 11
    for name in data.DATASETS:
        info = data.dataset_info(name)
        assert len(info.palette) == info.num_classes
        assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in info.palette)
    assert classes.ADE20K_CLASSES[:3] == ("wall", "building", "sky")
    assert classes.COCOSTUFF_CLASSES[-1] == "wood"


def test_ade20k_reduce_zero_label(tmp_path):
    base = make_ade20k(str(tmp_path))
    src = data.make_source("ade20k", str(tmp_path), "train")
    assert len(src) == 4 and src.num_classes == 150
    assert len(data.make_source("ade20k", base, "val")) == 2  # root may be the folder itself
    for i in range(len(src)):
        ex = src[i]
        raw = np.asarray(Image.open(src.label_paths[i]))
        expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)  # independent reference
        np.testing.assert_array_equal(ex["label"], expected)
        assert ex["image"].shape == (*raw.shape, 3) and ex["image"].dtype == np.uint8
        bgr = cv2.imread(src.image_paths[i])
        np.testing.assert_array_equal(ex["image"], bgr[..., ::-1])
        assert ex["name"] == os.path.basename(src.image_paths[i])[:-4]
    pickle.loads(pickle.dumps(src))  # grain workers receive sources pickled


def test_cocostuff_converter_and_source(tmp_path):
    raw = make_cocostuff_raw(str(tmp_path / "raw"))
    out = str(tmp_path / "conv")
    counts = cocostuff.convert_cocostuff10k(raw, out, num_workers=2)
    assert counts["train"] == 3 and counts["test"] == 2 and counts["unused_id_pixels"] == 0
    src = data.make_source("cocostuff10k", out, "train")
    assert len(src) == 3 and src.num_classes == 171
    from scipy.io import loadmat

    # Raw COCO id -> final train id (after reduce_zero_label), written out by hand.
    expected_map = {0: 255, 1: 0, 11: 10, 13: 11, 92: 80, 182: 170}
    for i in range(len(src)):
        s = loadmat(os.path.join(raw, "annotations", src.names[i] + ".mat"))["S"]
        expected = np.vectorize(expected_map.get)(s)
        np.testing.assert_array_equal(src[i]["label"], expected)
    # The converted PNG holds the mmseg train ids 0..171.
    png = np.asarray(Image.open(src.label_paths[0]))
    assert set(np.unique(png)) <= {0, 1, 11, 12, 81, 171}


def test_cocostuff_converter_bad_values(tmp_path):
    raw = make_cocostuff_raw(str(tmp_path / "raw"), n_train=1, n_test=1)
    name = open(os.path.join(raw, "imageLists", "train.txt")).read().split()[0]
    savemat(os.path.join(raw, "annotations", name + ".mat"), {"S": np.full((4, 4), 200, np.uint16)})
    with pytest.raises(data.BadExampleError, match=rf"{name}\.mat.*\[200\]"):
        cocostuff.convert_cocostuff10k(raw, str(tmp_path / "out"), num_workers=1)
    # Unused ids become 0 and are counted.
    lab, unused = cocostuff.convert_label(np.array([[12, 13], [91, 0]]), "x.mat")
    np.testing.assert_array_equal(lab, [[0, 12], [0, 0]])
    assert unused == 2


def test_cocostuff_raw_release_is_named(tmp_path):
    raw = make_cocostuff_raw(str(tmp_path / "raw"), n_train=1, n_test=1)
    with pytest.raises(data.LayoutError, match="convert-cocostuff10k"):
        data.make_source("cocostuff10k", raw, "train")


@needs_camvid
def test_camvid_void_is_ignored():
    src = data.make_source("camvid", CAMVID_ROOT, "val")
    assert len(src) == 101 and src.num_classes == 11
    for i in (0, 50):
        ex = src[i]
        raw = np.asarray(Image.open(src.label_paths[i]))
        np.testing.assert_array_equal(ex["label"], np.where(raw == 11, 255, raw))
        assert ex["image"].shape == (360, 480, 3)
    with pytest.raises(data.LayoutError, match="testannot"):
        data.make_source("camvid", CAMVID_ROOT, "test")


def test_scenes_deterministic_and_valid():
    a = data.make_source("scenes", split="train", num_images=6, seed=3)
    b = data.make_source("scenes", split="train", num_images=6, seed=3)
    c = data.make_source("scenes", split="val", num_images=6, seed=3)
    assert a.num_classes == 8 and len(a) == 6
    for i in range(6):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        np.testing.assert_array_equal(a[i]["label"], b[i]["label"])
        assert not np.array_equal(a[i]["image"], c[i]["image"])
        assert a[i]["image"].shape == (120, 160, 3) and a[i]["label"].shape == (120, 160)
    labels = np.concatenate([a[i]["label"].ravel() for i in range(6)])
    assert set(np.unique(labels)) <= set(range(8)) | {255}
    assert {0, 1, 255} <= set(np.unique(labels)) and len(np.unique(labels)) >= 5
    with pytest.raises(IndexError):
        a[6]


# ----------------------------------------------------------------------------- bad data


def test_missing_folder_shows_layout(tmp_path):
    os.makedirs(tmp_path / "ADEChallengeData2016" / "images" / "training")
    with pytest.raises(data.LayoutError, match=r"annotations/training.*Expected layout") as e:
        data.make_source("ade20k", str(tmp_path), "train")
    assert "images/validation/*.jpg" in str(e.value)
    with pytest.raises(data.LayoutError, match="does not exist"):
        data.make_source("camvid", str(tmp_path / "nope"), "train")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        data.make_source("ade20k", str(tmp_path), "dev")


def test_unpaired_files_named_or_skipped(tmp_path):
    base = make_ade20k(str(tmp_path), n_train=3)
    os.remove(os.path.join(base, "annotations", "training", "ADE_train_00000001.png"))
    extra = os.path.join(base, "annotations", "training", "ADE_train_00000099.png")
    cv2.imwrite(extra, np.zeros((8, 8), np.uint8))
    with pytest.raises(data.LayoutError) as e:
        data.make_source("ade20k", str(tmp_path), "train")
    assert "ADE_train_00000001" in str(e.value) and "ADE_train_00000099" in str(e.value)
    src = data.make_source("ade20k", str(tmp_path), "train", skip_bad_examples=True)
    assert src.names == ["ADE_train_00000000", "ADE_train_00000002"]


def test_unreadable_and_out_of_range_examples(tmp_path):
    base = make_ade20k(str(tmp_path), n_train=3)
    img0 = os.path.join(base, "images", "training", "ADE_train_00000000.jpg")
    with open(img0, "wb") as f:
        f.write(b"not a jpeg")
    lab1 = os.path.join(base, "annotations", "training", "ADE_train_00000001.png")
    bad = np.asarray(Image.open(lab1)).copy()
    bad[0, :3] = [151, 200, 151]
    cv2.imwrite(lab1, bad)
    src = data.make_source("ade20k", str(tmp_path), "train")
    with pytest.raises(data.BadExampleError, match=r"ADE_train_00000000\.jpg: unreadable image"):
        src[0]
    with pytest.raises(
        data.BadExampleError, match=r"ADE_train_00000001\.png: label values \[151, 200\]"
    ):
        src[1]
    src[2]  # the good one
    # Size mismatch between image and label.
    lab2 = os.path.join(base, "annotations", "training", "ADE_train_00000002.png")
    cv2.imwrite(lab2, np.zeros((5, 7), np.uint8))
    with pytest.raises(data.BadExampleError, match=r"label size \(5, 7\) \(H, W\) differs"):
        src[2]
    # A colour label file is refused with its shape.
    write_image(lab2, np.zeros((5, 7, 3), np.uint8))
    with pytest.raises(data.BadExampleError, match="single-channel"):
        src[2]
