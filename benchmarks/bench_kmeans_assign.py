"""Benchmark: the k-means assignment step ``kmeans_assign`` (nearest centroid + per-centroid sums and counts) and
the k-means built on it (``vlmfast.cluster.kmeans``), against

* FAISS (peer): ``IndexFlatIP`` / ``IndexFlatL2`` ``search(x, 1)`` for the assignment (labels and scores only:
  no sums/counts), and ``faiss.Kmeans`` for k-means (same iterations; with its own k-means++ initialisation, and
  through ``vlmfast.cluster.kmeans(backend="faiss")`` from vlmfast's initialisation);
* the naive torch way (peer 2): ``x @ c.T`` materialised, ``argmax``, ``index_add_``;
* the torch reference ``kmeans_assign_ref`` (the speed-up baseline): the same chunked GEMMs with torch row
  functions.

Every backend the dispatcher offers for the inputs is timed (on CPU: ``cpp`` and ``torch``; the Triton
interpreter is a test vehicle, not timed). The k-means rows carry the objective (sum of squared distances, or of
``1 - cos`` for spherical k-means, over all points) in their notes: equal iterations, comparable quality.

    python benchmarks/bench_kmeans_assign.py                  # the CPU configs (and the GPU ones when present)
    python benchmarks/bench_kmeans_assign.py --config quick   # seconds; what the test suite runs
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(kind="assign", N=2000, k=16, d=32, device="cpu", dtype="float32", metrics=("ip", "l2")),
    "quick-kmeans": dict(kind="kmeans", N=2000, k=8, d=16, device="cpu", dtype="float32", niter=3, spherical=True),
    "cpu-100kx64x256": dict(kind="assign", N=100_000, k=256, d=64, device="cpu", dtype="float32",
                            metrics=("ip", "l2")),
    "cpu-16kx1024x40": dict(kind="assign", N=16_000, k=40, d=1024, device="cpu", dtype="float32",
                            metrics=("ip", "l2")),
    "cpu-kmeans-100kx64x256": dict(kind="kmeans", N=100_000, k=256, d=64, device="cpu", dtype="float32", niter=10,
                                   spherical=True),
    "cpu-kmeans-16kx1024x40": dict(kind="kmeans", N=16_000, k=40, d=1024, device="cpu", dtype="float32", niter=10,
                                   spherical=False),
    "gpu-1Mx128x1024": dict(kind="assign", N=1_000_000, k=1024, d=128, device="cuda", dtype="bfloat16",
                            metrics=("ip", "l2")),
    "gpu-1Mx128x1024-fp32": dict(kind="assign", N=1_000_000, k=1024, d=128, device="cuda", dtype="float32",
                                 metrics=("ip",)),
    "gpu-kmeans-1Mx128x1024": dict(kind="kmeans", N=1_000_000, k=1024, d=128, device="cuda", dtype="float32",
                                   niter=10, spherical=True),
}


def _faiss():
    try:
        import faiss
    except Exception:
        return None
    return faiss


def naive(x, c, metric):
    xf, cf = x.float(), c.float()
    z = xf @ cf.t()
    if metric == "l2":
        z = 2 * z - (cf * cf).sum(1)
    labels = z.argmax(1)
    sums = torch.zeros(c.shape[0], x.shape[1], device=x.device, dtype=torch.float32).index_add_(0, labels, xf)
    return labels, sums, torch.bincount(labels, minlength=c.shape[0])


def _data(cfg):
    N, k, d, device = cfg["N"], cfg["k"], cfg["d"], cfg["device"]
    g = torch.Generator(device=device).manual_seed(0)
    # clustered data: k blobs (what an assignment step sees after a few iterations)
    centers = torch.randn(k, d, generator=g, device=device)
    y = torch.randint(0, k, (N,), generator=g, device=device)
    x = centers[y] + 0.5 * torch.randn(N, d, generator=g, device=device)
    return x, centers, getattr(torch, cfg["dtype"])


def _assign(name, cfg, reps, record):
    from vlmfast import _dispatch
    from vlmfast.functional import kmeans_assign, kmeans_assign_ref

    N, k, d, device = cfg["N"], cfg["k"], cfg["d"], cfg["device"]
    x, c, dtype = _data(cfg)
    x, c = x.to(dtype), (c + 0.1 * torch.randn_like(c)).to(dtype)
    faiss = _faiss()
    gpu_faiss = faiss is not None and faiss.get_num_gpus() > 0
    rows = []
    for metric in cfg["metrics"]:
        reasons = _dispatch.explain("kmeans_assign", x=x, centroids=c, metric=metric)
        backends = [b for b in _dispatch.list_backends() if not reasons[b]]
        providers = {f"kmeans_assign [{b}]": (lambda b=b: kmeans_assign(x, c, metric=metric, backend=b))
                     for b in backends}
        providers["kmeans_assign_ref"] = lambda: kmeans_assign_ref(x, c, metric=metric)
        notes = {}
        peer = "naive torch (N x k materialised)"
        if faiss is not None and (device == "cpu" or gpu_faiss):
            index = (faiss.IndexFlatIP if metric == "ip" else faiss.IndexFlatL2)(d)
            if device != "cpu":
                index = faiss.index_cpu_to_all_gpus(index)
            index.add(c.float().cpu().contiguous().numpy())
            xn = x.float().cpu().contiguous().numpy()  # FAISS takes host float32 (converted once, outside the timing)
            peer = f"faiss IndexFlat{metric.upper()} search k=1"
            providers[peer] = lambda index=index, xn=xn: index.search(xn, 1)
            notes[peer] = "labels + scores only (no sums/counts); host float32 input"
            # agreement of the labels with FAISS (near-ties aside)
            _, fl = index.search(xn, 1)
            ours = kmeans_assign(x, c, metric=metric).labels.cpu()
            agree = float((torch.from_numpy(fl[:, 0]).long() == ours).double().mean())
            notes[f"kmeans_assign [{backends[0]}]"] = f"labels = FAISS's on {100 * agree:.3f}% of rows"
        providers["naive torch (N x k materialised)"] = lambda: naive(x, c, metric)
        timings = {}
        for label, f in providers.items():
            timings[label] = _runner.time_fn(f, device, reps=reps or 10, warmup=1, max_seconds=60)
            mb = _runner.peak_mb(f, device)
            notes[label] = "; ".join(s for s in (notes.get(label, ""), f"peak +{mb:.0f} MB") if s)
        # floor: the GEMM alone (N x k x d FMAs), as torch runs it on this device
        gemm = _runner.time_fn(lambda: x.float() @ c.float().t(), device, reps=reps or 10, warmup=1, max_seconds=30)
        config = f"{metric} N={N} k={k} d={d} {cfg['dtype']} {device}"
        print(f"\n## kmeans_assign: {config}  ({_runner.device_name(device)})\n")
        rows += _runner.report("kmeans_assign", config, device, timings, ref="kmeans_assign_ref", peer=peer,
                               peer2="naive torch (N x k materialised)", floor_ms=gemm.median, notes=notes,
                               extra_note="floor = torch GEMM x @ c.T alone", record=record)
    return rows


def _kmeans(name, cfg, reps, record):
    from vlmfast.cluster._kmeans import _objective, kmeans

    N, k, d, device, niter, spherical = cfg["N"], cfg["k"], cfg["d"], cfg["device"], cfg["niter"], cfg["spherical"]
    x, _, dtype = _data(cfg)
    x = x.to(dtype)
    faiss = _faiss()
    objectives = {}

    def ours():
        r = kmeans(x, k, niter=niter, spherical=spherical, backend="vlmfast")
        objectives["kmeans [vlmfast]"] = r.objective
        return r

    providers = {"kmeans [vlmfast]": ours}
    peer = "kmeans [vlmfast]"
    if faiss is not None:
        def via_faiss():
            r = kmeans(x, k, niter=niter, spherical=spherical, backend="faiss")
            objectives["kmeans [faiss] (vlmfast init)"] = r.objective
            return r

        def raw_faiss():
            from vlmfast.ops.kmeans_assign import kmeans_assign

            xp = F.normalize(x.float(), dim=1) if spherical else x.float()
            xn = xp.cpu().contiguous().numpy()
            km = faiss.Kmeans(d, k, niter=niter, spherical=spherical, seed=0, verbose=False,
                              gpu=faiss.get_num_gpus() > 0, max_points_per_centroid=math.ceil(N / k),
                              min_points_per_centroid=1, init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS)
            km.train(xn)
            _, lab = km.index.search(xn, 1)
            c = torch.from_numpy(km.centroids).to(xp.device)
            s = kmeans_assign(xp, c, metric="ip" if spherical else "l2").scores  # the objective, computed alike
            objectives["faiss.Kmeans (own k-means++)"] = _objective(s, spherical)
            return lab

        providers["kmeans [faiss] (vlmfast init)"] = via_faiss
        providers["faiss.Kmeans (own k-means++)"] = raw_faiss
        peer = "faiss.Kmeans (own k-means++)"
    timings, notes = {}, {}
    for label, f in providers.items():
        timings[label] = _runner.time_fn(f, device, reps=reps or 3, warmup=1, max_seconds=120)
    for label in providers:
        notes[label] = f"objective {objectives[label]:.6g}; {niter} iterations"
    kind = "spherical" if spherical else "l2"
    config = f"kmeans {kind} N={N} k={k} d={d} niter={niter} {cfg['dtype']} {device}"
    print(f"\n## vlmfast.cluster.kmeans: {config}  ({_runner.device_name(device)})\n")
    return _runner.report("kmeans", config, device, timings, ref=None, peer=peer, notes=notes, record=record)


def run_config(name: str, cfg: dict, reps: int, record: bool) -> list[dict]:
    rows = (_assign if cfg["kind"] == "assign" else _kmeans)(name, cfg, reps, record)
    if name == "quick":  # the test suite's one config covers both kinds
        rows += _kmeans("quick-kmeans", CONFIGS["quick-kmeans"], reps, record)
    return rows


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run_config, skip_by_default=("quick", "quick-kmeans"))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
