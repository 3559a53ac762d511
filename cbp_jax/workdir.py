"""A workdir's ownership and identity: one training run at a time, and the config it holds.

- :func:`acquire_lock`: ``<workdir>/train.lock``, held by process 0 of the training run. A
  second run stops at once naming the holder. A local workdir's is an exclusive ``flock``
  (:class:`WorkdirLock`): the kernel releases it when its holder dies (kill -9 included),
  and the next run takes it over with a warning naming the dead holder. A ``gs://``
  workdir's is a lease object (``cbp_jax.lease``) renewed by a heartbeat; a dead holder's
  lease is taken over after ``config.workdir_lease_timeout`` seconds without one (at once
  from the holder's own machine).
- :func:`check_resume_config` / :func:`check_eval_config`: the workdir's ``config.json``
  against the current config, before anything is written or restored.
- Names: :func:`default_workdir` (``workdirs/<config>[_<variants>]``), :func:`eval_dir`
  (``<workdir>/eval_<step>``, written by training and ``eval.py`` alike) and
  :func:`finished_report` (a run trained to its last step and evaluated there).
"""

import datetime
import fcntl
import json
import os
import re
import socket
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from cbp_jax import lease as lease_lib
from cbp_jax import storage

LOCK_NAME = "train.lock"
CONFIG_NAME = "config.json"

# Fields that may change when a run resumes: how long it runs, how often it logs, saves
# and evaluates, where its data lives and how it is read, the devices, and the two knobs a
# non-finite stop advises turning.
RESUMABLE_FIELDS = (
    "total_steps",
    "log_every",
    "eval",
    "checkpoint",
    "mesh",
    "distributed",
    "partition_rules",
    "init_from",
    "trust_pickle",
    "data.root",
    "data.format",
    "data.num_workers",
    "data.skip_bad_examples",
    "optimizer.lr",
    "optimizer.clip_norm",
    "workdir_lease_timeout",
    "model.remat",
)
# Fields that decide what a checkpoint holds: evaluation needs them to match.
CHECKPOINT_SHAPE_FIELDS = ("model", "data.dataset", "data.num_classes", "optimizer.name")
# Model fields that change how the model computes, not the weights it holds: evaluation
# restores across them (``factories.restore`` converts the block layout of scan_blocks).
LAYOUT_FIELDS = ("model.scan_blocks", "model.remat")


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


class ConfigMismatchError(ValueError):
    """The config differs from the one the workdir was trained with."""


# ----------------------------------------------------------------------------- the lock


class WorkdirLock:
    """An exclusive, crash-safe lock on ``<workdir>/train.lock``.

    Args:
      workdir: the training workdir (must exist).

    The file records the holder (``{"pid", "host", "since"}``); a clean release empties it,
    so a non-empty file found with the lock free was left by a holder that died.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirBusyError(_busy(os.path.dirname(self.path), _describe(holder))) from None
        previous = _read_holder(fd)
        if previous:
            logging.warning(
                "Taking over %s: its holder, %s, ended without releasing it (killed?).",
                self.path,
                _describe(previous),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"pid": "?", "host": "?", "since": f"(unreadable lock file: {raw[:40]!r})"}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def _busy(workdir: epath.PathLike, holder: str) -> str:
    return (
        f"{workdir} is in use by {holder}. One workdir has one training run: wait for that "
        "run to end or stop it, or pass another --workdir."
    )


def acquire_lock(
    workdir: epath.PathLike, *, lease_timeout: float
) -> WorkdirLock | lease_lib.GcsLease:
    """Takes the lock of ``workdir`` (which must exist if local): a :class:`WorkdirLock` for a
    local folder, a ``cbp_jax.lease.GcsLease`` on ``<workdir>/train.lock`` for ``gs://``
    (taken over from a holder without a heartbeat for ``lease_timeout`` seconds). Call
    ``release()`` on the result.

    Raises:
      WorkdirBusyError: another live run holds it.
    """
    if storage.is_local(workdir):
        return WorkdirLock(os.fspath(workdir)).acquire()
    url = os.fspath(storage.path(workdir) / LOCK_NAME)
    if not url.startswith("gs://"):
        raise ValueError(
            f"--workdir {workdir}: a workdir is a local folder or a gs:// URL (the lock of a "
            "workdir in an object store is a GCS lease with generation preconditions)."
        )
    try:
        return lease_lib.GcsLease(url, timeout_s=lease_timeout).acquire()
    except lease_lib.LeaseHeldError as e:
        raise WorkdirBusyError(
            _busy(workdir, lease_lib.describe(e.holder))
            + f" If that run is dead, its lease expires {lease_timeout:g} s after its last "
            "heartbeat (--config.workdir_lease_timeout)."
        ) from None


# ----------------------------------------------------------------------------- the config


def config_as_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (tuples become lists), as ``config.json`` stores it."""
    return json.loads(config.to_json_best_effort())


