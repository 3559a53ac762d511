r"""Evaluates a trained model: mmseg-exact mIoU / mAcc / aAcc, a per-class table, a JSON
report, example panels and the paper's prototype analyses.

    python eval.py --config configs/ade20k_mit_b5.py --workdir workdirs/ade20k_b5
    python eval.py --config configs/ade20k_convnext_base.py --workdir W --config.eval.flip=True \
        --config.eval.ratios='(0.5,0.75,1.0,1.25,1.5,1.75)'          # multi-scale + flip
    python eval.py --config configs/ade20k_mit_b0.py --weights segformer-b0-ade.safetensors \
        --config.model.head=mlp                                       # a converted checkpoint

Without ``--weights`` the workdir's latest checkpoint (or ``--step``) is evaluated. The
report goes to ``<workdir>/eval_<step>/`` (``eval_weights/`` for ``--weights``), the folder
training writes for the same step, unless ``--out`` says otherwise. The workdir defaults to
``workdirs/<config>[_<variants>]``, as for ``train.py``.
"""

from cbp_jax import cpu, storage

cpu.use_cores_as_devices()  # before JAX starts: data parallelism over the cores of a CPU host
storage.use_emulator_if_set()  # STORAGE_EMULATOR_HOST set: every GCS client to the emulator

import os  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cbp_jax import config_checks, errors, eval_lib, logs  # noqa: E402
from cbp_jax import workdir as workdir_lib  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "scenes_mit_b0.py"), "Experiment config file."
)
flags.DEFINE_string(
    "workdir", None, "The training workdir (default workdirs/<config>[_<variants>])."
)
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_string("weights", None, "Evaluate these pretrained weights instead of a checkpoint.")
flags.DEFINE_string("out", None, "Report folder (default <workdir>/eval_<step>).")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logs.quiet_libraries()
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or workdir_lib.default_workdir(
        flags.FLAGS["config"].config_filename
    )
    step, weights = flags.FLAGS.step, flags.FLAGS.weights
    try:
        config_checks.validate(config)
        if not weights:  # before compiling anything or creating a folder
            workdir_lib.check_evaluable(workdir, config, step)
        # The per-class table and the summary line are printed by the evaluation, once.
        result = eval_lib.evaluate_checkpoint(
            config, workdir, step=step, weights=weights, out_dir=flags.FLAGS.out
        )
    except (*errors.STOP_ERRORS, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if jax.process_index() == 0:
        print(f"Report: {os.path.join(result['out_dir'], 'report.json')}")


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
