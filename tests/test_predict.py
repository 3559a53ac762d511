"""Inference on new data: the Segmenter predicts what evaluation predicts, loads a workdir's
checkpoint, reuses its compiled programs; predict.py writes label PNGs, overlays and videos."""

import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from config_helpers import fresh_train_state, load_config
from PIL import Image

from cbp_jax import checkpointing, eval_lib, factories, predict
from cbp_jax import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = 5


def _config(**eval_overrides):
    config = load_config("scenes_mit_b0", "smoke")
    config.data.update(scenes_num_images=3, num_workers=0)
    config.eval.update(max_images=0, num_panels=0, **eval_overrides)
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A workdir with one checkpoint (step 5) of a model whose weights are not the seed-0
    init: (config, workdir, saved {"params", "model_state"} on host)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = _config()
    trained = ml_collections.ConfigDict(config.to_dict())
    trained.seed = 7  # the checkpoint's weights differ from a fresh seed-0 model's
    state = fresh_train_state(trained)
    noise = jax.random.normal(jax.random.key(1), (), jax.numpy.float32)
    state["params"] = jax.tree.map(lambda p: p * (1.5 + 0.1 * noise), state["params"])
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), every=1, async_save=False
    )
    checkpointer.save(STEP, state, {}, force=True)
    checkpointer.close()
    workdir_lib.write_config(workdir, config)
    saved = jax.device_get({k: state[k] for k in ("params", "model_state")})
    return config, workdir, saved


@pytest.fixture(scope="module")
def segmenter(run):
    config, workdir, _ = run
    return predict.Segmenter.from_workdir(config, workdir)


def _scenes(config):
    return factories.source_from_config(config, config.data.eval_split)


class _Relabelled:
    """A source whose labels are given predictions (so evaluation scores agreement)."""

    def __init__(self, source, labels):
        self.source, self.labels = source, labels

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return dict(self.source[i], label=self.labels[i].astype(np.uint8))

    def __getattr__(self, name):
        return getattr(self.source, name)


@pytest.mark.slow
def test_from_workdir_restores_the_checkpoint(run, segmenter):
    _, _, saved = run
    assert segmenter.loaded_from.endswith(f"step {STEP}")
    got = jax.tree.leaves(jax.device_get(segmenter.state["params"]))
    for a, b in zip(got, jax.tree.leaves(saved["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "mode",
    [{"mode": "whole"}, {"mode": "slide", "crop": (48, 48), "stride": (32, 32)}],
    ids=["whole", "slide"],
)
@pytest.mark.slow
def test_predictions_equal_evaluation(run, mode):
    """Evaluation over the 8-device mesh, scored against the Segmenter's classes: every
    pixel agrees (aAcc 100) on images of the data set's own test pipeline."""
    config, workdir, _ = run
    config = _config(**mode)
    seg = predict.Segmenter.from_workdir(config, workdir)
    source = _scenes(config)
    labels = [seg(source[i]["image"]) for i in range(len(source))]
    assert labels[0].shape == source[0]["image"].shape[:2] and labels[0].dtype == np.int32
    assert len(np.unique(np.concatenate([x.ravel() for x in labels]))) >= 2  # not trivial

    mesh = factories.mesh_from_config(config)
    with jax.set_mesh(mesh):
        setup = factories.TrainSetup(config, mesh)
        checkpointer = checkpointing.Checkpointer(
            os.path.join(workdir, "checkpoints"), every=1, async_save=False
        )
        state, _ = checkpointer.restore(STEP, setup.init_state())
        checkpointer.close()
    evaluator = eval_lib.Evaluator(config, mesh, setup.state_shardings, _Relabelled(source, labels))
    result = evaluator(state, progress=False)
    assert result["num_images"] == len(source)
    assert result["aAcc"] == 100.0, result["aAcc"]


@pytest.mark.slow
def test_batches_logits_and_compiled_reuse(segmenter):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 50, 70, 3), dtype=np.uint8)
    scores = segmenter.logits(images[0])
    assert scores.shape == (50, 70, segmenter.num_classes) and scores.dtype == np.float32
    np.testing.assert_array_equal(segmenter(images[0]), scores.argmax(-1))

    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *a, **k: (
            compiled.append(event)
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )
    segmenter(images[1])  # same size as before: nothing compiles
    assert compiled == []
    batch = segmenter(images)
    assert batch.shape == (2, 50, 70)
    for i in range(2):
        np.testing.assert_array_equal(batch[i], segmenter(images[i]))


