"""The errors that stop a run with a complete message: what happened, what was kept, the fix.

The entry points (``train.py``, ``eval.py``, ``predict.py``, ``export.py``) print an error of
:data:`STOP_ERRORS` as one line, without a traceback; anything else is a bug and keeps its
traceback.
"""

from cbp_jax.checkpointing import CheckpointSaveError, NoUsableCheckpointError
from cbp_jax.config_checks import ConfigError
from cbp_jax.data.sources import LayoutError
from cbp_jax.workdir import ConfigMismatchError, WorkdirBusyError


class NonFiniteLossError(RuntimeError):
    """The loss or an update became NaN or infinite; the last periodic checkpoint is kept."""


class BadTrainingDataError(RuntimeError):
    """A bad data file was met mid-run; the state before its batch was saved."""


class WeightsFileError(ValueError):
    """A weights file (``--weights``, ``config.init_from``) that cannot be loaded into the
    model: unreadable, another format, or another architecture (the message says which)."""


STOP_ERRORS = (
    WeightsFileError,
    ConfigError,
    LayoutError,
    WorkdirBusyError,
    ConfigMismatchError,
    NonFiniteLossError,
    BadTrainingDataError,
    CheckpointSaveError,
    NoUsableCheckpointError,
)
