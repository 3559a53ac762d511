"""Trains a segmentation model with frozen Category-Basis Prototypes and OCCL.

    python train.py                                     # built-in default (generated scenes)
    python train.py --config configs/ade20k_mit_b5.py --workdir workdirs/ade20k_b5
    python train.py --config configs/camvid_mit_b0.py:smoke --config.total_steps=20

Rerunning the same command resumes from the workdir's last checkpoint.
"""

from cbp_jax import preemption

preemption.watch()  # before the heavy imports: a SIGTERM during start-up exits cleanly

import os  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cbp_jax import config_checks, trainer  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "scenes_mit_b0.py"), "Experiment config file."
)
flags.DEFINE_string("workdir", None, "Checkpoints, logs and reports (default workdirs/<config>).")


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep the progress bar readable
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or os.path.join(
        "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    )
    try:
        config_checks.validate(config)
        trainer.train_and_evaluate(config, workdir)
    except trainer.STOP_ERRORS as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
