"""The rationality reproduction script runs end to end (--quick, on the tiny ResNet base) and its table and JSON
agree with the per-seed results."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_repro_rationality_quick(tmp_path):
    out = tmp_path / "repro.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "repro_rationality.py"), "--quick",
                           "--base-config", "vlmfast-tiny-rn", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"ZS", "LP", "FLYP", "FT"}
    assert data["splits"][0] == "id" and len(data["splits"]) == 7
    for label, rows in data["per_seed"].items():
        row = rows[0]["id"]
        assert row["RR"] + row["RW"] + row["WR"] + row["WW"] == row["n"] == 60
        assert row["method"] == "gradcam"
        acc = data["summary"][label]["ID acc"]["mean"]
        assert math.isclose(acc, 100 * (row["RR"] + row["RW"]) / 60, rel_tol=1e-6)  # float32 mean
        assert f"| {label} | gradcam | {acc:.2f}" in proc.stdout
    assert len(data["verdict"]) == 12
