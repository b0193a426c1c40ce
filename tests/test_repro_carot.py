"""The CaRot reproduction script runs end to end (its --quick smoke mode) and writes a consistent table and JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_repro_carot_quick(tmp_path):
    out = tmp_path / "repro.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "repro_carot.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert {"ZS", "FT", "LP-FT", "FLYP", "CaRot", "WiSE-FT(FT) a=0.5", "WiSE-FT(CaRot) a=0.5"} == set(summary)
    assert data["ood"] == ["sklearn-digits", "noise-3", "blur-3", "contrast-3", "invert-3", "occlusion-3"]
    for label, row in summary.items():
        for key in ("ID acc", "ID ECE", "OOD acc", "OOD ECE", "OOD ECE per-batch"):
            cell = row[key]
            assert len(cell["per_seed"]) == 1 and 0.0 <= cell["mean"] <= 100.0 and math.isfinite(cell["mean"])
        # the OOD mean is the mean of the six shifts of the raw per-seed results
        raw = data["per_seed"][label][0]
        want = 100 * sum(raw[s]["accuracy"] for s in data["ood"]) / 6
        assert math.isclose(row["OOD acc"]["mean"], want, rel_tol=1e-9)
        assert f"| {label} | {row['ID acc']['mean']:.2f}" in proc.stdout
    c, f = summary["CaRot"]["OOD ECE"]["mean"], summary["FLYP"]["OOD ECE"]["mean"]
    first = data["verdict"][0]
    assert f"{c:.4g} vs {f:.4g}" in first and ("CaRot better" in first) == (c < f)
