r"""Exports a trained model to run without this code.

    python export.py --config configs/scenes_mit_b0.py --workdir workdirs/scenes_mit_b0 \
        --to jax --out scenes.jaxexport                   # jax.export artifact (+ .json)
    python export.py --config configs/ade20k_mit_b0.py --workdir W --config.model.head=mlp \
        --to hf --out segformer_cbp/                      # transformers folder
    python export.py --config configs/ade20k_swin_base.py --workdir W \
        --to mmseg --out upernet_swin_cbp.pth             # mmsegmentation 1.x checkpoint
    python export.py --config configs/ade20k_mit_b0.py --workdir W \
        --to onnx --out segformer.onnx [--fp16]           # ONNX file (+ .json)

``--to jax`` writes the whole-image network at a fixed size (``--height``/``--width``,
default ``config.data.crop_size``) for any batch, weights included, lowered for
``--platforms`` (default cpu and cuda); load it with only jax:
``jax.export.deserialize(bytearray(open(path, "rb").read())).call(images_uint8)`` ->
logits (B, H, W, N). ``--to hf`` (a SegFormer trained with ``--config.model.head=mlp``,
UperNet-ConvNeXt or UperNet-Swin) writes a ``SegformerForSemanticSegmentation`` /
``UperNetForSemanticSegmentation`` folder, CBP prototypes as its classifier, which
``from_pretrained(DIR)`` serves in PyTorch. ``--to mmseg`` (every paper model) writes an
mmsegmentation 1.x checkpoint and prints the mmseg model config that loads it. ``--to onnx``
writes the ``--to jax`` network (fixed H, W; any batch) as an ONNX file that onnxruntime
runs (``--fp16``: float16 weights and compute, float32 output). All load the
model as ``predict.py`` does (``--workdir`` / ``--step`` or ``--weights``).
"""

from cbp_jax import storage

storage.use_emulator_if_set()  # STORAGE_EMULATOR_HOST set: every GCS client to the emulator

import os  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cbp_jax import config_checks, errors  # noqa: E402
from cbp_jax import export as export_lib  # noqa: E402
from cbp_jax import predict as predict_lib  # noqa: E402
from cbp_jax import workdir as workdir_lib  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "scenes_mit_b0.py"), "Experiment config file."
)
flags.DEFINE_string("workdir", None, "The training workdir (default workdirs/<config>).")
flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
flags.DEFINE_string("weights", None, "Export these converted weights instead of a checkpoint.")
flags.DEFINE_enum("to", "jax", list(export_lib.TARGETS), "Export target (see above).")
flags.DEFINE_string("out", None, "Output file (--to jax, mmseg, onnx), folder (--to hf); required.")
flags.DEFINE_integer("height", None, "Fixed input height where a target needs one (default: crop).")
flags.DEFINE_integer("width", None, "Fixed input width where a target needs one (default: crop).")
flags.DEFINE_list("platforms", ["cpu", "cuda"], "--to jax: platforms to lower for.")
flags.DEFINE_bool("fp16", False, "--to onnx: float16 weights and compute (float32 output).")


def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {argv[1:]}; see python export.py --help.")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    if not f.out:
        raise SystemExit("error: pass --out (a file for --to jax / mmseg, a folder for --to hf).")
    if f.fp16 and f.to != "onnx":
        raise SystemExit(f"error: --fp16 is for --to onnx (got --to {f.to}); drop --fp16.")
    config = f.config
    workdir = f.workdir or workdir_lib.default_workdir(f["config"].config_filename)
    target = export_lib.TARGETS[f.to]
    try:
        config_checks.validate(config)
        target.check(config)  # before loading anything
        storage.check_writable(f.out, target.OUT_KIND)
        if f.weights:
            segmenter = predict_lib.Segmenter.from_weights(config, f.weights)
        else:
            segmenter = predict_lib.Segmenter.from_workdir(config, workdir, f.step)
        print(f"Exporting {segmenter.loaded_from}")
        size = (f.height, f.width) if f.height or f.width else None
        if size is not None and None in size:
            raise ValueError("pass both --height and --width, or neither (the crop size).")
        request = export_lib.Request(f.out, size_hw=size, platforms=f.platforms, fp16=f.fp16)
        for line in target.run(segmenter, request):
            print(line)
    except (
        *errors.STOP_ERRORS,
        FileNotFoundError,
        ValueError,
        export_lib.MissingDependencyError,
        storage.OutputPathError,
    ) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
