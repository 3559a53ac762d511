"""Inference on new data: a :class:`Segmenter` (load once, call on arrays) and the file side
of ``predict.py`` (images, folders, videos -> label PNGs and overlays).

    seg = Segmenter.from_workdir(config, "workdirs/scenes_mit_b0")   # or .from_weights(...)
    classes = seg(image)            # uint8 (H, W, 3) RGB -> int32 (H, W) class ids
    scores = seg.logits(image)      # float32 (H, W, N)
    classes = seg(frames)           # (B, H, W, 3) images of one size -> (B, H, W)

The Segmenter runs what evaluation runs: the test transform of ``config.data`` (keep-ratio
resize to ``test_scale``, optional aligned resize, normalization), the model in
``config.eval.dtype`` and ``cbp_jax.inference`` with the mode, windows, ratios and flip of
``config.eval``, back at the input's size; so its classes are evaluation's. It runs on one
device (the first, or ``device``); the model compiles once per input size and is reused.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from PIL import Image

from cbp_jax import data as data_lib
from cbp_jax import factories, figures, inference, report, storage, train_lib

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")
FORMATS = ("palette", "ids")


class Segmenter:
    """A trained segmentor ready for inference on arrays.

    Build it with :meth:`from_workdir` or :meth:`from_weights`.

    Args:
      config: the run's config (``model``, ``data.test_scale``, ``data.aligned_resize``,
        ``data.num_classes``, ``eval``).
      state: ``{"params", "model_state"}`` of the model (any placement; copied to ``device``).
      device: where to run (default the first device).
    """

    def __init__(self, config: ml_collections.ConfigDict, state: dict, device=None):
        self.config = config
        self.device = device or jax.devices()[0]
        self.graphdef = factories.eval_graphdef(config)
        self.settings = inference.Settings.from_config(config)
        self.state = jax.device_put({k: state[k] for k in ("params", "model_state")}, self.device)
        self.num_classes = int(config.data.num_classes)
        self.transform = data_lib.test_transform(
            tuple(config.data.test_scale), aligned=config.data.aligned_resize
        )
        self._predict = jax.jit(train_lib.make_predict_fn(self.graphdef))
        self.loaded_from: str | None = None  # the checkpoint or file, for messages
        info = _dataset_info(config)
        self.class_names = (
            tuple(info.class_names) if info else tuple(map(str, range(self.num_classes)))
        )
        self.palette = (
            np.asarray(info.palette, np.uint8) if info else report.default_palette(self.num_classes)
        )

    # ------------------------------------------------------------------------- loading

    @classmethod
    def from_workdir(
        cls, config: ml_collections.ConfigDict, workdir: str, step: int | None = None, **kwargs
    ) -> Segmenter:
        """The workdir's checkpoint ``step`` (default the latest), as ``eval.py`` loads it.

        Raises:
          FileNotFoundError: no such workdir, checkpoint or step (the message lists them).
          workdir.ConfigMismatchError: ``config`` builds another model than the workdir's.
        """
        step, state = factories.restore(config, workdir, step)
        segmenter = cls(config, state, **kwargs)
        segmenter.loaded_from = f"{storage.resolve(workdir)} step {step}"
        return segmenter

    @classmethod
    def from_weights(cls, config: ml_collections.ConfigDict, path: str, **kwargs) -> Segmenter:
        """Converted weights (any format ``cbp_jax.weights`` reads) holding a whole segmentor.

        Raises:
          ValueError: the file does not match the model, or holds no decode head (an
            encoder-only pretraining checkpoint cannot segment: train from it first).
        """
        mesh = factories.single_device_mesh()
        fresh = factories.init_model_state(config, mesh)
        state, loaded = factories.load_weights(
            factories.train_graphdef(config),
            fresh,
            path,
            factories.model_shardings(config, mesh),
            trust_pickle=config.get("trust_pickle", False),
            verbose=False,
        )
        missing = sorted(set(loaded.fresh) & {"head", "classifier"})
        if missing:
            raise ValueError(
                f"{path} has no weights for the model's {' and '.join(missing)} (an "
                "encoder-only checkpoint?): it cannot segment as it is. Train from it (python "
                f"train.py --config ... --config.init_from={path}) and predict with --workdir."
            )
        segmenter = cls(config, state, **kwargs)
        segmenter.loaded_from = loaded.path
        return segmenter

    # ------------------------------------------------------------------------- inference

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Class scores at the input's size, as evaluation computes them.

        Args:
          images: uint8 RGB (H, W, 3), or (B, H, W, 3) images of one size.

        Returns:
          float32 (H, W, N) or (B, H, W, N): logits, or the mean softmax probabilities when
          ``config.eval`` asks for several ratios or flip. H * W * N * 4 bytes: for class ids
          of a large image call the segmenter itself, which never holds this array.
        """
        return np.asarray(self._scores(images))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Class ids: uint8 RGB (H, W, 3) -> int32 (H, W); (B, H, W, 3) -> (B, H, W).

        The argmax of :meth:`logits`, computed in bands of rows (``inference.classes``), so
        memory stays bounded at any input size (a 24-megapixel photo included)."""
        x, out_size, single = self._prepare(images)
        ids = inference.classes(
            self._logits, x, out_size=out_size, num_classes=self.num_classes,
            **dataclasses.asdict(self.settings),
        )  # fmt: skip
        return ids[0] if single else ids

    def network(self, x: np.ndarray) -> jax.Array:
        """The bare network: normalized float32 (B, h, w, 3) -> logits (B, h/4, w/4, N)."""
        return self._predict(self.state, jax.device_put(np.asarray(x, np.float32), self.device))

    def model(self):
        """The ``nnx`` segmentor (eval compute dtype) with the loaded weights."""
        from flax import nnx

        return nnx.merge(self.graphdef, self.state["params"], self.state["model_state"])

    def _logits(self, x: jax.Array) -> jax.Array:
        return self._predict(self.state, x)

    def _prepare(self, images: np.ndarray) -> tuple[jax.Array, tuple[int, int], bool]:
        """``(normalized test-size batch on the device, original (H, W), single image?)``."""
        images = np.asarray(images)
        single = images.ndim == 3
        batch = images[None] if single else images
        if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
            raise ValueError(
                f"Segmenter takes uint8 RGB images (H, W, 3) or (B, H, W, 3); got shape "
                f"{images.shape} dtype {images.dtype}. Convert with "
                "np.asarray(PIL.Image.open(path).convert('RGB'))."
            )
        x = np.stack([self.transform({"image": im, "label": None})["image"] for im in batch])
        return jax.device_put(x, self.device), tuple(batch.shape[1:3]), single

    def _scores(self, images: np.ndarray) -> jax.Array:
        x, out_size, single = self._prepare(images)
        scores = inference.inference(
            self._logits, x, out_size=out_size, num_classes=self.num_classes,
            **dataclasses.asdict(self.settings),
        )  # fmt: skip
        return scores[0] if single else scores


def _dataset_info(config) -> data_lib.DatasetInfo | None:
    """The data set's class names and palette when they match ``config.data.num_classes``."""
    try:
        info = data_lib.dataset_info(config.data.dataset)
    except ValueError:
        return None
    return info if info.num_classes == config.data.num_classes else None


