"""The DOR reproduction script runs end to end (its --quick smoke mode) and writes a consistent table and JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_repro_dor_quick(tmp_path):
    out = tmp_path / "repro.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "repro_dor.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method |" in proc.stdout and "Verdict" in proc.stdout
    data = json.loads(out.read_text())
    assert data["config"]["quick"] is True and data["config"]["seeds"] == [1]
    summary = data["summary"]
    assert set(summary) == {"zero-shot", "CoOp", "CoOp+DOR"}
    for label, row in summary.items():
        for key in ("base_accuracy", "new_accuracy", "H", "base ece", "new ece", "base ace", "new ace"):
            cell = row[key]
            assert len(cell["per_seed"]) == 1 and cell["std"] == 0.0, (label, key)
            assert 0.0 <= cell["mean"] <= 100.0 and math.isfinite(cell["mean"]), (label, key, cell)
        b, n = row["base_accuracy"]["mean"], row["new_accuracy"]["mean"]
        assert math.isclose(row["H"]["mean"], 2 * b * n / (b + n) if b + n else 0.0, rel_tol=1e-6, abs_tol=1e-9)
        # every method's row is printed with its numbers
        assert f"| {label} | {row['base_accuracy']['mean']:.2f}" in proc.stdout
    # the verdict is computed from the table, with the measured signs
    rise = summary["CoOp"]["new ece"]["mean"] - summary["zero-shot"]["new ece"]["mean"]
    first = data["verdict"][0]
    assert f"{rise:+.2f} pts" in first
    assert ("rises, as the paper reports" in first) == (rise > 0)
