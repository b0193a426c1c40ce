"""The benchmark scripts run (quick configs, nothing recorded): they must not rot between GPU sessions."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_calibration.py", "bench_text.py", "bench_equal_mass_bins.py",
                                    "bench_prompt_logits.py", "bench_prompt_tuning.py",
                                    "bench_contrastive_loss.py", "bench_heatmaps.py",
                                    "bench_kmeans_assign.py", "bench_region_loss.py", "bench_cluster.py",
                                    "bench_fleet.py"])
def test_bench_script_quick(script, tmp_path):
    _run_quick(script, "quick", tmp_path)


def test_bench_fleet_prompt_heads_quick(tmp_path):
    _run_quick("bench_fleet.py", "quick-heads", tmp_path)


def _run_quick(script, config, tmp_path):
    before = (ROOT / "benchmarks" / "results.csv").read_bytes() if (ROOT / "benchmarks" / "results.csv").exists() else b""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--config", config, "--no-record", "--reps", "3"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| provider | median_ms |" in out.stdout and "speedup_vs_ref" in out.stdout
    after = (ROOT / "benchmarks" / "results.csv").read_bytes() if (ROOT / "benchmarks" / "results.csv").exists() else b""
    assert after == before  # --no-record