# ----------------------------------------------------------------------------- files


class InputError(ValueError):
    """An input path that does not exist, cannot be read, or is of an unknown kind."""


def list_inputs(paths: Sequence[str]) -> list[tuple[str, str, str]]:
    """``[(kind, path, name)]`` for image files, folders (their images, recursively, sorted)
    and video files, local or ``gs://``; ``name`` is the output name without suffix (a
    folder's images keep their path below it). Raises :class:`InputError` naming the path."""
    items = []
    for path in paths:
        file = storage.path(path)
        suffix = file.suffix.lower()
        if file.is_dir():
            found = [f for f in storage.files_under(file) if f.suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise InputError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            items += [
                ("image", os.fspath(f), os.fspath(f.relative_to(file).with_suffix("")))
                for f in found
            ]
        elif not file.exists():
            raise InputError(f"{path} does not exist.")
        elif suffix in IMAGE_SUFFIXES:
            items.append(("image", path, file.stem))
        elif suffix in VIDEO_SUFFIXES:
            items.append(("video", path, file.stem))
        else:
            raise InputError(
                f"{path}: unknown kind of file {suffix!r}; pass images "
                f"({', '.join(IMAGE_SUFFIXES)}), videos ({', '.join(VIDEO_SUFFIXES)}) or folders."
            )
    seen: dict[str, str] = {}
    for _, path, name in items:
        if name in seen:
            raise InputError(
                f"{seen[name]} and {path} would both be written as {name}.png; pass them in "
                "separate runs (different --out) or rename one."
            )
        seen[name] = path
    return items


def unreadable(kind: str, path: str) -> str | None:
    """Why the image or video at ``path`` cannot be read in full (a truncated or foreign
    file), or None. Images are decoded whole with Pillow, which (unlike OpenCV) refuses a
    truncated JPEG; videos must open and give a first frame."""
    if kind == "video":
        try:
            with storage.local_copy(path) as local:
                frames, _, _ = read_video(local)
                if next(frames, None) is None:
                    return "no readable frame"
                frames.close()
        except InputError as e:
            return str(e).split(": ", 1)[-1]
        return None
    try:
        with Image.open(io.BytesIO(storage.path(path).read_bytes())) as im:
            im.load()
    except Image.UnidentifiedImageError:
        return "not an image file Pillow knows (another kind of file, or damaged at the start)"
    except (OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        return f"{e} (a damaged or incomplete file?)"
    return None


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The inputs of a predict run, checked before any model loads.

    Attributes:
      items: ``[(kind, path, name)]`` of the readable images and videos (``list_inputs``).
      skipped: ``"path: why"`` of each file that cannot be read.
    """

    items: list[tuple[str, str, str]]
    skipped: list[str]

    @classmethod
    def find(cls, paths: Sequence[str], *, progress: bool = False) -> Inputs:
        """Lists ``paths`` (:func:`list_inputs`: a missing path or an unknown kind raises
        :class:`InputError`) and reads every file once, setting the unreadable ones aside."""
        from tqdm.auto import tqdm

        items, skipped = [], []
        listed = list_inputs(paths)
        for item in tqdm(listed, desc="checking inputs", unit="file", disable=not progress):
            why = unreadable(item[0], item[1])
            if why is None:
                items.append(item)
            else:
                skipped.append(f"{item[1]}: {why}")
        return cls(items, skipped)


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB, decoded as the data sources decode images."""
    from cbp_jax.data.sources import BadExampleError, decode_image

    try:
        return decode_image(storage.path(path).read_bytes(), path)
    except (OSError, BadExampleError) as e:
        raise InputError(f"cannot read the image {path}: {e}") from e


def label_image(classes: np.ndarray, fmt: str, palette: np.ndarray) -> Image.Image:
    """(H, W) class ids -> a PNG-ready image: ``"palette"`` an indexed-colour image whose
    pixel values are the ids, ``"ids"`` a grey uint8 (uint16 past 256 classes) image."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}; use one of {FORMATS}.")
    if fmt == "ids":
        dtype = np.uint8 if len(palette) <= 256 else np.uint16
        return Image.fromarray(classes.astype(dtype))
    if len(palette) > 256:
        raise ValueError(
            f"A palette PNG holds at most 256 classes, the model has {len(palette)}: use "
            "--format ids (16-bit ids)."
        )
    img = Image.fromarray(classes.astype(np.uint8), mode="P")
    img.putpalette(np.asarray(palette, np.uint8).ravel().tolist())
    return img


def overlay(
    image: np.ndarray, classes: np.ndarray, palette: np.ndarray, alpha: float
) -> np.ndarray:
    """uint8 (H, W, 3): ``(1 - alpha) * image + alpha * colour of the class``."""
    colour = figures.colorize(classes, palette).astype(np.float32)
    return np.rint((1 - alpha) * image.astype(np.float32) + alpha * colour).astype(np.uint8)


def read_video(path: str) -> tuple[Iterator[np.ndarray], float, int]:
    """``(frames, fps, frame count)``: uint8 (H, W, 3) RGB frames read with OpenCV's FFmpeg
    (the ``opencv-python-headless`` wheel ships it). Raises :class:`InputError`."""
    import cv2

    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        ffmpeg = "FFMPEG:                      YES" in cv2.getBuildInformation()
        hint = (
            "is it a video file, and complete?"
            if ffmpeg
            else "this OpenCV was built without FFmpeg: pip install opencv-python-headless"
        )
        raise InputError(f"cannot read the video {path}: {hint}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))

    def frames():
        try:
            while True:
                ok, frame = capture.read()
                if not ok:
                    return
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        finally:
            capture.release()

    return frames(), fps, count


class VideoWriter:
    """A video from uint8 (H, W, 3) RGB frames (OpenCV): ``fourcc`` ``"mp4v"`` (MPEG-4, for
    ``.mp4``) or ``"VP80"`` (VP8, for ``.webm``, which browsers play)."""

    def __init__(self, path: str, fps: float, size_hw: tuple[int, int], fourcc: str = "mp4v"):
        import cv2

        self._cv2 = cv2
        self.path = path
        self._writer = cv2.VideoWriter(
            path, cv2.VideoWriter_fourcc(*fourcc), fps, (size_hw[1], size_hw[0])
        )
        if not self._writer.isOpened():
            raise OSError(f"cannot write the video {path} (OpenCV's {fourcc} encoder).")

    def write(self, frame: np.ndarray) -> None:
        self._writer.write(self._cv2.cvtColor(frame, self._cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self._writer.release()


def predict_files(
    segmenter: Segmenter,
    inputs: Inputs | Sequence[str],
    out_dir: str,
    *,
    fmt: str = "palette",
    overlay_alpha: float = 0.5,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Writes label PNGs and overlays for images, folders and videos (``predict.py``).

    An image ``x`` gives ``<out>/<x>.png`` and ``<out>/<x>_overlay.jpg``; a video ``v`` gives
    ``<out>/<v>/frame_000000.png`` ... and ``<out>/<v>_overlay.mp4``. Every input is checked
    (it exists, its kind is known, it reads) before the first prediction; an unreadable file
    is skipped and named in the summary, the others are labelled.

    Args:
      segmenter: the model.
      inputs: image files, folders, video files, or their :class:`Inputs` (checked already).
      out_dir: output folder (created).
      fmt: ``"palette"`` (indexed-colour PNG whose values are the ids) or ``"ids"``.
      overlay_alpha: weight of the class colours in the overlays, in [0, 1].
      batch_size: video frames per call.
      progress: show progress bars.

    Returns:
      ``{"images": n, "videos": n, "frames": n, "written": [paths], "skipped": ["path: why"],
      "warnings": [lines]}`` (warnings: e.g. a video that ended before its announced length).
    """
    from tqdm.auto import tqdm

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; use one of {FORMATS}.")
    if not 0.0 <= overlay_alpha <= 1.0:
        raise ValueError(f"--overlay_alpha {overlay_alpha}; use a number in [0, 1].")
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size}; use an integer >= 1.")
    if not isinstance(inputs, Inputs):
        inputs = Inputs.find(inputs)
    items = inputs.items
    palette = segmenter.palette
    label_image(np.zeros((1, 1), np.int32), fmt, palette)  # a palette too small fails now
    summary: dict[str, Any] = {
        "images": 0, "videos": 0, "frames": 0, "written": [],
        "skipped": list(inputs.skipped), "warnings": [],
    }  # fmt: skip

    def save(classes, image, name):
        label_path = os.path.join(out_dir, name + ".png")
        _save_image(label_image(classes, fmt, palette), label_path, format="PNG")
        summary["written"].append(label_path)
        return overlay(image, classes, palette, overlay_alpha)

    images = [it for it in items if it[0] == "image"]
    for _, path, name in tqdm(images, desc="images", unit="image", disable=not progress):
        try:
            image = read_image(path)
        except InputError as e:  # readable when checked, not now (changed on disk?)
            summary["skipped"].append(f"{path}: {e}")
            continue
        shown = save(segmenter(image), image, name)
        overlay_path = os.path.join(out_dir, name + "_overlay.jpg")
        _save_image(Image.fromarray(shown), overlay_path, format="JPEG", quality=90)
        summary["written"].append(overlay_path)
        summary["images"] += 1
    for _, path, name in [it for it in items if it[0] == "video"]:
        frames, video_path, announced = _predict_video(
            segmenter, path, name, save, out_dir, batch_size, progress
        )
        if announced > frames:
            summary["warnings"].append(
                f"{path}: the video ended after {frames} of the {announced} frames its header "
                f"announces (a truncated file?); the {frames} frames read were labelled."
            )
        summary["written"].append(video_path)
        summary["videos"] += 1
        summary["frames"] += frames
    return summary


def _save_image(image: Image.Image, path: str, **params) -> None:
    """Writes ``image`` to ``path`` (local or ``gs://``), creating its folder."""
    file = storage.path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("wb") as f:
        image.save(f, **params)


def _predict_video(
    segmenter, path, name, save, out_dir, batch_size, progress
) -> tuple[int, str, int]:
    """Segments a video ``batch_size`` frames per call, saving each frame's labels through
    ``save`` and the overlays as ``<out>/<name>_overlay.mp4``; returns (frames, its path,
    the frame count its header announces, 0 if none).
    OpenCV reads and writes local files only: a ``gs://`` video is copied in and out."""
    from tqdm.auto import tqdm

    video_path = os.path.join(out_dir, name + "_overlay.mp4")
    with storage.local_copy(path) as local, storage.staged(video_path) as local_out:
        frames, fps, count = read_video(local)
        writer, index = None, 0
        bar = tqdm(
            total=count or None, desc=os.path.basename(path), unit="frame", disable=not progress
        )
        try:
            for chunk in _chunks(frames, batch_size):
                batch = np.stack(chunk)
                for frame, classes in zip(batch, segmenter(batch), strict=True):
                    shown = save(classes, frame, os.path.join(name, f"frame_{index:06d}"))
                    if writer is None:
                        writer = VideoWriter(local_out, fps, frame.shape[:2])
                    writer.write(shown)
                    index += 1
                bar.update(len(chunk))
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        if index == 0:
            raise InputError(f"cannot read the video {path}: it has no readable frame.")
    return index, video_path, count


def _chunks(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    chunk = []
    for frame in frames:
        if chunk and frame.shape != chunk[0].shape:  # a size change mid-stream
            yield chunk
            chunk = []
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
