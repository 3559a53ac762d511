r"""The demo page: drop an image or a short video, see the overlay, the classes and the time.

    python -m cbp_jax.serve --config configs/scenes_mit_b0.py --workdir workdirs/scenes_mit_b0
    python -m cbp_jax.serve --config configs/ade20k_mit_b0.py --weights FILE \
        --config.model.head=mlp --host 0.0.0.0 --port 8080

Needs ``pip install -e ".[demo]"`` (gradio). The model loads as ``predict.py`` loads it
(``--workdir`` / ``--step``, or ``--weights``; ``--config.*`` overrides) and runs as
:class:`cbp_jax.predict.Segmenter` runs (evaluation's preprocessing and inference mode). The
page shows the overlay (the class colours blended in with ``--overlay_alpha``), a legend of
the classes present (colour, name, share of the pixels, most first) and the model time. A
video's first ``--max_frames`` frames are segmented and shown as a WebM (VP8) overlay video
with one legend over those frames. A file the page cannot read shows as a message.
"""

from __future__ import annotations

import dataclasses
import html
import itertools
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Sequence

import numpy as np

from cbp_jax import compilation, predict
from cbp_jax.metrics import valid_label_mask

OVERLAY_ALPHA = 0.5
MAX_FRAMES = 150


@dataclasses.dataclass(frozen=True)
class LegendRow:
    """One class present in a prediction.

    Attributes:
      class_id: the class index.
      name: its name.
      colour: its (r, g, b) palette colour, 0..255.
      share: its fraction of the counted pixels, in (0, 1].
    """

    class_id: int
    name: str
    colour: tuple[int, int, int]
    share: float


