"""What a run reports: clu metric writers, progress with ETA and throughput, quiet logs.

- :func:`create_writer`: a clu ``MultiWriter`` of the absl log (``LoggingWriter``),
  ``<workdir>/metrics.jsonl`` (:class:`JsonlWriter`) and TensorBoard
  (:class:`TensorboardWriter`, tensorboardX), all behind clu's ``MetricWriter`` interface
  (``write_scalars``, ``write_images``, ``write_hparams``).
- :class:`ReportProgress`: clu's ``periodic_actions.ReportProgress`` (steps/s, ETA), plus
  images/s in total and per device. It is called after every step; its first call only
  starts the clock, so the step that compiled is in neither the rate nor the ETA.
- :func:`quiet_libraries`: INFO logs of cbp_jax and clu only; other libraries (Orbax, JAX)
  from WARNING up.

clu without TensorFlow: ``clu.metric_writers`` imports its TensorFlow ``SummaryWriter``
when it is imported, so this module first registers :class:`TensorboardWriter` (which needs
only tensorboardX) as ``clu.metric_writers.summary_writer``. TensorFlow is then never
imported, and ``metric_writers.create_default_writer(logdir)`` writes TensorBoard files
through tensorboardX too.
"""

from __future__ import annotations

import itertools
import json
import logging as std_logging
import os
import sys
import types
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from cbp_jax import storage


def _install_tensorboardx_summary_writer() -> None:
    """Makes ``clu.metric_writers`` importable without TensorFlow (see the module doc)."""
    name = "clu.metric_writers.summary_writer"
    if "clu.metric_writers" in sys.modules or name in sys.modules:
        return  # imported already (with TensorFlow, or by this module)
    module = types.ModuleType(name)
    module.__doc__ = "cbp_jax.logs: TensorBoard summaries through tensorboardX (no TensorFlow)."
    module.SummaryWriter = lambda logdir: TensorboardWriter(logdir)
    sys.modules[name] = module


_install_tensorboardx_summary_writer()

from clu import metric_writers, periodic_actions  # noqa: E402

# ----------------------------------------------------------------------------- writers


class JsonlWriter(metric_writers.MetricWriter):
    """Scalars to a ``metrics.jsonl`` file: one JSON object per step, ``{"step": s, ...}``.

    The file stays valid JSON with one row per step: non-finite values are written as
    ``null``, and scalars written for the step of the last row join that row. A local file
    grows by one appended line per row; an object store has no appends, so there (and to
    join a row) the file is replaced whole from the rows kept in memory. A run resuming at
    ``resume_step`` first drops the rows after it (steps it will redo); a line cut short by
    a kill is dropped too. Images and hyperparameters are not written (``config.json``
    holds the config).

    Args:
      path: the ``.jsonl`` file, local or ``gs://`` (created if absent; its rows are kept).
      resume_step: the step a resumed run restarts from, or None.
    """

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = storage.path(path)
        self._rows = [
            row
            for row in read_metric_rows(self.path)
            if resume_step is None or row["step"] <= resume_step
        ]
        self._lines = [json.dumps(row) + "\n" for row in self._rows]
        if resume_step is not None:
            self._save()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        row = {"step": int(step), **{k: _json_number(v) for k, v in scalars.items()}}
        joined = bool(self._rows) and self._rows[-1]["step"] == row["step"]
        if joined:  # the step's row gets the new scalars
            row = self._rows.pop() | row
            self._lines.pop()
        self._rows.append(row)
        self._lines.append(json.dumps(row, allow_nan=False) + "\n")
        if storage.is_local(self.path) and not joined:
            with self.path.open("a") as f:
                f.write(self._lines[-1])
        else:
            self._save()

    def _save(self) -> None:
        storage.write_text(self.path, "".join(self._lines))

    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata

    def write_images(self, step, images) -> None:
        del step, images

    def write_videos(self, step, videos) -> None:
        del step, videos

    def write_audios(self, step, audios, *, sample_rate) -> None:
        del step, audios, sample_rate

    def write_texts(self, step, texts) -> None:
        del step, texts

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        del step, arrays, num_buckets

    def write_hparams(self, hparams) -> None:
        del hparams

    def flush(self) -> None:
        pass  # every write reaches the file at once

    def close(self) -> None:
        pass


def _json_number(value) -> float | None:
    """``value`` as a float, or None (JSON ``null``) for NaN and infinities."""
    value = float(value)
    return value if np.isfinite(value) else None