def test_segmenter_rejects_non_uint8_rgb(segmenter):
    with pytest.raises(ValueError, match=r"uint8 RGB images .* got shape \(8, 8\)"):
        segmenter(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="dtype float32"):
        segmenter(np.zeros((8, 8, 3), np.float32))


def test_missing_workdir_and_step_are_named(run, tmp_path):
    config, workdir, _ = run
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict.Segmenter.from_workdir(config, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=rf"no checkpoint of step 9.*\[{STEP}\]"):
        predict.Segmenter.from_workdir(config, workdir, step=9)


def _write_video(path, frames, fps=5):
    writer = predict.VideoWriter(path, fps, frames[0].shape[:2])
    for f in frames:
        writer.write(f)
    writer.close()


def _inputs(tmp_path):
    """A folder of two images (one in a subfolder), a lone image and a 3-frame video."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = {
        "a": rng.integers(0, 256, (40, 56, 3), dtype=np.uint8),
        "sub/b": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
        "c": rng.integers(0, 256, (36, 60, 3), dtype=np.uint8),
    }
    Image.fromarray(images["a"]).save(folder / "a.png")
    Image.fromarray(images["sub/b"]).save(folder / "sub" / "b.png")
    Image.fromarray(images["c"]).save(tmp_path / "c.png")
    frames = [np.full((32, 48, 3), 40 * k, np.uint8) + images["a"][:32, :48] // 2 for k in range(3)]
    _write_video(str(tmp_path / "clip.mp4"), frames)
    return [str(folder), str(tmp_path / "c.png"), str(tmp_path / "clip.mp4")], images


@pytest.mark.slow
def test_predict_files_writes_labels_overlays_and_videos(segmenter, tmp_path):
    inputs, images = _inputs(tmp_path)
    out = tmp_path / "out"
    summary = predict.predict_files(segmenter, inputs, str(out), progress=False)
    assert (summary["images"], summary["videos"], summary["frames"]) == (3, 1, 3)
    for name, image in images.items():
        label = Image.open(out / f"{name}.png")
        assert label.mode == "P"  # palette PNG: the pixel values are the class ids
        np.testing.assert_array_equal(np.asarray(label), segmenter(image))
        assert label.getpalette()[:3] == list(segmenter.palette[0])
        assert Image.open(out / f"{name}_overlay.jpg").size == image.shape[1::-1]
    frames, _, _ = predict.read_video(str(tmp_path / "clip.mp4"))
    for k, frame in enumerate(frames):
        label = np.asarray(Image.open(out / "clip" / f"frame_{k:06d}.png"))
        np.testing.assert_array_equal(label, segmenter(frame))
    overlay_frames, _, _ = predict.read_video(str(out / "clip_overlay.mp4"))
    assert [f.shape for f in overlay_frames] == [(32, 48, 3)] * 3

    ids = predict.predict_files(
        segmenter, [inputs[1]], str(tmp_path / "ids"), fmt="ids", progress=False
    )
    label = Image.open(tmp_path / "ids" / "c.png")
    assert label.mode == "L" and ids["images"] == 1
    np.testing.assert_array_equal(np.asarray(label), segmenter(images["c"]))


def test_overlay_blends_the_class_colours():
    image = np.full((2, 2, 3), 100, np.uint8)
    palette = np.array([[0, 0, 0], [200, 0, 50]], np.uint8)
    got = predict.overlay(image, np.array([[0, 1], [1, 0]]), palette, alpha=0.25)
    np.testing.assert_array_equal(got[0, 1], [125, 75, 88])  # 0.75 * 100 + 0.25 * colour
    np.testing.assert_array_equal(got[0, 0], [75, 75, 75])


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    for path, message in [
        (tmp_path / "missing.png", "missing.png does not exist"),
        (tmp_path / "empty", "empty holds no images"),
        (tmp_path / "notes.txt", "notes.txt: unknown kind of file '.txt'"),
    ]:
        with pytest.raises(predict.InputError, match=message):
            predict.list_inputs([str(path)])
    with pytest.raises(predict.InputError, match="would both be written as broken.png"):
        predict.list_inputs([str(tmp_path / "broken.jpg"), str(tmp_path / "broken.jpg")])
    with pytest.raises(predict.InputError, match="cannot read the image .*broken.jpg"):
        predict.read_image(str(tmp_path / "broken.jpg"))
    with pytest.raises(predict.InputError, match="cannot read the video .*broken.mp4"):
        predict.read_video(str(tmp_path / "broken.mp4"))


@pytest.mark.slow
def test_predict_cli(run, tmp_path):
    """predict.py end to end: an image and a video in, PNGs, overlays and a video out; a
    missing input stops before the model loads, naming the file."""
    _, workdir, _ = run
    inputs, _ = _inputs(tmp_path)
    config = os.path.join(REPO, "configs", "scenes_mit_b0.py:smoke")
    command = [sys.executable, os.path.join(REPO, "predict.py"), "--config", config]
    command += ["--workdir", workdir]
    # The programs compiled by the tests above come from conftest's persistent cache.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    out = tmp_path / "out"
    done = subprocess.run(
        [*command, inputs[1], inputs[2], "--out", str(out)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 images, 1 videos (3 frames)" in done.stdout
    assert sorted(os.listdir(out)) == ["c.png", "c_overlay.jpg", "clip", "clip_overlay.mp4"]
    missing = subprocess.run(
        [*command, str(tmp_path / "nope.jpg"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert missing.returncode == 1
    assert "nope.jpg does not exist" in missing.stderr


def _damaged_inputs(folder) -> dict[str, str]:
    """A folder of 2 good JPEGs, a truncated one and random bytes named .jpg, and an MJPG AVI
    cut after 6 of the 10 frames its header announces."""
    import cv2

    rng = np.random.default_rng(3)
    photos = folder / "photos"
    photos.mkdir()
    for name in ("good_a", "good_b"):
        image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(image).save(photos / f"{name}.jpg", quality=95)
    data = (photos / "good_a.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (photos / "garbage.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    mjpg = cv2.VideoWriter_fourcc(*"MJPG")
    writer = cv2.VideoWriter(str(folder / "full.avi"), mjpg, 10, (48, 32))
    for _ in range(10):
        writer.write(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))
    writer.release()
    video = (folder / "full.avi").read_bytes()
    chunks = [i for i in range(len(video)) if video.startswith(b"00dc", i)]
    (folder / "cut.avi").write_bytes(video[: chunks[7]])  # the movi list's first 6 frames
    return {"photos": str(photos), "video": str(folder / "cut.avi")}


@pytest.mark.slow
def test_predict_cli_names_bad_inputs_and_labels_the_good_ones(run, tmp_path):
    """Unreadable files are named before the model loads, the readable ones labelled, and
    the run exits 1 saying how many were skipped; a video that ends early is labelled with a
    warning; an --out that is a file or cannot be written stops before the model loads."""
    _, workdir, _ = run
    inputs = _damaged_inputs(tmp_path)
    config = os.path.join(REPO, "configs", "scenes_mit_b0.py:smoke")
    command = [sys.executable, os.path.join(REPO, "predict.py"), "--config", config]
    command += ["--workdir", workdir]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)

    def predict_cli(*args):
        return subprocess.run([*command, *args], capture_output=True, text=True, env=env)

    out = tmp_path / "out"
    done = predict_cli(inputs["photos"], inputs["video"], "--out", str(out))
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    loaded = next(i for i, line in enumerate(lines) if line.startswith("Predicting with"))
    skipped = [line for line in lines[:loaded] if line.startswith("skipped: ")]
    assert len(skipped) == 2, done.stdout
    assert "garbage.jpg: not an image file" in skipped[0]
    assert "truncated.jpg: image file is truncated" in skipped[1]
    ended = ": the video ended after 6 of the 10 frames"
    assert f"warning: {inputs['video']}{ended}" in done.stdout
    assert "2 images, 1 videos (6 frames)" in done.stdout
    assert "error: 2 of 5 inputs could not be read and were skipped" in done.stderr
    assert sorted(os.listdir(out)) == [
        "cut", "cut_overlay.mp4", "good_a.png", "good_a_overlay.jpg", "good_b.png",
        "good_b_overlay.jpg",
    ]  # fmt: skip
    assert len(os.listdir(out / "cut")) == 6

    good = os.path.join(inputs["photos"], "good_a.jpg")
    (tmp_path / "a_file").write_text("x")
    for target, message in [
        (tmp_path / "a_file", "--out {} is a file; name a folder"),
        (tmp_path / "a_file" / "sub", "--out {}: cannot write in .* \\(Not a directory\\)"),
        ("/proc/cbp_jax_test/out", "--out {}: cannot write in"),
    ]:
        refused = predict_cli(good, "--out", str(target))
        assert refused.returncode == 1
        last = refused.stderr.splitlines()[-1]
        assert re.match("error: " + message.format(re.escape(str(target))), last), last
        assert "Predicting with" not in refused.stdout and "checking inputs" not in refused.stderr
