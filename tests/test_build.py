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
    from vlmfast._dispatch import OP_MODULES

    assert {m.rsplit(".", 1)[1] for m in OP_MODULES} <= set(info["ops"])  # every op has a CPU kernel in the build
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
    # the working tree's files: tracked ones still present, and new ones git does not ignore
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    src = tmp_path / "src"
    for f in files:
        if not (ROOT / f).is_file():
            continue
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
    assert "vlmfast/cli/__init__.py" in names and "vlmfast/cli/demo.py" in names  # the app layer ships
    assert "vlmfast/_optional.py" in names
    assert not [n for n in names if n.endswith(".so")]
    assert not [n for n in names if n.startswith("kernels/")]  # no top-level "kernels" package


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("target, runs", [("demo", "-m vlmfast demo"), ("test", "-m pytest")])
def test_make_targets_install_the_pinned_stack_and_every_extra(tmp_path, target, runs):
    """`make demo` and `make test` (dry run, into a venv that does not exist) create the venv, install the pinned
    torch pair, then the package with [all] and [test] in place, then run."""
    venv = tmp_path / "venv"
    # Under `make test` the parent make's variables would make this one print "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "-B", target, f"VENV={venv}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"-m venv {venv}" in lines[0]
    stack = next(ln for ln in lines if "pip install" in ln and "-e " not in ln)
    assert "torch==2.14.1" in stack and "torchvision==0.29.1" in stack
    (editable,) = [ln for ln in lines if "pip install" in ln and "-e " in ln]
    assert '-e ".[all,test]"' in editable and "--no-build-isolation" in editable
    assert "torch==2.14.1" in editable  # the resolver keeps the pins while it adds the extras
    assert runs in lines[-1]
    assert lines.index(stack) < lines.index(editable) < len(lines) - 1


def test_ci_runs_make_test():
    script = (ROOT / ".ci" / "run").read_text()
    assert any(line.strip() == "make test" for line in script.splitlines())
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_console_script_is_the_app_layer():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "vlmfast"]
    assert ep.value == "vlmfast.cli:main"
    from vlmfast.cli import main

    assert ep.load() is main
