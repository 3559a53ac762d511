"""Where a run's files live: local folders or object stores (``gs://``), through etils.epath.

Every file cbp_jax reads or writes goes through :func:`path`, an ``epath.Path``: a local path
reaches the local file system, ``gs://BUCKET/...`` Google Cloud Storage (etils uses gcsfs
when TensorFlow is not installed). Orbax checkpoints (TensorStore), TensorBoard event files
(tensorboardX), the workdir lease (google-cloud-storage) and ArrayRecord shards
(array_record) reach GCS through their own clients, with the same URLs.

- :func:`path`, :func:`resolve` (local paths made absolute, URLs left as they are) and
  :func:`is_local`.
- :func:`check_writable`: an output path checked before the work that writes it.
- :func:`write_text`: a whole file at once; locally a crash leaves the old file or the new.
- :func:`local_copy` and :func:`staged`: for libraries that read or write local files only
  (OpenCV's video reader and writer, transformers' ``save_pretrained``).
- :func:`use_emulator_if_set`: ``STORAGE_EMULATOR_HOST=http://HOST:PORT`` (a GCS emulator
  such as fake-gcs-server) is the one variable a user sets; this derives what the other
  clients read. :func:`path` calls it at a URL's first use; the entry points call it
  before anything imports gcsfs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator

from etils import epath


def emulator_environment(url: str) -> dict[str, str]:
    """The variables that send every GCS client of a run to the emulator at ``url``."""
    return {
        # TensorStore (Orbax's arrays) ignores STORAGE_EMULATOR_HOST.
        "TENSORSTORE_GCS_HTTP_URL": url,
        # TensorStore: a fixed bearer token; no credential file, no metadata-server probe.
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # google-cloud-cpp (array_record's gs:// reader).
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        # google-auth and gcsfs: no probe of the GCE metadata server.
        "NO_GCE_CHECK": "true",
        # gcsfs (read at its import): no gRPC bucket-layout lookup, which emulators lack.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # gcsfs through fsspec's config (read at fsspec's import): anonymous requests.
        "FSSPEC_GS_TOKEN": "anon",
    }


def use_emulator_if_set() -> None:
    """With ``STORAGE_EMULATOR_HOST`` set, sets the variables of
    :func:`emulator_environment` that are not set yet; otherwise does nothing."""
    url = os.environ.get("STORAGE_EMULATOR_HOST", "").rstrip("/")
    if not url:
        return
    if "://" not in url:
        url = f"http://{url}"
    for name, value in emulator_environment(url).items():
        os.environ.setdefault(name, value)
    if "fsspec" in sys.modules:  # imported before FSSPEC_GS_TOKEN was set
        import fsspec.config

        fsspec.config.conf.setdefault("gs", {}).setdefault("token", "anon")


def is_local(p: epath.PathLike) -> bool:
    """Whether ``p`` is a local path (not a URL such as ``gs://BUCKET/...``)."""
    return "://" not in os.fspath(p)


def path(p: epath.PathLike) -> epath.Path:
    """``p`` as an ``epath.Path`` (a relative local path stays relative)."""
    if not is_local(p):
        use_emulator_if_set()
    return epath.Path(p)


def resolve(p: epath.PathLike) -> epath.Path:
    """:func:`path` of ``p``, made absolute if it is local (a URL is left as it is)."""
    return path(os.path.abspath(p) if is_local(p) else p)


class OutputPathError(ValueError):
    """An output path that cannot be written as asked (the message names it and the fix)."""


def check_writable(target: epath.PathLike, kind: str, *, flag: str = "--out") -> None:
    """Checks, before any work, that ``target`` can become a ``kind`` ("file" or "folder"):
    not the other kind already, and (locally) in a folder this process can create and write
    in, proven by creating it and a probe file there (a folder made here stays).

    Raises:
      OutputPathError: naming ``flag``, the path and what to do.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind={kind!r}; use 'file' or 'folder'.")
    p = path(target)
    if kind == "file" and p.is_dir():
        raise OutputPathError(f"{flag} {target} is a folder; name a file to write (or remove it).")
    if kind == "folder" and p.exists() and not p.is_dir():
        raise OutputPathError(f"{flag} {target} is a file; name a folder to write into.")
    if not is_local(target):
        return  # an object store: permissions show at the first write
    folder = os.path.abspath(
        target if kind == "folder" else os.path.dirname(os.path.abspath(target))
    )
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OutputPathError(
            f"{flag} {target}: cannot write in {folder} ({e.strerror or e}); choose another path."
        ) from None


def write_text(file: epath.PathLike, text: str) -> None:
    """Writes ``file`` whole (creating its folder): locally through a temporary file renamed
    over it, so a crash leaves the old file or the new one; an object store replaces an
    object whole by itself."""
    file = path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(file):
        file.write_text(text)
        return
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(file)


@contextlib.contextmanager
def local_copy(file: epath.PathLike) -> Iterator[str]:
    """A local path holding ``file``'s bytes: ``file`` itself when it is local, else a
    temporary copy, removed on exit."""
    if is_local(file):
        yield os.fspath(file)
        return
    source = path(file)
    with tempfile.TemporaryDirectory(prefix="cbp_jax-") as tmp:
        local = os.path.join(tmp, source.name)
        with source.open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst)
        yield local


@contextlib.contextmanager
def staged(target: epath.PathLike) -> Iterator[str]:
    """A local path to write the file or folder ``target`` at: ``target`` itself when it is
    local (its parent folder made), else a temporary path whose file or folder is copied to
    ``target`` when the block ends without an error."""
    if is_local(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        yield os.fspath(target)
        return
    target = path(target)
    with tempfile.TemporaryDirectory(prefix="cbp_jax-") as tmp:
        local = os.path.join(tmp, target.name)
        yield local
        for source in _files_under(local):
            rel = os.path.relpath(source, local)
            dest = target if rel == "." else target / rel
            with open(source, "rb") as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst)


def _files_under(local: str) -> list[str]:
    """``[local]`` for a file, every file below it for a folder."""
    if not os.path.isdir(local):
        return [local] if os.path.exists(local) else []
    return [os.path.join(d, f) for d, _, files in os.walk(local) for f in files]


def files_under(folder: epath.PathLike) -> list[epath.Path]:
    """Every file below ``folder``, recursively, sorted (on GCS by listing, without ``**``
    globs, which etils refuses there)."""
    found = []
    for child in path(folder).iterdir():
        found += files_under(child) if child.is_dir() else [child]
    return sorted(found, key=os.fspath)