def class_counts(classes: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Pixels per class: int ids of any shape (an image (H, W), frames (T, H, W)) -> int64
    (num_classes,); ``ignore_index`` and ids outside [0, num_classes) are not counted."""
    ids = np.asarray(classes).reshape(-1)
    return np.bincount(ids[valid_label_mask(ids, num_classes, ignore_index)], minlength=num_classes)


def legend_rows(
    counts: np.ndarray, class_names: Sequence[str], palette: np.ndarray
) -> list[LegendRow]:
    """The classes with pixels, most first (ties: lower id first).

    Args:
      counts: int (N,) pixels per class (:func:`class_counts`).
      class_names: N names.
      palette: uint8 (N, 3) colours.

    Returns:
      One :class:`LegendRow` per class with a count > 0; their shares sum to 1.
    """
    counts = np.asarray(counts)
    if not len(counts) == len(class_names) == len(palette):
        raise ValueError(
            f"legend_rows got {len(counts)} counts, {len(class_names)} class names and "
            f"{len(palette)} palette colours; pass one of each per class (the Segmenter's "
            "num_classes, class_names and palette)."
        )
    total = counts.sum()
    present = np.flatnonzero(counts)
    order = present[np.argsort(-counts[present], kind="stable")]
    return [
        LegendRow(
            class_id=int(i),
            name=str(class_names[i]),
            colour=tuple(int(v) for v in palette[i]),
            share=float(counts[i] / total),
        )
        for i in order
    ]


def share_text(share: float) -> str:
    """A share in [0, 1] as the page shows it: ``0.1234 -> "12.34 %"``."""
    return f"{100 * share:.2f} %"


def legend_html(rows: Sequence[LegendRow], caption: str) -> str:
    """The legend as an HTML table: a ``tr.legend-row`` per row (``data-class-id``) with a
    colour swatch, ``td.legend-name`` and ``td.legend-share`` (:func:`share_text`)."""
    body = "".join(
        f'<tr class="legend-row" data-class-id="{row.class_id}">'
        f'<td><span class="legend-swatch" style="display:inline-block;width:1.4em;height:1em;'
        f'border:1px solid #0004;background:#{bytes(row.colour).hex()}"></span></td>'
        f'<td class="legend-name">{html.escape(row.name)}</td>'
        f'<td class="legend-share" style="text-align:right">{share_text(row.share)}</td></tr>'
        for row in rows
    )
    return (
        f'<table class="legend"><caption>{html.escape(caption)}</caption>'
        "<thead><tr><th></th><th>class</th><th>pixels</th></tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


# ----------------------------------------------------------------------------- segmenting


@dataclasses.dataclass
class Result:
    """What the page shows for one upload.

    Attributes:
      message: the status line (Markdown).
      overlay: uint8 (H, W, 3) overlay of an image, or None.
      video: path of a video's overlay (WebM), or None.
      legend: the legend's HTML ("" when nothing was segmented).
    """

    message: str
    overlay: np.ndarray | None = None
    video: str | None = None
    legend: str = ""


def _timed(segmenter: predict.Segmenter, images: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """``(class ids, model milliseconds, whether XLA compiled during the call)``."""
    before = compilation.compiled()
    start = time.perf_counter()
    classes = segmenter(images)  # a NumPy array: the device work is done
    return classes, 1000 * (time.perf_counter() - start), compilation.compiled() > before


_COMPILED_NOTE = " (includes compiling for this image size; the next one of this size is faster)"


def segment_image(segmenter: predict.Segmenter, path: str, name: str, alpha: float) -> Result:
    """Segments the image file ``path`` (shown as ``name``). Raises ``predict.InputError``."""
    image = predict.read_image(path)
    classes, ms, compiled = _timed(segmenter, image)
    counts = class_counts(classes, segmenter.num_classes)
    rows = legend_rows(counts, segmenter.class_names, segmenter.palette)
    h, w = classes.shape
    return Result(
        message=f"**{name}**: {w} x {h} pixels, model time **{ms:.1f} ms**"
        + (_COMPILED_NOTE if compiled else ""),
        overlay=predict.overlay(image, classes, segmenter.palette, alpha),
        legend=legend_html(rows, f"Classes in {name}"),
    )


def frames_text(done: int, count: int, max_frames: int) -> str:
    """How much of a video was segmented: ``done`` frames of the ``count`` its header states
    (0 or less: unknown), at most ``max_frames``."""
    if done == max_frames and count != done:
        of = f" of {count}" if count > done else ""
        return f"the first {done}{of} frames (the page segments {max_frames} at most)"
    if count > done:
        return f"all {done} readable frames (the file says {count})"
    return f"all {done} frames"


def segment_video(
    segmenter: predict.Segmenter,
    path: str,
    name: str,
    alpha: float,
    max_frames: int,
    out_dir: str,
) -> Result:
    """Segments the first ``max_frames`` frames of the video file ``path`` into a WebM overlay
    video in ``out_dir``, with one legend over those frames. Raises ``predict.InputError``."""
    frames, fps, count = predict.read_video(path)
    out_path = os.path.join(out_dir, f"{uuid.uuid4().hex[:8]}_{name}_overlay.webm")
    counts = np.zeros(segmenter.num_classes, np.int64)
    writer, done, total_ms, compiled = None, 0, 0.0, False
    try:
        for frame in itertools.islice(frames, max_frames):
            classes, ms, new_compile = _timed(segmenter, frame)
            if writer is None:
                writer = predict.VideoWriter(out_path, fps, frame.shape[:2], fourcc="VP80")
            writer.write(predict.overlay(frame, classes, segmenter.palette, alpha))
            counts += class_counts(classes, segmenter.num_classes)
            total_ms, compiled, done = total_ms + ms, compiled or new_compile, done + 1
    finally:
        frames.close()
        if writer is not None:
            writer.close()
    if done == 0:
        raise predict.InputError(f"cannot read the video {path}: it has no readable frame.")
    rows = legend_rows(counts, segmenter.class_names, segmenter.palette)
    timing = f"model time **{total_ms / done:.1f} ms** per frame"
    return Result(
        message=f"**{name}**: {frames_text(done, count, max_frames)}, {timing}"
        + (_COMPILED_NOTE if compiled else ""),
        video=out_path,
        legend=legend_html(rows, f"Classes in {name}, over {done} frames"),
    )


def segment_upload(
    segmenter: predict.Segmenter,
    path: str | None,
    *,
    alpha: float = OVERLAY_ALPHA,
    max_frames: int = MAX_FRAMES,
    out_dir: str,
) -> Result:
    """What the page shows for an uploaded file: its overlay and legend, or a message saying
    why it cannot be segmented (an unknown kind of file, a file that does not decode)."""
    if path is None:
        return Result(message="")
    name = os.path.basename(path)
    suffix = os.path.splitext(name)[1].lower()
    try:
        if suffix in predict.IMAGE_SUFFIXES:
            return segment_image(segmenter, path, name, alpha)
        if suffix in predict.VIDEO_SUFFIXES:
            return segment_video(segmenter, path, name, alpha, max_frames, out_dir)
    except predict.InputError as e:  # the message names the upload's temporary path
        return Result(message=f"**Cannot segment this file**: {str(e).replace(path, name)}")
    return Result(
        message=f"**Cannot segment this file**: {name} is not an image or a video (its suffix "
        f"{suffix or '(none)'} is neither). Drop an image ({', '.join(predict.IMAGE_SUFFIXES)}) "
        f"or a video ({', '.join(predict.VIDEO_SUFFIXES)})."
    )


# ----------------------------------------------------------------------------- the page


def build_page(
    segmenter: predict.Segmenter,
    out_dir: str,
    *,
    alpha: float = OVERLAY_ALPHA,
    max_frames: int = MAX_FRAMES,
):
    """The gradio ``Blocks`` of the page; ``.launch(allowed_paths=[out_dir])`` serves it.
    Videos' overlays are written to ``out_dir``.

    Element ids: ``#upload`` (the file input), ``#status``, ``#overlay`` (an image's),
    ``#overlay-video`` (a video's), ``#legend``.
    """
    import gradio as gr

    def on_upload(path):
        result = segment_upload(
            segmenter, path, alpha=alpha, max_frames=max_frames, out_dir=out_dir
        )
        return (
            result.message,
            gr.update(value=result.overlay, visible=result.overlay is not None),
            gr.update(value=result.video, visible=result.video is not None),
            result.legend,
        )

    with gr.Blocks(
        title="cbp-jax demo", analytics_enabled=False, delete_cache=(3600, 3600)
    ) as page:
        gr.Markdown(
            f"## Semantic segmentation with frozen Category-Basis Prototypes\n"
            f"Model: `{segmenter.loaded_from}`, {segmenter.num_classes} classes. Drop an image "
            f"or a short video (its first {max_frames} frames are segmented)."
        )
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Image or video", type="filepath", elem_id="upload")
                legend = gr.HTML(elem_id="legend")
            with gr.Column():
                status = gr.Markdown(elem_id="status")
                image = gr.Image(
                    label="Overlay", format="png", interactive=False, visible=False,
                    elem_id="overlay",
                )  # fmt: skip
                video = gr.Video(
                    label="Overlay", interactive=False, visible=False, elem_id="overlay-video"
                )
        outputs = [status, image, video, legend]
        upload.upload(on_upload, inputs=upload, outputs=outputs)
        upload.clear(lambda: on_upload(None), outputs=outputs)
    return page


def _theme():
    """gradio's default look with the system's fonts (nothing loaded from the internet)."""
    import gradio as gr

    sans = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=sans, font_mono=["ui-monospace", "monospace"])


# ----------------------------------------------------------------------------- command line


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config_flags.DEFINE_config_file(
        "config", os.path.join(root, "configs", "scenes_mit_b0.py"), "Experiment config file."
    )
    flags.DEFINE_string("workdir", None, "The training workdir (default workdirs/<config>).")
    flags.DEFINE_integer("step", None, "Checkpoint step to serve (default: the latest).")
    flags.DEFINE_string("weights", None, "Serve these converted weights instead of a checkpoint.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
    flags.DEFINE_integer("port", 7860, "Port to listen on.")
    flags.DEFINE_float("overlay_alpha", OVERLAY_ALPHA, "Weight of the class colours, in [0, 1].")
    flags.DEFINE_integer("max_frames", MAX_FRAMES, "Frames of a video to segment (its first).")


def check_flags(f) -> None:
    """Raises ``SystemExit`` naming the flag, its value and the fix."""
    if f.weights and f.step is not None:
        raise SystemExit("error: pass --step (a checkpoint of --workdir) or --weights, not both.")
    if not 0.0 <= f.overlay_alpha <= 1.0:
        raise SystemExit(f"error: --overlay_alpha {f.overlay_alpha}; use a number in [0, 1].")
    if f.max_frames < 1:
        raise SystemExit(f"error: --max_frames {f.max_frames}; use an integer >= 1.")
    if not 0 <= f.port <= 65535:
        raise SystemExit(f"error: --port {f.port}; use a port in 0..65535.")


def _interrupt(signum, frame) -> None:
    """SIGTERM as Ctrl-C: gradio closes the server and the videos' folder is removed."""
    del signum, frame
    raise KeyboardInterrupt


def main(argv: list[str]) -> None:
    from absl import flags, logging

    from cbp_jax import config_checks, errors, storage
    from cbp_jax import workdir as workdir_lib

    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]}; see --help.")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    check_flags(f)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('error: the demo page needs gradio: pip install -e ".[demo]"') from None
    storage.use_emulator_if_set()
    config = f.config
    try:
        config_checks.validate(config)
        if f.weights:
            segmenter = predict.Segmenter.from_weights(config, f.weights)
        else:
            workdir = f.workdir or workdir_lib.default_workdir(f["config"].config_filename)
            segmenter = predict.Segmenter.from_workdir(config, workdir, f.step)
    except (*errors.STOP_ERRORS, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="cbp_serve_") as out_dir:
        page = build_page(segmenter, out_dir, alpha=f.overlay_alpha, max_frames=f.max_frames)
        print(f"Serving {segmenter.loaded_from} at http://{f.host}:{f.port}", flush=True)
        try:
            page.launch(
                server_name=f.host,
                server_port=f.port,
                theme=_theme(),
                ssr_mode=False,
                allowed_paths=[out_dir],
                footer_links=[],
            )
        except OSError as e:
            raise SystemExit(
                f"error: cannot serve on {f.host}:{f.port} ({e}); pass another --port."
            ) from None


if __name__ == "__main__":
    from absl import app

    from cbp_jax import config_checks

    _define_flags()
    app.run(main, flags_parser=config_checks.parse_flags)
