"""Shared test helpers: data generators, an independent float64 numpy implementation of every calibration metric,
an independent re-implementation of the DAC/DOR reference semantics, and a verbose allclose."""

from __future__ import annotations

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def np_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def far_from_edges(conf: np.ndarray, n_bins_list, margin: float = 1e-5) -> np.ndarray:
    """True where a confidence is at least ``margin`` away from every interior bin edge (and 1.0 counts as safe)."""
    ok = np.ones(conf.shape, dtype=bool)
    for n in n_bins_list:
        scaled = conf * n
        dist = np.abs(scaled - np.round(scaled)) / n
        near = (dist < margin) & (conf < 1.0) & (np.round(scaled) > 0)
        ok &= ~near
    return ok


def make_case(
    M: int,
    N: int,
    C: int,
    *,
    n_bins_list=(15,),
    seed: int = 0,
    scale: float = 2.5,
    calibrated: bool = True,
    temperatures=None,
    saturated: int = 0,
    tied: int = 0,
):
    """Logits (M, N, C) float64 and labels (N,) whose confidences avoid bin edges (so float32 and float64
    evaluations bin alike). Labels are drawn from the softmax of a base logit (a calibrated model at T = 1);
    model m sees base / T_m. ``saturated`` rows get one logit 60 above the rest (confidence exactly 1.0);
    ``tied`` rows have all logits equal (prediction = class 0)."""
    rng = np.random.default_rng(seed)
    temps = np.asarray(temperatures if temperatures is not None else np.linspace(0.6, 1.8, M), dtype=np.float64)
    base = rng.normal(size=(N, C)) * scale
    if calibrated:
        p = np_softmax(base)
        labels = np.array([rng.choice(C, p=row) for row in p]) if C > 1 else np.zeros(N, dtype=np.int64)
    else:
        labels = rng.integers(0, C, size=N)
    logits = base[None] / temps[:, None, None]
    for _ in range(50):
        conf = np_softmax(logits).max(axis=-1)
        bad = ~far_from_edges(conf, n_bins_list)
        if not bad.any():
            break
        rows = np.nonzero(bad.any(axis=0))[0]
        logits[:, rows] += rng.normal(size=(M, len(rows), C)) * 0.01
    if saturated:
        rows = rng.choice(N, size=min(saturated, N), replace=False)
        logits[:, rows] = 0.0
        hot = rng.integers(0, C, size=len(rows))
        logits[:, rows, hot] = 60.0
    if tied:
        rows = rng.choice(N, size=min(tied, N), replace=False)
        logits[:, rows] = 0.25
    return torch.from_numpy(logits), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------
# Independent numpy implementation (float64), standard convention
# ---------------------------------------------------------------------------------------------------------


def np_row_stats(logits: np.ndarray, labels: np.ndarray):
    p = np_softmax(logits)
    conf = p.max(axis=-1)
    pred = p.argmax(axis=-1)  # first index on ties, like torch.argmax
    x = np.asarray(logits, dtype=np.float64)
    mx = x.max(axis=-1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(axis=-1, keepdims=True)))[..., 0]
    xy = np.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
    py = np.take_along_axis(p, labels[..., None], axis=-1)[..., 0]
    nll = lse - xy
    brier = (p * p).sum(axis=-1) - 2 * py + 1
    return conf, pred, nll, brier


def _errors_from_groups(conf, correct, groups, N):
    ece = 0.0
    sq = 0.0
    mce = 0.0
    mce_w = 0.0
    for g in np.unique(groups):
        sel = groups == g
        n = sel.sum()
        gap = abs(correct[sel].mean() - conf[sel].mean())
        ece += n / N * gap
        sq += n / N * gap * gap
        mce = max(mce, gap)
        mce_w = max(mce_w, n / N * gap)
    return ece, np.sqrt(sq), mce, mce_w


def np_width_bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    b = np.searchsorted(edges, conf, side="right") - 1  # [lo, hi)
    return np.minimum(b, n_bins - 1)  # last bin closed


def np_mass_bins(conf: np.ndarray, n_bins: int) -> np.ndarray:
    order = np.argsort(conf, kind="stable")
    groups = np.empty(len(conf), dtype=np.int64)
    for i, chunk in enumerate(np.array_split(order, n_bins)):
        groups[chunk] = i
    return groups


