"""Reliability diagrams: a real PNG with content, for one model and for a grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from _utils import make_case
from vlmfast.metrics import calibration
from vlmfast.plot import reliability_diagram


def _png_stats(path):
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return img.shape, img.std()


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_grid_of_models(tmp_path, binning):
    logits, labels = make_case(5, 500, 6, seed=1)
    res = calibration(logits, labels, 10, binning=binning, backend="cpp")
    out = reliability_diagram(res, tmp_path / "sub" / "rd.png", [f"m{i}" for i in range(5)])
    (h, w, _), std = _png_stats(out)
    assert out.exists() and w > h > 300  # 4 columns x 2 rows
    assert std > 20  # not a blank canvas


def test_single_model_and_dac_scale(tmp_path):
    logits, labels = make_case(1, 300, 4, seed=2)
    res = calibration(logits[0], labels, 10, convention="dac", backend="torch")
    out = reliability_diagram(res, tmp_path / "one.png", title="one model")
    (h, w, _), std = _png_stats(out)
    assert h > 200 and w > 200 and std > 20


def test_max_models_and_errors(tmp_path):
    res = calibration(torch.randn(7, 50, 3), torch.randint(0, 3, (50,)), backend="torch")
    out = reliability_diagram(res, tmp_path / "few.png", max_models=2)
    (_, w, _), _ = _png_stats(out)
    assert w < 1200
    with pytest.raises(ValueError, match="model_names"):
        reliability_diagram(res, tmp_path / "x.png", ["a"])
    with pytest.raises(TypeError, match="CalibrationResult"):
        reliability_diagram({"ece": 1}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="max_models"):
        reliability_diagram(res, tmp_path / "x.png", max_models=0)
    with pytest.raises(ValueError, match="ncols: expected a positive int or None, got -1"):
        reliability_diagram(res, tmp_path / "x.png", ncols=-1)
    with pytest.raises(ValueError, match="dpi"):
        reliability_diagram(res, tmp_path / "x.png", dpi=0)
    with pytest.raises(TypeError, match="path: expected a str or os.PathLike, got int"):
        reliability_diagram(res, 3)
    assert not (tmp_path / "x.png").exists()
