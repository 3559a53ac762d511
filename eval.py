"""Evaluates a trained model: mmseg-exact mIoU / mAcc / aAcc, a per-class table, a JSON
report, example panels and the paper's prototype analyses.

    python eval.py --config configs/ade20k_mit_b5.py --workdir workdirs/ade20k_b5
    python eval.py --config configs/ade20k_convnext_base.py --workdir W --config.eval.flip=True \
        --config.eval.ratios='(0.5,0.75,1.0,1.25,1.5,1.75)'          # multi-scale + flip
    python eval.py --config configs/ade20k_mit_b0.py --weights segformer-b0-ade.safetensors \
        --config.model.head=mlp                                       # a converted checkpoint

Without ``--weights`` the workdir's latest checkpoint (or ``--step``) is evaluated. The
report goes to ``<workdir>/eval_<step>/`` unless ``--out`` says otherwise.
"""

from cbp_jax import cpu

cpu.use_cores_as_devices()  # before JAX starts: data parallelism over the cores of a CPU host

import os  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cbp_jax import config_checks, eval_lib, trainer  # noqa: E402
from cbp_jax import workdir as workdir_lib  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "scenes_mit_b0.py"), "Experiment config file."
)
flags.DEFINE_string("workdir", None, "The training workdir (default workdirs/<config>).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("weights", None, "Evaluate these pretrained weights instead of a checkpoint.")
flags.DEFINE_string("out", None, "Report folder (default <workdir>/eval_<step>).")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join(
        "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    )
    try:
        config_checks.validate(config)
        if not flags.FLAGS.weights:  # before compiling anything or creating a folder
            workdir_lib.check_evaluable(workdir, config, flags.FLAGS.step)
    except (*trainer.STOP_ERRORS, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    metrics = eval_lib.evaluate_checkpoint(
        config, workdir, step=flags.FLAGS.step, weights=flags.FLAGS.weights, out_dir=flags.FLAGS.out
    )
    print(f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