def np_calibration(logits: np.ndarray, labels: np.ndarray, n_bins: int, per_batch: int | None = None) -> dict:
    """All metrics of one model (logits (N, C)), standard convention."""
    conf, pred, nll, brier = np_row_stats(logits, labels)
    correct = (pred == labels).astype(np.float64)
    N = len(labels)
    wb = np_width_bins(conf, n_bins)
    ece, rmsce, mce, mce_w = _errors_from_groups(conf, correct, wb, N)
    ace = _errors_from_groups(conf, correct, np_mass_bins(conf, n_bins), N)[0]
    count = np.bincount(wb, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        bin_acc = np.bincount(wb, weights=correct, minlength=n_bins) / count
        bin_conf = np.bincount(wb, weights=conf, minlength=n_bins) / count
    out = dict(
        ece=ece, rmsce=rmsce, mce=mce, mce_weighted=mce_w, ace=ace, nll=nll.mean(), brier=brier.mean(),
        accuracy=correct.mean(), confidence=conf.mean(), bin_count=count, bin_accuracy=bin_acc,
        bin_confidence=bin_conf, conf=conf, correct=correct,
    )
    if per_batch is not None:
        tot = 0.0
        for s in range(0, N, per_batch):
            c, k = conf[s : s + per_batch], correct[s : s + per_batch]
            tot += len(c) / N * _errors_from_groups(c, k, np_width_bins(c, n_bins), len(c))[0]
        out["ece_per_batch"] = tot
    return out


# ---------------------------------------------------------------------------------------------------------
# The DAC / DOR reference semantics (ml-stat-Sustech/CLIP_Calibration tools/metrics.py), re-expressed here
# ---------------------------------------------------------------------------------------------------------


def dac_ece(conf, correct, n_bins):
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.digitize(conf, edges) - 1  # conf == 1.0 -> index n_bins: in no bin for the means
    weights = np.histogram(conf, edges)[0] / len(conf)  # but counted in the last bin's weight
    total = 0.0
    for b in range(n_bins):
        sel = idx == b
        acc = correct[sel].mean() if sel.any() else 0.0
        cf = conf[sel].mean() if sel.any() else 0.0
        total += weights[b] * abs(cf - acc)
    return 100.0 * total


def dac_mce(conf, correct, n_bins):
    groups = np.digitize(conf, np.linspace(0, 1, n_bins + 1)[1:-1])
    N = len(conf)
    return 100.0 * max(abs(correct[groups == g].mean() - conf[groups == g].mean()) * (groups == g).sum() / N
                       for g in np.unique(groups))


def dac_quantile_groups(values, n_bins):
    from sklearn.preprocessing import KBinsDiscretizer

    kb = KBinsDiscretizer(n_bins=n_bins, encode="ordinal", strategy="quantile", quantile_method="linear")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kb.fit_transform(np.asarray(values, dtype=np.float64)[:, None])[:, 0].astype(np.int64)


def dac_ace(conf, correct, n_bins):
    g = dac_quantile_groups(conf, n_bins)
    return 100.0 * _errors_from_groups(conf, correct, g, len(conf))[0]


def dac_piece(conf, correct, prox, conf_bins=10, prox_bins=10):
    pg = dac_quantile_groups(prox, prox_bins)
    cg = np.digitize(conf, np.linspace(0, 1, conf_bins + 1)[1:-1])
    return 100.0 * _errors_from_groups(conf, correct, pg * 1000 + cg, len(conf))[0]


# ---------------------------------------------------------------------------------------------------------
# Assertions
# ---------------------------------------------------------------------------------------------------------


def assert_close(actual, expected, atol: float, rtol: float, name: str = "value"):
    a = torch.as_tensor(actual).detach().to("cpu", torch.float64)
    e = torch.as_tensor(expected).detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    both_nan = torch.isnan(a) & torch.isnan(e)
    bad = ~(torch.isclose(a, e, atol=atol, rtol=rtol) | both_nan)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = (a - e).abs()[bad].max().item()
        detail = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.10g} vs {e[tuple(i)].item():.10g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatched (atol={atol}, rtol={rtol}, worst |diff| {worst:.3g}); "
            f"first: {detail}"
        )


def assert_bins_match(a, b, conf_ref: torch.Tensor, n_bins: int, margin: float = 1e-6):
    """Bin counts/correct of two backends must match exactly, except that samples whose reference confidence lies
    within ``margin`` of a bin edge may sit in the neighbouring bin (float32 rounding of a sum)."""
    conf = conf_ref.detach().to("cpu", torch.float64)
    scaled = conf * n_bins
    near = ((scaled - scaled.round()).abs() / n_bins < margin) & (conf < 1.0)
    allowed = 2 * near.sum(dim=-1)  # per model: each moved sample changes two bins by one
    for name in ("bin_count", "bin_correct"):
        diff = (getattr(a, name).cpu() - getattr(b, name).cpu()).abs().sum(dim=-1)
        assert bool((diff <= allowed).all()), f"{name}: differs by {diff.tolist()} (allowed {allowed.tolist()})"
    for name in ("saturated_count", "saturated_correct"):
        assert torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()), name


# ---------------------------------------------------------------------------------------------------------
# Fleet
# ---------------------------------------------------------------------------------------------------------


def fake_discovery(monkeypatch):
    """Discovery on a 1-step random model finds nothing; stand in a result whose top cluster is cluster 0 of the
    real medoids (the plan's code path is unchanged)."""
    import vlmfast.audit.spurious as S

    real = S.discover

    def discover(model, data, classnames, **kw):
        res = real(model, data, classnames, **kw)
        if not res.found:
            from vlmfast.audit.spurious import SpuriousCluster

            res.clusters = [SpuriousCluster(id=0, gap=0.5, influence=1.0, regions=[0], medoid=0, table=[],
                                            images=[0], attribute=9, attribute_name="nine")]
        return res

    monkeypatch.setattr(S, "discover", discover)
