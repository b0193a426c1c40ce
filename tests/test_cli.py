"""The command line: info, calibration of saved logits (safe loading), demo."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from vlmfast.cli import main
from vlmfast.metrics import calibration


def test_info_lists_every_backend_with_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "cuda", "cpp", "torch"):
        assert f"  {name:<7} " in out
    assert "calibration_bins on cpu tensors ->" in out
    assert main(["info", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["backends"]["torch"]["available"] is True


def test_python_dash_m_info():
    out = subprocess.run([sys.executable, "-m", "vlmfast.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "backends (default order):" in out.stdout


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "npz"])
def test_calibration_of_saved_logits(tmp_path, capsys, fmt):
    logits = torch.randn(3, 200, 5)
    labels = torch.randint(0, 5, (200,))
    path = tmp_path / f"run.{fmt}"
    if fmt == "pt":
        torch.save({"logits": logits, "labels": labels}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({"logits": logits, "labels": labels}, str(path))
    else:
        np.savez(path, logits=logits.numpy(), labels=labels.numpy())
    rc = main(["calibration", str(path), "--n-bins", "10", "--names", "a,b,c", "--json", str(tmp_path / "m.json"),
               "--plot", str(tmp_path / "m.png"), "--backend", "cpp"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| a |" in out and "| c |" in out
    d = json.loads((tmp_path / "m.json").read_text())
    want = calibration(logits, labels, 10, backend="cpp")
    assert np.allclose(d["ece"], want.ece.numpy()) and d["models"] == ["a", "b", "c"]
    assert (tmp_path / "m.png").stat().st_size > 10_000


def test_pickled_objects_are_refused(tmp_path, capsys):
    import fractions

    path = tmp_path / "evil.pt"
    torch.save({"logits": fractions.Fraction(1, 3)}, path)  # an arbitrary class: weights_only refuses it
    assert main(["calibration", str(path)]) == 2
    assert "could not be read" in capsys.readouterr().err


def test_missing_labels_and_bad_values(tmp_path, capsys):
    path = tmp_path / "only.npy"
    np.save(path, np.random.randn(10, 3))
    assert main(["calibration", str(path)]) == 2
    assert "must hold 'logits' and 'labels'" in capsys.readouterr().err
    lab = tmp_path / "lab.npy"
    np.save(lab, np.full(10, 7))
    assert main(["calibration", str(path), "--labels", str(lab)]) == 2
    assert "labels: expected values in [0, 3)" in capsys.readouterr().err


def test_demo_runs_offline(tmp_path, capsys):
    """The main job on the built-in data: the test-preset base (cached across the suite) at three logit scales,
    audited on in-distribution and shifted sets."""
    assert main(["demo", "--out", str(tmp_path), "--n-test", "400", "--presets", "test", "--backend", "cpp"]) == 0
    out = capsys.readouterr().out
    assert "Fleet: 3 models" in out and "## sklearn digits (domain shift)" in out and "| test x2 |" in out
    for slug in ("test", "sklearn-digits", "noise-severity-3", "blur-severity-3"):
        assert (tmp_path / f"reliability-{slug}.png").stat().st_size > 20_000
    d = json.loads((tmp_path / "calibration.json").read_text())["sets"]
    ind, shift = d["test (in distribution)"], d["sklearn digits (domain shift)"]
    i = ind["models"].index("test x1")
    # a real domain shift: accuracy drops and calibration error grows
    assert shift["accuracy"][i] < ind["accuracy"][i] - 0.1
    assert shift["ece"][i] > ind["ece"][i]
