"""The compiled module and the packaging."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import vlmfast
from vlmfast._C_loader import get_C, tensor_view

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_module_version_and_build_info():
    C = get_C()
    assert C is not None, "vlmfast._C did not load (make test builds it)"
    assert C.__version__ == vlmfast.__version__
    info = C.build_info()
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["openmp"], int) and info["openmp"] >= 1
    assert info["compiler"] and info["build_type"]
    assert "calibration_bins" in info["ops"]
    count, err = C.cuda_device_count()
    if not torch.cuda.is_available():
        assert count == 0 and err  # no driver: a reason, not an exception


def test_cpu_kernel_rejects_bad_descriptors():
    C = get_C()
    x = torch.zeros(2, 3, 4)
    y = torch.zeros(2, 3, dtype=torch.long)
    outs = [torch.zeros(2, 16, dtype=torch.int64), torch.zeros(2, 16, dtype=torch.int64),
            torch.zeros(2, 16, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64),
            torch.zeros(2, dtype=torch.int64)]
    with pytest.raises(ValueError, match="bin_conf: expected dtype float64"):
        bad = list(outs)
        bad[2] = torch.zeros(2, 16, dtype=torch.float32)
        C.calibration_bins_cpu(tensor_view(x), tensor_view(y), 15, *map(tensor_view, bad), None, None)
    with pytest.raises(ValueError, match="n_bins"):
        C.calibration_bins_cpu(tensor_view(x), tensor_view(y), 0, *map(tensor_view, outs), None, None)
    with pytest.raises(ValueError, match="labels: expected shape"):
        C.calibration_bins_cpu(tensor_view(x), tensor_view(y[:, :2]), 15, *map(tensor_view, outs), None, None)


def test_kernels_package_is_vlmfast_kernels():
    import vlmfast.kernels

    assert Path(vlmfast.kernels.__file__).parent.name == "kernels"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_pure_python_wheel_with_skip_cpp(tmp_path):
    """VLMFAST_SKIP_CPP=1 builds a wheel without the compiled module that still ships vlmfast.kernels."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    env = dict(os.environ, VLMFAST_SKIP_CPP="1")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp_path / "w"),
         str(src)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "w").glob("vlmfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlmfast/kernels/__init__.py" in names and "vlmfast/kernels/calibration_bins.py" in names
    assert "vlmfast/ops/calibration_bins.py" in names
    assert not [n for n in names if n.endswith(".so")]
    assert not [n for n in names if n.startswith("kernels/")]  # no top-level "kernels" package