def flat_fields(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer.lr": 6e-5, ...}``: every leaf of a nested dict by its dotted path."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flat_fields(value, f"{name}.")
        else:
            out[name] = value
    return out


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple]:
    """``{dotted field: (saved value, current value)}`` of every field that differs.

    A field present on one side only is reported with ``"<absent>"`` on the other.
    """
    old, new = flat_fields(saved), flat_fields(current)
    absent = "<absent>"
    return {
        name: (old.get(name, absent), new.get(name, absent))
        for name in sorted(old.keys() | new.keys())
        if old.get(name, absent) != new.get(name, absent)
    }


def _under(name: str, fields: tuple[str, ...]) -> bool:
    return any(name == f or name.startswith(f + ".") for f in fields)


def read_saved_config(workdir: epath.PathLike) -> dict[str, Any] | None:
    """The workdir's ``config.json`` (None when there is none)."""
    path = storage.path(workdir) / CONFIG_NAME
    if not path.exists():
        return None
    return json.loads(path.read_text())


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigMismatchError` if resuming ``workdir`` would change a field
    outside :data:`RESUMABLE_FIELDS`. A workdir without a checkpoint is a fresh start."""
    saved = read_saved_config(workdir)
    if saved is None or not has_checkpoint(workdir):
        return
    # Runs from before the field trained unrolled, whatever today's default.
    saved.setdefault("model", {}).setdefault("scan_blocks", False)
    changed = {
        k: v
        for k, v in config_differences(saved, config_as_dict(config)).items()
        if not _under(k, RESUMABLE_FIELDS)
    }
    # Fields the run's code did not have yet (added by a newer version) do not block it.
    added = {k: v for k, v in changed.items() if v[0] == "<absent>"}
    if added:
        logging.warning(
            "Resuming %s, whose %s predates the fields %s; they take this run's values.",
            workdir,
            CONFIG_NAME,
            _format_changes(added),
        )
        changed = {k: v for k, v in changed.items() if k not in added}
    if changed:
        layout = ""
        if "model.scan_blocks" in changed:  # the optimizer state is not converted
            layout = (
                f" A run resumes in the block layout it was trained with "
                f"(--config.model.scan_blocks={changed['model.scan_blocks'][0]}); evaluation, "
                "prediction and export convert its checkpoints to either layout."
            )
        raise ConfigMismatchError(
            f"{workdir} holds a run of another config; resuming it with this one would change "
            f"{_format_changes(changed)}. Rerun with the workdir's values (its {CONFIG_NAME}), "
            "or pass a new --workdir to start a separate run. Fields allowed to change on "
            f"resume: {', '.join(RESUMABLE_FIELDS)}.{layout}"
        )


def check_eval_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigMismatchError` if ``config`` builds a different model (or data
    set) than the one ``workdir``'s checkpoints were trained with."""
    saved = read_saved_config(workdir)
    if saved is None:
        return
    changed = {
        k: v
        for k, v in config_differences(saved, config_as_dict(config)).items()
        if _under(k, CHECKPOINT_SHAPE_FIELDS) and not _under(k, LAYOUT_FIELDS)
    }
    if changed:
        raise ConfigMismatchError(
            f"{workdir}'s checkpoints were trained with another config: this one changes "
            f"{_format_changes(changed)}. Pass the training config (the values in "
            f"{storage.path(workdir) / CONFIG_NAME})."
        )