def read_metric_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (local or ``gs://``); [] if there is none. A line cut
    short by a kill is left out."""
    path = storage.path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the partial last line of a killed run
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


class TensorboardWriter(metric_writers.MetricWriter):
    """TensorBoard event files through tensorboardX (no TensorFlow).

    Args:
      logdir: the event-file folder.
      purge_step: a resumed run's first step: TensorBoard hides the events of earlier runs
        from this step on (they are redone), so no step shows twice.
    """

    _count = itertools.count()

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        # tensorboardX names files by the second and opens them with "wb": a second writer
        # in the same second would empty the first's file without the suffix.
        suffix = f".{os.getpid()}.{next(self._count)}"
        self._writer = SummaryWriter(logdir, purge_step=purge_step, filename_suffix=suffix)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), int(step))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """``images``: ``{name: (H, W, C) or (N, H, W, C)}`` uint8 or float in [0, 1]."""
        for name, image in images.items():
            image = np.asarray(image)
            if image.ndim == 4:
                self._writer.add_images(name, image, int(step), dataformats="NHWC")
            else:
                self._writer.add_image(name, image, int(step), dataformats="HWC")

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for name, text in texts.items():
            self._writer.add_text(name, text, int(step))

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        for name, values in arrays.items():
            bins = (num_buckets or {}).get(name)
            self._writer.add_histogram(name, np.asarray(values), int(step), max_bins=bins)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Hyperparameters for TensorBoard's HPARAMS tab, in this run's event file."""
        from tensorboardX.summary import hparams as hparams_summary

        values = {
            k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in hparams.items()
        }
        for summary in hparams_summary(values, {}):
            self._writer.file_writer.add_summary(summary)

    def write_summaries(self, step, values, metadata=None) -> None:
        del step, values, metadata
        logging.log_first_n(logging.WARNING, "TensorboardWriter writes no raw summaries.", 1)

    def write_videos(self, step, videos) -> None:
        del step, videos
        logging.log_first_n(logging.WARNING, "TensorboardWriter writes no videos.", 1)

    def write_audios(self, step, audios, *, sample_rate) -> None:
        for name, audio in audios.items():
            self._writer.add_audio(name, np.asarray(audio), int(step), sample_rate=sample_rate)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


METRICS_NAME = "metrics.jsonl"
TENSORBOARD_NAME = "tensorboard"


def create_writer(workdir: str, resume_step: int | None = None) -> metric_writers.MultiWriter:
    """The run's writer: the absl log, ``<workdir>/metrics.jsonl`` and
    ``<workdir>/tensorboard/``; on processes other than 0 the log only.

    Args:
      workdir: the run's folder (exists).
      resume_step: the step a resumed run restarts from (0 for a fresh start), or None.
        Rows and TensorBoard events after it are dropped or hidden: that run redoes them.
    """
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([metric_writers.LoggingWriter()])
    purge = None if resume_step is None else resume_step + 1
    return metric_writers.MultiWriter(
        [
            metric_writers.LoggingWriter(),
            JsonlWriter(os.path.join(workdir, METRICS_NAME), resume_step),
            TensorboardWriter(os.path.join(workdir, TENSORBOARD_NAME), purge_step=purge),
        ]
    )


# ----------------------------------------------------------------------------- progress


def throughput(steps: int, seconds: float, batch_size: int, num_devices: int) -> dict[str, float]:
    """Steps/s, images/s and images/s per device of ``steps`` steps of ``batch_size`` images
    (global) that took ``seconds`` on ``num_devices`` devices."""
    steps_per_sec = steps / seconds
    images_per_sec = steps_per_sec * batch_size
    return {
        "steps_per_sec": steps_per_sec,
        "images_per_sec": images_per_sec,
        "images_per_sec_per_device": images_per_sec / num_devices,
    }


class ReportProgress(periodic_actions.ReportProgress):
    """clu's progress report (a log line with steps/s, % done and ETA) that also measures
    throughput: after a call that returns True, :attr:`rates` holds :func:`throughput` of
    the steps since the previous report, without the time spent in ``timed`` blocks (e.g.
    ``with progress.timed("eval", wait_jax_async_dispatch=False):``), which the ETA keeps.

    Call it after every step (``progress(step)``). The first call only starts the clock:
    call it after the first step of a process, the one that compiled, and compilation is
    in neither the rate nor the ETA.

    Args:
      num_train_steps: the run's last step.
      batch_size: the global batch size.
      num_devices: devices the batch is split over.
      every_steps: report every this many steps (and at ``num_train_steps``).
    """

    def __init__(
        self, *, num_train_steps: int, batch_size: int, num_devices: int, every_steps: int
    ):
        super().__init__(num_train_steps=num_train_steps, every_steps=every_steps, every_secs=None)
        self.batch_size, self.num_devices = batch_size, num_devices
        self.rates: dict[str, float] = {}
        self._timed_at_last_report = 0.0

    def _apply(self, step: int, t: float) -> None:
        timed = sum(self._time_per_part.values())
        seconds = t - self._previous_time - (timed - self._timed_at_last_report)
        self._timed_at_last_report = timed
        self.rates = throughput(
            step - self._previous_step, seconds, self.batch_size, self.num_devices
        )
        super()._apply(step, t)


# ----------------------------------------------------------------------------- absl logs


class _OwnInfoOnly:
    """A logging filter: INFO records from ``folders`` only; WARNING and up from anywhere."""

    def __init__(self, folders: tuple[str, ...]):
        self.folders = folders

    def filter(self, record) -> bool:
        return record.levelno >= std_logging.WARNING or record.pathname.startswith(self.folders)


def quiet_libraries() -> None:
    """Logs at INFO what cbp_jax and clu say (start-up, progress, metrics) and only warnings
    and errors of other libraries (Orbax logs every checkpoint step at INFO)."""
    import clu

    folders = tuple(
        os.path.dirname(os.path.abspath(m.__file__)) + os.sep
        for m in (sys.modules[__package__], clu)
    )
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    handler.filters = [f for f in handler.filters if not isinstance(f, _OwnInfoOnly)]
    handler.addFilter(_OwnInfoOnly(folders))
