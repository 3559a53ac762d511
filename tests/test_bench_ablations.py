"""bench/camvid_ablations.py: the sweep's run list and its resumable results file."""

import json

from config_helpers import load_bench, load_config

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
                "seed": seed, "steps": 300, "mIoU": miou, "mAcc": miou + 10,
                "IoU": {c: 1.0 for c in ablations.RARE_CLASSES},
                "prototype_analysis": {"class_separability": 0.0},
                "command": "python train.py ...",
            }
        )  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"name": "torn')
    read = ablations.read_results(str(path))
    assert sorted(read) == ["table3_cbp_steps300_s0", "table3_cbp_steps300_s1"]
    table = ablations.tables(read)
    assert "| CBP | 2 | 21.00 +- 1.41 | 31.00 +- 1.41 |" in table
