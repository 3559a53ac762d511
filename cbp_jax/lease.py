"""A lease on one Google Cloud Storage object: the workdir lock where ``flock`` does not exist.

The lease is a small JSON object, ``{"pid", "host", "machine", "since", "heartbeat", "token",
"released"}``, that changes only under a generation precondition (GCS ``ifGenerationMatch``):
it is created only if absent, and renewed, taken over or released only if it is still the
version its writer last read. Of two runs racing for one lease, exactly one wins.

The holder renews ``heartbeat`` (its clock, seconds since the epoch) from a background
thread every ``timeout_s / 4``. A lease is taken over, with a warning naming its holder, when
its heartbeat is older than ``timeout_s`` (the hosts' clocks must agree to well within it) or
when its holder is a process of this machine (same boot, same pid namespace) that no longer
runs. A clean release marks the lease ``released``; the next run takes it without a warning.
Releasing overwrites instead of deleting: GCS emulators ignore preconditions on deletes.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging


class LeaseHeldError(RuntimeError):
    """Another live run holds the lease; ``holder`` is its record."""

    def __init__(self, url: str, holder: dict[str, Any]):
        super().__init__(f"{url} is held by {describe(holder)}")
        self.url, self.holder = url, holder


def split_gcs_url(url: str) -> tuple[str, str]:
    """``"gs://BUCKET/OBJECT"`` -> ``("BUCKET", "OBJECT")``."""
    bucket, _, name = url.removeprefix("gs://").partition("/")
    if not url.startswith("gs://") or not bucket or not name:
        raise ValueError(f"{url!r} is not a gs://BUCKET/OBJECT URL.")
    return bucket, name


def describe(holder: dict[str, Any]) -> str:
    """``"pid 12 on host h (since ..., last heartbeat 5 s ago)"``."""
    if not holder.get("pid"):
        return "another run (its lease object is unreadable)"
    age = time.time() - float(holder.get("heartbeat", 0))
    return (
        f"pid {holder['pid']} on host {holder.get('host')} (since {holder.get('since')}, "
        f"last heartbeat {age:.0f} s ago)"
    )


def _machine() -> str | None:
    """This boot of this machine and this pid namespace: processes with the same value see
    each other's pids. None where it cannot be told (not Linux)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class GcsLease:
    """An exclusive lease on the object at ``url`` (``gs://BUCKET/OBJECT``).

    Args:
      url: the lease object.
      timeout_s: a holder whose heartbeat is older than this is taken to be dead.
    """

    def __init__(self, url: str, *, timeout_s: float):
        try:
            from google.cloud import storage
        except ImportError as e:
            raise ImportError(
                f"A lease on {url} needs google-cloud-storage: pip install -e '.[gcs]'."
            ) from e
        bucket, self._name = split_gcs_url(url)
        self.url, self.timeout_s = url, float(timeout_s)
        self._bucket = storage.Client().bucket(bucket)
        self._token = uuid.uuid4().hex  # tells this run's writes from any other's
        self._since = datetime.datetime.now().isoformat(timespec="seconds")
        self._generation: int | None = None  # of this run's last write; None: not held
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------- taking

    def acquire(self) -> GcsLease:
        """Takes the lease and starts the heartbeat.

        Raises:
          LeaseHeldError: a live run holds it.
        """
        with self._mutex:
            if not self._write(expect=0):  # 0: only if the object does not exist
                self._take_over()
        self._thread = threading.Thread(target=self._beat, name="gcs-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over(self) -> None:
        """Takes the existing lease if it was released or its holder is dead."""
        holder, generation = self._read()
        if generation is None:  # deleted in between: race for it again
            if self._write(expect=0):
                return
            holder, generation = self._read()
            if generation is None:
                raise LeaseHeldError(self.url, holder)
        if holder.get("token") == self._token:  # a retried write of ours that had landed
            self._generation = generation
            return
        if not holder.get("released"):
            dead = self._why_dead(holder)
            if dead is None:
                raise LeaseHeldError(self.url, holder)
            logging.warning("Taking over %s: its holder, %s, %s.", self.url, describe(holder), dead)
        if not self._write(expect=generation):  # another run took it first
            raise LeaseHeldError(self.url, self._read()[0])

    def _why_dead(self, holder: dict[str, Any]) -> str | None:
        """Why ``holder`` is dead, or None if it may be alive."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.timeout_s:
            return f"sent no heartbeat for {age:.0f} s (the lease timeout is {self.timeout_s:g} s)"
        pid, machine = holder.get("pid"), _machine()
        same_machine = machine is not None and holder.get("machine") == machine
        if same_machine and isinstance(pid, int) and not _running(pid):
            return "ended without releasing it (killed?)"
        return None

    # ----------------------------------------------------------------------- the object

    def _record(self, released: bool = False) -> str:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "machine": _machine(),
                "since": self._since,
                "heartbeat": time.time(),
                "token": self._token,
                "released": released,
            }
        )

    def _write(self, expect: int, released: bool = False) -> bool:
        """Writes this run's record if the object's generation is ``expect`` (0: absent);
        False if it is not (HTTP 412). A multipart upload: emulators ignore preconditions on
        simple (media) uploads."""
        from google.api_core.exceptions import PreconditionFailed

        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(
                self._record(released), content_type="application/json", if_generation_match=expect
            )
        except PreconditionFailed:
            return False
        self._generation = blob.generation
        return True

    def _read(self) -> tuple[dict[str, Any], int | None]:
        """``(record, generation)`` of the object; ``({}, None)`` if it does not exist."""
        from google.api_core.exceptions import NotFound

        blob = self._bucket.blob(self._name)
        try:
            raw = blob.download_as_bytes()
        except NotFound:
            return {}, None
        try:
            record = json.loads(raw)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), blob.generation

    # ----------------------------------------------------------------------- holding

    def _beat(self) -> None:
        """The heartbeat thread: renews the lease every ``timeout_s / 4`` until released."""
        while not self._stop.wait(self.timeout_s / 4):
            with self._mutex:
                if self._generation is None:
                    return
                try:
                    renewed = self._write(expect=self._generation)
                except Exception as e:  # noqa: BLE001 -- a network error: retried next beat
                    logging.warning("Could not renew the lease %s (%s); retrying.", self.url, e)
                    continue
                if not renewed and not self._still_ours():
                    return

    def _still_ours(self) -> bool:
        """After a failed precondition: whether the object still holds this run's record (a
        retried write had landed); if not, says that the lease was lost."""
        holder, generation = self._read()
        if holder.get("token") == self._token:
            self._generation = generation
            return True
        self._generation = None
        logging.error(
            "Lost the lease %s to %s: this run sent no heartbeat for longer than the lease "
            "timeout (%g s), and another run took the workdir over. Two runs now write into "
            "one workdir: stop one of them.",
            self.url,
            describe(holder),
            self.timeout_s,
        )
        return False

    def release(self) -> None:
        """Stops the heartbeat and marks the lease released, if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self._generation is None:
                return
            try:
                released = self._write(expect=self._generation, released=True)
                if not released and self._still_ours():
                    self._write(expect=self._generation, released=True)
            except Exception as e:  # noqa: BLE001 -- the lease then expires after its timeout
                logging.warning(
                    "Could not release the lease %s (%s); the next run takes it over %g s after "
                    "this run's last heartbeat.",
                    self.url,
                    e,
                    self.timeout_s,
                )
            self._generation = None

    def __enter__(self) -> GcsLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