def _format_changes(changed: dict[str, tuple]) -> str:
    return "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())


def checkpoint_steps(workdir: epath.PathLike) -> list[int]:
    """The finished checkpoint steps in ``<workdir>/checkpoints`` (read only; creates nothing)."""
    folder = storage.path(workdir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(d.name) for d in folder.iterdir() if d.name.isdigit() and _finished(d))


def _finished(step_dir: epath.Path) -> bool:
    """Whether Orbax finished writing ``step_dir``: on GCS it writes a step in place and then
    ``commit_success.txt`` into it; elsewhere it renames a finished temporary folder."""
    return not os.fspath(step_dir).startswith("gs://") or (step_dir / "commit_success.txt").exists()


def has_checkpoint(workdir: str) -> bool:
    return bool(checkpoint_steps(workdir))


def check_evaluable(workdir: str, config: ml_collections.ConfigDict, step: int | None) -> None:
    """Checks, before anything is compiled or created, that ``workdir`` has the checkpoint
    ``eval.py`` is asked for (``step``, default the latest) and a matching config."""
    steps = checkpoint_steps(workdir)
    if not steps:
        where = "does not exist" if not storage.path(workdir).is_dir() else "has no checkpoint"
        raise FileNotFoundError(
            f"{storage.resolve(workdir)} {where}. Pass the --workdir of a training run (with "
            "checkpoints/<step>/ folders), or --weights FILE to evaluate converted weights."
        )
    if step is not None and step not in steps:
        raise FileNotFoundError(
            f"{workdir} has no checkpoint of step {step}; it has steps {steps}. Pass one of "
            "them to --step, or leave --step out for the latest."
        )
    check_eval_config(workdir, config)


def write_config(workdir: epath.PathLike, config: ml_collections.ConfigDict) -> None:
    """Writes ``<workdir>/config.json`` (a crash never leaves half a file)."""
    storage.write_text(storage.path(workdir) / CONFIG_NAME, config.to_json_best_effort(indent=1))


# ----------------------------------------------------------------------------- names


def default_workdir(config_arg: str) -> str:
    """``workdirs/<config name>[_<variants>]`` for a ``--config`` value.

    ``"configs/camvid_mit_b0.py"`` -> ``"workdirs/camvid_mit_b0"``;
    ``"configs/camvid_mit_b0.py:smoke"`` -> ``"workdirs/camvid_mit_b0_smoke"``: each variant
    has its own folder, so a smoke run never lands in (or resumes) the full run's. Variants
    are sorted (``:smoke,baseline`` and ``:baseline,smoke`` are one run).
    """
    path, _, arg = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    variants = sorted(v.strip() for v in arg.split(",") if v.strip())
    return os.path.join(
        "workdirs", "_".join([name, *(re.sub(r"[^\w.-]", "-", v) for v in variants)])
    )


def eval_dir(workdir: epath.PathLike, step: int | str) -> str:
    """``<workdir>/eval_<step>``: the report folder of an evaluation of checkpoint ``step``
    (``"weights"`` for converted weights), the same for training and ``eval.py``."""
    return os.fspath(storage.path(workdir) / f"eval_{step}")


def finished_report(workdir: epath.PathLike, total_steps: int) -> str | None:
    """The ``report.json`` of ``workdir``'s run if it has a checkpoint of step ``total_steps``
    and its evaluation at that step; None otherwise (there is training or evaluation to do)."""
    report = storage.path(eval_dir(workdir, total_steps)) / "report.json"
    if total_steps in checkpoint_steps(workdir) and report.is_file():
        return os.fspath(report)
    return None
