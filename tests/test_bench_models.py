"""bench/models.py: the banded-CE comparison runs and reports bands that agree."""

from config_helpers import load_bench

bench = load_bench("models")


def test_ce_bands_table_compares_whole_and_bands(capsys):
    bench.bench_ce_bands(1, cases=(((2, 6, 6, 5), (64, 80)),), bands_mb=(None, 1024, 0))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (2")]
    # 1024 MB bands exceed the 0.2 MB of logits and are skipped; 0 MB means one row a band.
    assert [r.split(" | ")[1] for r in rows] == ["whole", "0"]
    whole_temps, band_temps = (float(r.split(" | ")[3]) for r in rows)
    assert band_temps < whole_temps
    assert float(rows[1].split(" | ")[4].rstrip(" |")) < 1e-6  # max abs diff of the gradients
