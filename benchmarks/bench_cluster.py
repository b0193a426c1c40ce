"""Benchmark: the matrix-free cosine k-medoids of ``vlmfast.cluster`` (``sweep``, ``kmedoids``, ``silhouette``)
against the RaVL reference way (``ravl/discover.py::cluster``, specs/methods_ravl.md §1.4 and §4): build the dense
``D = clip(1 - E E^T, 0, 1)`` with a zero diagonal, then for every k scikit-learn-extra ``KMedoids(k,
metric="precomputed", init="k-medoids++", random_state=0).fit(D)`` and ``sklearn.metrics.silhouette_score(D,
labels, metric="precomputed")``, keep the best silhouette (strictly above the running best, from 0) and refit
that k (the reference's redundant refit is timed too).

Tables (one set per data case):

* ``cluster_sweep``: the whole k sweep. Providers: ``vlmfast sweep`` (the plain distance ``1 - x.y``),
  ``vlmfast sweep clip`` (``clip_distances=True``, the reference's clipping reproduced exactly), ``reference: D
  build`` (``tests/_ravl_reference.reference_distance``), ``reference: sweep on prebuilt D`` (the peer: the
  scikit-learn-extra fits + scikit-learn silhouettes + refit, matrix given) and ``reference total`` (the speed-up
  baseline: D build + sweep on D, the sum of the two medians).
* ``cluster_kmedoids``: one fit at a fixed k; ``cluster_silhouette``: one silhouette of the reference fit's
  labels. Same provider scheme (the totals include the D build; vlmfast's clip rows build their pair corrections
  inside each call, as a lone public call does).

Data: ``3 C`` seeded Gaussian blobs on the unit sphere (float32, L2-normalised, ``metric="dot"`` as the
reference uses its normalised embeddings as given). Case ``pos``: blobs around a shared direction, every pairwise
cosine positive (like CLIP embeddings: the clipping never bites); case ``neg``: zero-mean blobs, about half the
pairs have a negative cosine (the clipping changes the distances; vlmfast's clip mode needs one sparse correction
per negative pair, or dense chunked passes above ``max_corrections = 2^26`` pairs — such sweeps are skipped in
the big configs and the skip is printed).

Equality: before the tables, each case prints whether vlmfast's clip-mode sweep chose the reference's k with the
reference's medoids and labels, the largest silhouette difference over the ks, and the same for the fixed-k fit
(they should be equal exactly; rounding near-ties are the only allowed cause of a difference, and any
difference is printed as MISMATCH and carried into the notes). The unclipped mode is compared too: equal to the
reference on ``pos``, a different distance on ``neg``.

Memory (notes): the reference's D is ``N^2 x 4`` bytes (float32 embeddings give a float32 D; scikit-learn-extra
and scikit-learn keep float32/float64 as passed, float64 would be ``N^2 x 8``); measured peaks are the process's
peak-RSS growth during one call (``_runner.peak_mb``: VmHWM after a reset) on CPU, or
``torch.cuda.max_memory_allocated`` growth for vlmfast on a GPU (the reference always runs on the CPU). The
reference's sweep peak is reported as the D build's peak plus the growth beyond the resident D during the sweep.
The peak measurement is each provider's warm-up call. Where the reference cannot run (a 100k x 100k matrix) the
script prints ``not run (N^2 matrix X GB)`` and times vlmfast alone.

    python benchmarks/bench_cluster.py                        # the CPU configs (and the GPU ones when present)
    python benchmarks/bench_cluster.py --config cpu-4k-1024   # the RaVL demo size
    python benchmarks/bench_cluster.py --quick                # seconds; what the test suite runs (= --config quick)
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import _runner  # noqa: E402

# ks: the k range of the sweep (RaVL: range(2C, 5C)); k: the fixed k of the single-fit tables; clip_cases: the
# cases whose clip-mode sweep is timed (neg at N >= 16k would hit the dense fallback: O(N^2 d) per pass);
# ref: whether the reference can run (its N x N matrix must fit); reps / ref_reps: repetitions (--reps overrides);
# threads: torch threads for the config (quick only: a smoke test that must stay in seconds on a loaded machine,
# where OpenMP spin-waits of 2 threads on a busy core make every small op ~100x slower; recorded in the device).
CONFIGS = {
    "quick": dict(N=600, d=64, C=4, ks=range(8, 14), k=12, device="cpu", cases=("pos", "neg"),
                  clip_cases=("pos", "neg"), ref=True, reps=3, ref_reps=3, threads=1),
    "cpu-4k-1024": dict(N=4000, d=1024, C=10, ks=range(20, 50), k=30, device="cpu", cases=("pos", "neg"),
                        clip_cases=("pos", "neg"), ref=True, reps=3, ref_reps=3),
    "cpu-16k-1024": dict(N=16_000, d=1024, C=10, ks=range(20, 50), k=30, device="cpu", cases=("pos", "neg"),
                         clip_cases=("pos",), ref=True, reps=3, ref_reps=2),
    "cpu-16k-64": dict(N=16_000, d=64, C=10, ks=range(20, 50), k=30, device="cpu", cases=("pos", "neg"),
                       clip_cases=("pos",), ref=True, reps=3, ref_reps=2),
    "cpu-100k-64": dict(N=100_000, d=64, C=10, ks=range(20, 50), k=30, device="cpu", cases=("pos", "neg"),
                        clip_cases=("pos",), ref=False, reps=3, ref_reps=0),
    "gpu-16k-1024": dict(N=16_000, d=1024, C=10, ks=range(20, 50), k=30, device="cuda", cases=("pos", "neg"),
                         clip_cases=("pos",), ref=True, reps=5, ref_reps=2),
    "gpu-100k-64": dict(N=100_000, d=64, C=10, ks=range(20, 50), k=30, device="cuda", cases=("pos", "neg"),
                        clip_cases=("pos",), ref=False, reps=5, ref_reps=0),
}
MAX_CORRECTIONS = 1 << 26  # vlmfast.cluster.PairCorrections' default


def blobs(N: int, d: int, n_blobs: int, case: str, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    """(N, d) float32 unit vectors: ``n_blobs`` Gaussian blobs (noise of norm ~``spread`` around unit centres);
    ``pos``: the centres share a direction (weight 1.5), so every cosine is positive; ``neg``: zero-mean centres."""
    rng = np.random.default_rng(seed)
    cent = rng.normal(size=(n_blobs, d))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    if case == "pos":
        m = rng.normal(size=d)
        cent = cent + 1.5 * m / np.linalg.norm(m)
    y = rng.integers(0, n_blobs, N)
    x = cent[y] + spread * rng.normal(size=(N, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def negative_fraction(x: np.ndarray, m: int = 2000) -> float:
    """Fraction of the off-diagonal pairs with a negative cosine, on a seeded sample of ``m`` points."""
    idx = np.random.default_rng(1).choice(x.shape[0], min(m, x.shape[0]), replace=False)
    s = x[idx] @ x[idx].T
    np.fill_diagonal(s, 1.0)
    return float((s < 0).sum()) / max(1, s.size - len(idx))


def reference_sweep_on(D: np.ndarray, ks) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """The reference's sweep on a prebuilt D (``tests/_ravl_reference.reference_cluster`` minus the build):
    labels, medoids, best k, {k: silhouette}."""
    from _ravl_reference import reference_kmedoids_class
    from sklearn.metrics import silhouette_score

    km = reference_kmedoids_class()
    best_s, best_k, scores = 0.0, 0, {}
    for k in ks:
        labels = km(n_clusters=int(k), random_state=0, metric="precomputed", init="k-medoids++").fit(D).labels_
        s = silhouette_score(D, labels, metric="precomputed")
        scores[int(k)] = float(s)
        if s > best_s:
            best_s, best_k = s, int(k)
    fit = km(n_clusters=best_k, random_state=0, metric="precomputed", init="k-medoids++").fit(D)  # the refit
    return fit.labels_, fit.medoid_indices_, best_k, scores


def _measure(fn, device: str, reps: int, mem_device: str, max_seconds: float = 120.0):
    """(Timing, peak MB): the peak-memory call doubles as the warm-up."""
    mb = max(0.0, _runner.peak_mb(fn, mem_device))
    return _runner.time_fn(fn, device, reps=reps, warmup=0, max_seconds=max_seconds), mb


def _total(a: _runner.Timing, b: _runner.Timing) -> _runner.Timing:
    return _runner.Timing(a.median + b.median, a.p20 + b.p20, a.p80 + b.p80, min(a.reps, b.reps))


def _same(ours: torch.Tensor, ref: np.ndarray) -> tuple[bool, int]:
    o = ours.cpu().numpy()
    return bool(o.shape == ref.shape and (o == ref).all()), int((o != ref).sum()) if o.shape == ref.shape else -1


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e9 else f"{nbytes / 2**20:.0f} MB"


def run_case(name: str, cfg: dict, case: str, reps: int | None, record: bool) -> list[dict]:
    from vlmfast.cluster import kmedoids, silhouette, sweep

    N, d, C, ks, k, device = cfg["N"], cfg["d"], cfg["C"], list(cfg["ks"]), cfg["k"], cfg["device"]
    vreps = reps or cfg["reps"]
    rreps = reps or cfg["ref_reps"]
    x = blobs(N, d, 3 * C, case)
    xt = torch.from_numpy(x).to(device)
    neg = negative_fraction(x)
    npairs = neg * N * (N - 1)
    clip_sweep = case in cfg["clip_cases"]
    dense = npairs > MAX_CORRECTIONS
    mem_v = device  # vlmfast's peak: CUDA allocator on a GPU, RSS on a CPU
    dbytes = 4 * N * N
    head = (f"{case} N={N} d={d} C={C} blobs={3 * C} ks={ks[0]}..{ks[-1]} k={k} {device}")
    data_note = f"neg. cosines ~{100 * neg:.3g}% of pairs (~{npairs:.3g})"
    print(f"\n# bench_cluster {name}: {head}  ({_runner.device_name(device)}); {data_note}"
          + ("; clip mode: dense fallback (> 2^26 negative pairs)" if dense else ""))

    out: dict[str, object] = {}
    rows: list[dict] = []
    # first-call costs (imports, lazy initialisation) stay out of the peaks and timings
    sweep(xt[:64], [2, 3], metric="dot", clip_distances=True)
    if cfg["ref"]:
        import sklearn.metrics  # noqa: F401
        from _ravl_reference import reference_kmedoids_class

        reference_kmedoids_class()

    # ------------------------------------------------------------------------------------------------ sweep
    def v_sweep():
        out["sweep"] = sweep(xt, ks, metric="dot")
        return out["sweep"]

    def v_sweep_clip():
        out["sweep_clip"] = sweep(xt, ks, metric="dot", clip_distances=True)
        return out["sweep_clip"]

    timings, notes = {}, {}
    t, mb = _measure(v_sweep, device, vreps, mem_v)
    timings["vlmfast sweep"], notes["vlmfast sweep"] = t, f"peak +{mb:.0f} MB; unclipped 1 - x.y"
    if clip_sweep:
        t, mb = _measure(v_sweep_clip, device, vreps, mem_v)
        timings["vlmfast sweep clip"] = t
        notes["vlmfast sweep clip"] = f"peak +{mb:.0f} MB; clip_distances=True" + ("; dense fallback" if dense else "")
    else:
        why = (f"~{npairs:.3g} negative pairs > max_corrections 2^26: the dense fallback costs O(N^2 d) per pass "
               "and iteration; nor its single-fit and silhouette clip rows" if dense
               else f"{case!r} is not in this config's clip_cases")
        print(f"vlmfast sweep clip: not run on {case} ({why})")

    D = None
    if cfg["ref"]:
        from _ravl_reference import reference_distance

        def r_build():
            out["D"] = reference_distance(x)
            return out["D"]

        def r_sweep():
            out["ref_sweep"] = reference_sweep_on(out["D"], ks)
            return out["ref_sweep"]

        tb, mb_build = _measure(r_build, "cpu", rreps, "cpu")
        D = out["D"]
        assert D.dtype == np.float32 and D.shape == (N, N)
        ts, mb_sweep = _measure(r_sweep, "cpu", rreps, "cpu", max_seconds=600.0)
        ref_total = "reference total (D build + sweep on D)"
        timings["reference: D build"], notes["reference: D build"] = tb, (
            f"peak +{mb_build:.0f} MB; D = N^2 x 4 B float32 = {_gb(dbytes)} (float64: {_gb(2 * dbytes)})")
        timings["reference: sweep on prebuilt D"] = ts
        notes["reference: sweep on prebuilt D"] = (f"peak +{mb_sweep:.0f} MB beyond the resident D; "
                                                   f"{len(ks)} fits + silhouettes + 1 refit")
        timings[ref_total] = _total(tb, ts)
        notes[ref_total] = f"peak ~{mb_build + mb_sweep:.0f} MB (build peak + sweep growth); median sum"

        # equality: the clip-mode sweep must be the reference's sweep
        labels_r, medoids_r, k_r, scores_r = out["ref_sweep"]
        for label, key in (("vlmfast sweep clip", "sweep_clip"), ("vlmfast sweep", "sweep")):
            if key not in out:
                continue
            s = out[key]
            same_m, _ = _same(s.medoids, medoids_r)
            same_l, nl = _same(s.labels, labels_r)
            ds = max(abs(s.scores[kk] - scores_r[kk]) for kk in ks)
            ok = s.k == k_r and same_m and same_l
            expected = key == "sweep_clip" or neg == 0.0
            verdict = ("equal" if ok else ("MISMATCH" if expected else "differs (unclipped distance on negative "
                                           "cosines: a different objective)"))
            msg = (f"best k {s.k} vs reference {k_r}; medoids {'==' if same_m else '!='}; labels "
                   f"{'==' if same_l else f'!= ({nl} differ)'}; max |silhouette diff| {ds:.1e}")
            print(f"equality [{label} vs reference sweep]: {verdict}: {msg}")
            notes[label] += f"; vs reference: {verdict} (k {s.k}/{k_r}, dsil {ds:.0e})"
    else:
        print(f"reference: not run (N^2 matrix {_gb(dbytes)} float32, {_gb(2 * dbytes)} float64)")
        if "sweep_clip" in out:
            same_m = bool((out["sweep_clip"].medoids == out["sweep"].medoids).all()) \
                if out["sweep_clip"].k == out["sweep"].k else False
            print(f"vlmfast clip vs unclipped sweep: best k {out['sweep_clip'].k} vs {out['sweep'].k}; medoids "
                  f"{'==' if same_m else '!='} (should be equal when no cosine is negative)")

    ref = "reference total (D build + sweep on D)" if cfg["ref"] else None
    peer = "reference: sweep on prebuilt D" if cfg["ref"] else "vlmfast sweep"
    extra = data_note + ("" if cfg["ref"] else f"; reference not run (N^2 matrix {_gb(dbytes)})")
    print(f"\n## cluster_sweep: {head}\n")
    rows += _runner.report("cluster_sweep", head, device, timings, ref=ref, peer=peer, notes=notes,
                           extra_note=extra, record=record)

    # ------------------------------------------------------------------------------------- one fit at k
    def v_fit():
        out["fit"] = kmedoids(xt, k, metric="dot")
        return out["fit"]

    def v_fit_clip():
        out["fit_clip"] = kmedoids(xt, k, metric="dot", clip_distances=True)
        return out["fit_clip"]

    timings, notes = {}, {}
    t, mb = _measure(v_fit, device, vreps, mem_v)
    timings["vlmfast kmedoids"] = t
    notes["vlmfast kmedoids"] = f"peak +{mb:.0f} MB; {out['fit'].n_iter} iterations"
    if clip_sweep or not dense:
        t, mb = _measure(v_fit_clip, device, vreps, mem_v)
        timings["vlmfast kmedoids clip"] = t
        notes["vlmfast kmedoids clip"] = (f"peak +{mb:.0f} MB; {out['fit_clip'].n_iter} iterations; "
                                          "incl. the pair-corrections pass")
    if D is not None:
        from _ravl_reference import reference_kmedoids_class

        km = reference_kmedoids_class()

        def r_fit():
            out["ref_fit"] = km(n_clusters=k, random_state=0, metric="precomputed", init="k-medoids++").fit(D)
            return out["ref_fit"]

        tf, mbf = _measure(r_fit, "cpu", max(rreps, 3), "cpu")
        timings["reference: KMedoids on prebuilt D"] = tf
        notes["reference: KMedoids on prebuilt D"] = (f"peak +{mbf:.0f} MB beyond D; "
                                                      f"{out['ref_fit'].n_iter_ + 1} iterations")
        timings["reference total (D build + fit)"] = _total(tb, tf)
        notes["reference total (D build + fit)"] = f"peak ~{mb_build + mbf:.0f} MB; D {_gb(dbytes)}"
        rf = out["ref_fit"]
        for label, key in (("vlmfast kmedoids clip", "fit_clip"), ("vlmfast kmedoids", "fit")):
            if key not in out:
                continue
            same_m, nm = _same(out[key].medoids, rf.medoid_indices_)
            same_l, nl = _same(out[key].labels, rf.labels_)
            expected = key == "fit_clip" or neg == 0.0
            verdict = "equal" if same_m and same_l else ("MISMATCH" if expected else "differs (unclipped)")
            print(f"equality [{label} vs reference KMedoids k={k}]: {verdict}: medoids "
                  f"{'==' if same_m else f'!= ({nm} differ)'}; labels {'==' if same_l else f'!= ({nl} differ)'}")
            notes[label] += f"; vs reference: {verdict}"
    ref = "reference total (D build + fit)" if D is not None else None
    peer = "reference: KMedoids on prebuilt D" if D is not None else "vlmfast kmedoids"
    print(f"\n## cluster_kmedoids: {head}\n")
    rows += _runner.report("cluster_kmedoids", head, device, timings, ref=ref, peer=peer, notes=notes,
                           extra_note=extra, record=record)

    # ------------------------------------------------------------------------------ one silhouette at k
    labels_np = out["ref_fit"].labels_ if D is not None else out["fit"].labels.cpu().numpy()
    labels_t = torch.from_numpy(np.ascontiguousarray(labels_np)).to(device)
    res: dict[str, float] = {}

    def v_sil():
        res["vlmfast silhouette"] = silhouette(xt, labels_t, metric="dot")

    def v_sil_clip():
        res["vlmfast silhouette clip"] = silhouette(xt, labels_t, metric="dot", clip_distances=True)

    timings, notes = {}, {}
    t, mb = _measure(v_sil, device, vreps, mem_v)
    timings["vlmfast silhouette"], notes["vlmfast silhouette"] = t, f"peak +{mb:.0f} MB"
    if clip_sweep or not dense:
        t, mb = _measure(v_sil_clip, device, vreps, mem_v)
        timings["vlmfast silhouette clip"] = t
        notes["vlmfast silhouette clip"] = f"peak +{mb:.0f} MB; incl. the pair-corrections pass"
    if D is not None:
        from sklearn.metrics import silhouette_score

        def r_sil():
            res["ref"] = float(silhouette_score(D, labels_np, metric="precomputed"))

        tsil, mbs = _measure(r_sil, "cpu", max(rreps, 3), "cpu")
        timings["reference: silhouette_score on prebuilt D"] = tsil
        notes["reference: silhouette_score on prebuilt D"] = f"peak +{mbs:.0f} MB beyond D; value {res['ref']:.6f}"
        timings["reference total (D build + silhouette)"] = _total(tb, tsil)
        notes["reference total (D build + silhouette)"] = f"peak ~{mb_build + mbs:.0f} MB; D {_gb(dbytes)}"
        for label in ("vlmfast silhouette clip", "vlmfast silhouette"):
            if label in res:
                diff = abs(res[label] - res["ref"])
                expected = label.endswith("clip") or neg == 0.0
                verdict = "equal" if diff < 1e-5 else ("MISMATCH" if expected else "differs (unclipped)")
                print(f"equality [{label} vs silhouette_score k={k}]: {verdict}: {res[label]:.6f} vs "
                      f"{res['ref']:.6f} (|diff| {diff:.1e})")
                notes[label] += f"; vs reference: {verdict} (|diff| {diff:.0e})"
    # floor: the GEMM x @ S^T (N x k x d) a silhouette from cluster sums cannot avoid, as torch runs it here
    sums = torch.zeros(k, d, device=device).index_add_(0, labels_t.long() % k, xt)
    floor = _runner.time_fn(lambda: xt @ sums.T, device, reps=max(vreps, 5), warmup=1, max_seconds=30).median
    ref = "reference total (D build + silhouette)" if D is not None else None
    peer = "reference: silhouette_score on prebuilt D" if D is not None else "vlmfast silhouette"
    print(f"\n## cluster_silhouette: {head}\n")
    rows += _runner.report("cluster_silhouette", head, device, timings, ref=ref, peer=peer, notes=notes,
                           floor_ms=floor, extra_note=extra + "; floor = torch GEMM x @ S.T (N x k x d) alone",
                           record=record)
    return rows


def run_config(name: str, cfg: dict, reps: int | None, record: bool) -> list[dict]:
    rows: list[dict] = []
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    for case in cfg["cases"]:
        rows += run_case(name, cfg, case, reps, record)
    return rows


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for arg in argv for a in (("--config", "quick") if arg == "--quick" else (arg,))]
    return _runner.cli(argv, __doc__, CONFIGS, run_config)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # sklearn 1.9 deprecates stable_cumsum (sklearn-extra)
    raise SystemExit(main())
