"""Trains a segmentation model with frozen Category-Basis Prototypes and OCCL.

    python train.py                                     # built-in default (generated scenes)
    python train.py --config configs/ade20k_mit_b5.py --workdir workdirs/ade20k_b5
    python train.py --config configs/camvid_mit_b0.py:smoke --config.total_steps=20

Rerunning the same command resumes from the workdir's last checkpoint.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from cbp_jax import trainer

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
    trainer.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    app.run(main)
