"""Prepared formats (ArrayRecord, TFDS) and the dataset doctor."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from data_helpers import CAMVID_ROOT, make_ade20k, make_cocostuff_raw

from cbp_jax import data
from cbp_jax.data import arrayrecord, cocostuff, doctor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_same_examples(a, b):
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert x["name"] == y["name"]
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_arrayrecord_roundtrip(tmp_path):
    make_ade20k(str(tmp_path / "ade"), n_train=5)
    folder = data.make_source("ade20k", str(tmp_path / "ade"), "train")
    meta = arrayrecord.write_arrayrecord(folder, str(tmp_path / "ar"), examples_per_shard=2)
    assert meta["num_examples"] == 5 and len(meta["files"]) == 3 and meta["labels"] == "raw"
    shards = data.make_source("ade20k", str(tmp_path / "ar"), "train", format="arrayrecord")
    _assert_same_examples(folder, shards)
    # Generated data (scenes) is stored as PNG with train ids.
    scenes = data.make_source("scenes", split="val", num_images=3)
    arrayrecord.write_arrayrecord(scenes, str(tmp_path / "sc"))
    _assert_same_examples(
        scenes, data.make_source("scenes", str(tmp_path / "sc"), "val", format="arrayrecord")
    )
    with pytest.raises(data.LayoutError, match="no ArrayRecord split 'val'.*train.json"):
        data.make_source("ade20k", str(tmp_path / "ar"), "val", format="arrayrecord")
    with pytest.raises(ValueError, match="hold 'ade20k', not 'camvid'"):
        data.make_source("camvid", str(tmp_path / "ar"), "train", format="arrayrecord")


def test_arrayrecord_writer_checks_examples(tmp_path):
    base = make_ade20k(str(tmp_path / "ade"), n_train=3)
    lab = os.path.join(base, "annotations", "training", "ADE_train_00000001.png")
    cv2.imwrite(lab, np.full((40, 40), 220, np.uint8))
    folder = data.make_source("ade20k", str(tmp_path / "ade"), "train")
    with pytest.raises(data.BadExampleError, match="ADE_train_00000001.png"):
        arrayrecord.write_arrayrecord(folder, str(tmp_path / "ar"))
    folder.skip_bad_examples = True
    meta = arrayrecord.write_arrayrecord(folder, str(tmp_path / "ar"))
    assert meta["num_examples"] == 2 and meta["num_bad_left_out"] == 1
    with pytest.raises(data.BadExampleError, match="bad magic"):
        arrayrecord.decode_record(b"XXXX" + bytes(20), "somewhere")


def test_tfds_builders_without_tensorflow(tmp_path):
    """Prepare and read both builders in a fresh process; TensorFlow is never imported."""
    make_ade20k(str(tmp_path / "ade"), n_train=3, n_val=2)
    raw = make_cocostuff_raw(str(tmp_path / "raw"), n_train=2, n_test=1)
    cocostuff.convert_cocostuff10k(raw, str(tmp_path / "coco"), num_workers=1)
    script = f"""
import sys
import numpy as np
from cbp_jax import data
from cbp_jax.data import tfds_builders
for name, manual, split in [("ade20k", "ade", "val"), ("cocostuff10k", "coco", "test")]:
    tfds_builders.prepare(name, {str(tmp_path)!r} + "/" + manual, {str(tmp_path / "tfds")!r})
    for s in ("train", split):
        folder = data.make_source(name, {str(tmp_path)!r} + "/" + manual, s)
        tf_src = data.make_source(name, {str(tmp_path / "tfds")!r}, s, format="tfds")
        got = {{tf_src[i]["name"]: tf_src[i] for i in range(len(tf_src))}}
        assert sorted(got) == folder.names, (sorted(got), folder.names)
        for i in range(len(folder)):
            ex = folder[i]
            np.testing.assert_array_equal(got[ex["name"]]["image"], ex["image"])
            np.testing.assert_array_equal(got[ex["name"]]["label"], ex["label"])
import tensorflow_datasets as tfds
ds = tfds.data_source("ade20k150", split="validation", data_dir={str(tmp_path / "tfds")!r})
assert len(ds) == 2 and ds[0]["label"].ndim == 3
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print("OK")
"""
    env = {**os.environ, "PYTHONPATH": REPO}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "cbp_jax.data", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_doctor_lists_every_bad_file(tmp_path):
    base = make_ade20k(str(tmp_path), n_train=6, n_val=2)
    tr_img = os.path.join(base, "images", "training")
    tr_ann = os.path.join(base, "annotations", "training")
    os.remove(os.path.join(tr_ann, "ADE_train_00000000.png"))  # image without label
    cv2.imwrite(os.path.join(tr_ann, "ADE_train_00000077.png"), np.zeros((4, 4), np.uint8))
    with open(os.path.join(tr_img, "ADE_train_00000001.jpg"), "wb") as f:
        f.write(b"garbage")  # unreadable
    cv2.imwrite(os.path.join(tr_ann, "ADE_train_00000002.png"), np.full((9, 9), 7, np.uint8))
    lab3 = cv2.imread(os.path.join(tr_ann, "ADE_train_00000003.png"), cv2.IMREAD_UNCHANGED)
    lab3[0, 0] = 180  # out of range
    cv2.imwrite(os.path.join(tr_ann, "ADE_train_00000003.png"), lab3)
    run = _cli("check", "--dataset", "ade20k", "--root", str(tmp_path), "--no-progress")
    assert run.returncode == 1, run.stdout + run.stderr
    out = run.stdout
    assert "split train: 5 pairs, 2 good, 5 bad" in out
    assert "split val: 2 pairs, 2 good, 0 bad" in out
    assert "bad files: 5" in out
    for needle in (
        "ADE_train_00000000.jpg: no label file",
        "ADE_train_00000077.png: no image file",
        "ADE_train_00000001.jpg: unreadable image",
        "ADE_train_00000002.png: label size (9, 9)",
        "ADE_train_00000003.png: label values [180]",
    ):
        assert needle in out, needle
    # Class frequencies: computed on the good files, compared with NumPy.
    _, _, reports = doctor.check("ade20k", str(tmp_path), ["val"], progress=False)
    src = data.make_source("ade20k", str(tmp_path), "val")
    labels = np.concatenate([src[i]["label"].ravel() for i in range(len(src))])
    expected = np.bincount(labels[labels != 255], minlength=150)
    np.testing.assert_array_equal(reports[0].pixel_counts, expected)
    assert reports[0].ignore_pixels == int((labels == 255).sum())


@pytest.mark.slow
@pytest.mark.skipif(CAMVID_ROOT is None, reason="CamVid not found (CBP_CAMVID_ROOT)")
def test_doctor_on_camvid_reports_absent_test_split():
    run = _cli(
        "check", "--dataset", "camvid", "--root", CAMVID_ROOT, "--split", "val",
        "--split", "test", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "split val: 101 pairs, 101 good, 0 bad; image (H, W) from (360, 480) to (360, 480)" in (
        run.stdout
    )
    assert "split test: absent" in run.stdout and "bad files: 0" in run.stdout
    assert "road" in run.stdout and "bicyclist" in run.stdout
    run = _cli("check", "--dataset", "camvid", "--root", "/nonexistent", "--no-progress")
    assert run.returncode == 1 and "no split present" in run.stdout
