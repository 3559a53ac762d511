"""bench/camvid_ablations.py: the sweep's run list, its resumable results file, and the
commands docs/results.md prints under its tables, which must reproduce their rows."""

import ast
import json
import os
import re
import shlex

from config_helpers import ROOT, load_bench, load_config

from cbp_jax import config_checks

ablations = load_bench("camvid_ablations")


def test_runs_have_unique_names_and_override_existing_config_fields():
    runs = ablations.runs(300, 1200)
    assert len({r.name for r in runs}) == len(runs)
    assert [r.row for r in runs[:4]] == ["Baseline", "CBP", "OCCL", "CBP + OCCL"]
    assert {r.seed for r in runs if r.table == "table3"} == {0, 1, 2}
    for run in runs:
        if run.pytorch:
            continue
        config = load_config("camvid_mit_b0", run.variant or None)
        for key, _ in run.overrides:
            section, field = key.split(".")
            assert field in config[section], key
    baseline = load_config("camvid_mit_b0", "baseline")
    assert baseline.model.classifier == "linear" and not baseline.loss.occl


def test_results_file_skips_a_torn_last_line_and_tables_average_seeds(tmp_path):
    path = tmp_path / "runs.jsonl"
    rows = []
    for seed, miou in ((0, 20.0), (1, 22.0)):
        rows.append(
            {
                "name": f"table3_cbp_steps300_s{seed}", "table": "table3", "row": "CBP",
                "seed": seed, "steps": 300, "mIoU": miou, "mAcc": miou + 10, "aAcc": miou + 40,
                "IoU": {c: 1.0 + seed for c in ablations.RARE_CLASSES},
                "prototype_analysis": {"class_separability": 0.0},
                "command": "python train.py ...",
            }
        )  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"name": "torn')
    read = ablations.read_results(str(path))
    assert sorted(read) == ["table3_cbp_steps300_s0", "table3_cbp_steps300_s1"]
    table = ablations.tables(read, ablations.runs(300, 1200))
    assert "| CBP | 2 | 21.00 +- 1.41 | 31.00 +- 1.41 | 61.00 +- 1.41 | 1.50 +- 0.71 |" in table
    assert "--config.loss.occl=False" in table  # the command as runs() defines it today


def parse_command(command: str):
    """The config a stored ``python train.py --config FILE[:VARIANT] --config.X=V ...``
    command runs with: the file's config, then each override as absl + ml_collections parse
    it (a Python literal, else the string)."""
    args = shlex.split(command)
    assert args[:2] == ["python", "train.py"], command
    spec = args[args.index("--config") + 1]
    config = config_checks.load_config_file(os.path.join(ROOT, spec))
    for arg in args:
        if not arg.startswith("--config."):
            continue
        path, value = arg[len("--config.") :].split("=", 1)
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        *parents, leaf = path.split(".")
        target = config
        for part in parents:
            target = target[part]
        assert leaf in target, f"{arg}: no such field"
        target[leaf] = type(target[leaf])(value) if isinstance(target[leaf], float) else value
    assert not config_checks.problems(config), command
    return config


# What a row's name says about its config (docs/results.md's row names).
ROW_RULES = [
    (r"^Baseline", {"model.classifier": "linear", "loss.occl": False}),
    (r"all-MLP head", {"model.head": "mlp"}),
    (r"^CBP$", {"model.classifier": "cbp", "loss.occl": False}),
    (r"^OCCL$", {"model.classifier": "linear", "loss.occl": True}),
    (r"^CBP \+ OCCL$", {"model.classifier": "cbp", "loss.occl": True}),
    (r"^Random pixels$", {"loss.views": "random_pixels", "loss.occl": True}),
    (r"^Objects", {"loss.views": "objects", "loss.occl": True}),
    (r"split by pixels", {"loss.single_object": "split_pixels"}),
    (r"^Objects$", {"loss.single_object": "one_view", "model.classifier": "cbp"}),
    (r"learned classifier", {"model.classifier": "linear"}),
    (r"^T = ([\d.]+)$", {"model.cbp_length": float}),
    (r"^lambda = ([\d.]+)$", {"loss.centroid_weight": float}),
    (r"^phi = ([\d.]+)$", {"loss.category_weight": float}),
    (r"^Gradient$", {"model.cbp_update": "gradient"}),
    (r"^EMA$", {"model.cbp_update": "ema"}),
    (r"^Penalty$", {"model.cbp_update": "penalty"}),
    (r"^Ortho$", {"model.cbp_init": "ortho"}),
    (r"^Equal$", {"model.cbp_init": "equal"}),
]


def test_every_stored_command_selects_what_its_row_names():
    """Each ``- ROW, seed S: `python train.py ...``` line under a ``### TABLE (N steps)``
    heading of docs/results.md parses with today's configs and selects seed S, N steps and
    what the row's name says (classifier, OCCL, view split, T, lambda, phi, ...)."""
    text = open(os.path.join(ROOT, "docs", "results.md")).read()
    steps, checked = None, 0
    for line in text.splitlines():
        if heading := re.match(r"^### \S+ \((\d+) steps\)", line):
            steps = int(heading.group(1))
        stored = re.match(r"^- (.+), seed (\d+): `(python train\.py [^`]+)`$", line)
        if not stored:
            continue
        row, seed, command = stored.group(1), int(stored.group(2)), stored.group(3)
        config = parse_command(command)
        assert (config.seed, config.total_steps) == (seed, steps), line
        named = 0
        for pattern, expected in ROW_RULES:
            found = re.search(pattern, row)
            if not found:
                continue
            named += 1
            for key, value in expected.items():
                section, field = key.split(".")
                want = value(found.group(1)) if value is float else value
                assert config[section][field] == want, f"{row}: {key}={config[section][field]}"
        assert named, f"no rule reads the row {row!r}"
        checked += 1
    assert checked >= 35  # every train.py row of the file (the PyTorch rows are other scripts)
