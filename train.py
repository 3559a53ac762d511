"""Trains a segmentation model with frozen Category-Basis Prototypes and OCCL.

    python train.py                                     # built-in default (generated scenes)
    python train.py --config configs/scenes_mit_b0.py:smoke            # seconds, same code
    python train.py --config configs/camvid_mit_b0.py --config.data.root=DIR/CamVid
    python train.py --config configs/ade20k_mit_b5.py --config.data.root=DIR/ADEChallengeData2016

The workdir defaults to workdirs/<config>[_<variants>] (e.g. workdirs/camvid_mit_b0_smoke).
Rerunning the same command resumes from the workdir's last checkpoint; a run that is already
trained and evaluated says so and stops. Logs: start-up, then every config.log_every steps
the metrics, steps/s, images/s and the ETA (--verbosity=0 shows every library's INFO logs).
"""

from cbp_jax import cpu, preemption, storage

# Before the heavy imports: a Ctrl-C or SIGTERM during start-up (nothing to save yet) stops
# the process at once, even in the middle of a compilation; later ones save a checkpoint.
preemption.watch(stop_at_once=True)
cpu.use_cores_as_devices()  # before JAX starts: data parallelism over the cores of a CPU host
storage.use_emulator_if_set()  # STORAGE_EMULATOR_HOST set: every GCS client to the emulator

import os  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cbp_jax import config_checks, errors, logs, trainer  # noqa: E402
from cbp_jax import workdir as workdir_lib  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "scenes_mit_b0.py"), "Experiment config file."
)
flags.DEFINE_string(
    "workdir", None, "Checkpoints, logs and reports (default workdirs/<config>[_<variants>])."
)


def main(argv):
    del argv
    if not flags.FLAGS["verbosity"].present:
        logs.quiet_libraries()
    config = flags.FLAGS.config
    workdir = flags.FLAGS.workdir or workdir_lib.default_workdir(
        flags.FLAGS["config"].config_filename
    )
    try:
        config_checks.validate(config)
        trainer.train_and_evaluate(config, workdir)
    except errors.STOP_ERRORS as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main, flags_parser=config_checks.parse_flags)
