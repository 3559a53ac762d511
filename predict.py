r"""Predicts label maps for new images, folders of images and videos with a trained model.

    python predict.py --config configs/scenes_mit_b0.py --workdir workdirs/scenes_mit_b0 \
        photo.jpg more_photos/ clip.mp4 --out predictions
    python predict.py --config configs/ade20k_mit_b0.py --weights segformer-b0-ade.safetensors \
        --config.model.head=mlp --format ids --out predictions street.png

Each image ``x`` gives ``<out>/x.png`` (``--format palette``: an indexed-colour PNG whose pixel
values are the class ids; ``ids``: grey uint8 ids, uint16 past 256 classes) and
``<out>/x_overlay.jpg`` (the image with the class colours blended in, ``--overlay_alpha``).
A folder's images (recursively) keep their path below it. A video ``v`` gives one PNG per
frame in ``<out>/v/`` and ``<out>/v_overlay.mp4``. Preprocessing and inference mode
(whole / slide, ratios, flip) are those of evaluation (``config.data``, ``config.eval``).
"""

from cbp_jax import storage

storage.use_emulator_if_set()  # STORAGE_EMULATOR_HOST set: every GCS client to the emulator

import os  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cbp_jax import config_checks, errors  # noqa: E402
from cbp_jax import predict as predict_lib  # noqa: E402
from cbp_jax import workdir as workdir_lib  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "scenes_mit_b0.py"), "Experiment config file."
)
flags.DEFINE_string("workdir", None, "The training workdir (default workdirs/<config>).")
flags.DEFINE_integer("step", None, "Checkpoint step to use (default: the latest).")
flags.DEFINE_string("weights", None, "Use these converted weights instead of a checkpoint.")
flags.DEFINE_string("out", None, "Output folder (required).")
flags.DEFINE_enum("format", "palette", list(predict_lib.FORMATS), "Label PNG format.")
flags.DEFINE_float("overlay_alpha", 0.5, "Weight of the class colours in the overlays.")
flags.DEFINE_integer("batch_size", 1, "Video frames per model call.")


def main(argv):
    inputs = argv[1:]
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not inputs or not flags.FLAGS.out:
        raise SystemExit(
            "error: pass the images, folders or videos to segment and --out DIR, e.g. "
            "python predict.py --config CONFIG --workdir W photo.jpg --out predictions"
        )
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or workdir_lib.default_workdir(
        flags.FLAGS["config"].config_filename
    )
    try:
        config_checks.validate(config)
        storage.check_writable(flags.FLAGS.out, "folder")
        found = predict_lib.Inputs.find(inputs, progress=True)  # before the model loads
        for line in found.skipped:
            print(f"skipped: {line}")
        if not found.items:
            raise SystemExit(
                f"error: no input can be read ({len(found.skipped)} skipped, named above)."
            )
        if flags.FLAGS.weights:
            segmenter = predict_lib.Segmenter.from_weights(config, flags.FLAGS.weights)
        else:
            segmenter = predict_lib.Segmenter.from_workdir(config, workdir, flags.FLAGS.step)
        print(f"Predicting with {segmenter.loaded_from}")
        summary = predict_lib.predict_files(
            segmenter,
            found,
            flags.FLAGS.out,
            fmt=flags.FLAGS.format,
            overlay_alpha=flags.FLAGS.overlay_alpha,
            batch_size=flags.FLAGS.batch_size,
        )
    except (*errors.STOP_ERRORS, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    for line in summary["warnings"]:
        print(f"warning: {line}")
    print(
        f"{summary['images']} images, {summary['videos']} videos ({summary['frames']} frames) "
        f"-> {flags.FLAGS.out}"
    )
    if summary["skipped"]:
        late = summary["skipped"][len(found.skipped) :]
        for line in late:
            print(f"skipped: {line}")
        skipped = len(summary["skipped"])
        total = skipped + summary["images"] + summary["videos"]
        raise SystemExit(
            f"error: {skipped} of {total} inputs could not be read and were skipped (named "
            "above); the others were labelled."
        )


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
