"""The CUDA kernel's row math without a GPU: csrc/tests/test_calibration_bins_row.cpp compiles the
__host__ __device__ functions of csrc/cuda/calibration_bins_row.cuh on the host, checks partial-state merges in
every split/merge order (max, lowest-index argmax, rescaled sums), and emulates the kernel's control flow (blocks,
model segments, lane groups, butterfly merges, run-length bin cache, shared/direct accumulation) against the CPU
kernel on ~600 shapes, dtypes, layouts, label types and NaN/inf rows, and checks both against a float64 oracle on
near-saturated rows (top logit 15-25 above the rest: conf == 1.0 exactly where an accurately summed softmax
rounds to 1, NLL = log1p(rest), Brier without cancellation) and on extreme logits (+-3e38, the float16/bfloat16
extremes: NLL finite and exact). The real kernel runs in the `cuda` tests."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cuda_row_math_host_emulation(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("no C++ compiler on PATH (the extension build needs one too)")
    exe = tmp_path / "rowtest"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O2", "-fopenmp", "-fno-math-errno", "-Wno-psabi", f"-I{ROOT / 'csrc'}",
         str(ROOT / "csrc" / "tests" / "test_calibration_bins_row.cpp"), str(ROOT / "csrc" / "calibration_bins.cpp"),
         "-o", str(exe)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "OK: 0 failures" in run.stdout
    assert "cases: " in run.stdout
    assert "saturation/extremes rows: " in run.stdout
