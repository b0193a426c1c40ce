"""Reference implementations for the RaVL audit tests: the reference's own clustering stack and a literal,
loop-per-cluster restatement of its discovery semantics (our own code, written from ravl/discover.py and
ravl/discover_utils.py of Stanford-AIMI/RaVL), used as oracles for the vectorised vlmfast versions.

scikit-learn-extra 0.3.0 (the reference's KMedoids) ships Cython modules built against numpy 1, which do not
import under numpy 2; its KMedoids "alternate" method is pure Python, so :func:`reference_kmedoids_class` loads
that one module from the installed distribution under a private name, with the Cython helpers (used only by
the "pam" method and the "build" init) stubbed out.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np

_PKG = "_vlmfast_skx_ref"


def reference_kmedoids_class():
    """scikit-learn-extra's ``KMedoids`` class (or ImportError when the distribution is not installed)."""
    name = f"{_PKG}._k_medoids"
    if name in sys.modules:
        return sys.modules[name].KMedoids
    spec = importlib.util.find_spec("sklearn_extra")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scikit-learn-extra is not installed (it is in the [test] extra)")
    path = f"{list(spec.submodule_search_locations)[0]}/cluster/_k_medoids.py"
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = []
    helper = types.ModuleType(f"{_PKG}._k_medoids_helper")

    def _unavailable(*_a, **_k):
        raise NotImplementedError("only the 'alternate' method and the k-medoids++ init are loaded")

    helper._compute_optimal_swap = helper._build = _unavailable
    sys.modules[_PKG] = pkg
    sys.modules[helper.__name__] = helper
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = mod
    mod_spec.loader.exec_module(mod)
    return mod.KMedoids


def reference_distance(emb: np.ndarray) -> np.ndarray:
    """The reference's dense distance matrix: clip(1 - E E^T, 0, 1) with a zero diagonal."""
    d = 1.0 - emb @ emb.T
    np.clip(d, 0, 1, out=d)
    np.fill_diagonal(d, 0)
    return d


def reference_cluster(emb: np.ndarray, ks):
    """The reference's sweep: KMedoids for every k, best silhouette strictly above the running best (from 0)."""
    from sklearn.metrics import silhouette_score

    km = reference_kmedoids_class()
    d = reference_distance(emb)
    best = (0, 0)
    scores = {}
    for k in ks:
        labels = km(n_clusters=int(k), random_state=0, metric="precomputed", init="k-medoids++").fit(d).labels_
        s = silhouette_score(d, labels, metric="precomputed")
        scores[int(k)] = s
        if s > best[0]:
            best = (s, int(k))
    fit = km(n_clusters=best[1], random_state=0, metric="precomputed", init="k-medoids++").fit(d)
    return fit.labels_, fit.medoid_indices_, best[1], scores


def reference_identify_and_rank(emb, clusters, medoids, y, pred, image_scores, region_scores, counts,
                                threshold=0.25):
    """The reference's identify + rank, restated one cluster and one image at a time (our code, the reference's
    semantics: per-cluster Python sets, dict of gaps in set order, per-image region argmax, argsort of the gap
    list reversed). Returns [(cluster id, gap, influence, ranked regions, [(label, acc_in, n_in, acc_out,
    n_out)])] for the kept clusters, in order."""
    n = len(y)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
    image_of_region = {}
    for i in range(n):
        for r in range(offsets[i], offsets[i + 1]):
            image_of_region[r] = i
    ids = sorted(set(clusters.tolist()))
    gaps, infl, crit, tables = [], [], [], []
    for c in ids:
        members = set(np.where(clusters == c)[0].tolist())
        in_imgs = sorted({image_of_region[r] for r in members})
        in_set = set(in_imgs)
        labels_in = y[in_imgs]
        cls = list(set(labels_in))
        out_imgs = [i for i in range(n) if y[i] in cls and i not in in_set]
        g, table = {}, []
        for l in cls:
            a = [i for i in in_imgs if y[i] == l]
            b = [i for i in out_imgs if y[i] == l]
            if not a or not b:
                continue
            acc_a = np.mean([pred[i] == l for i in a])
            acc_b = np.mean([pred[i] == l for i in b])
            g[l] = (min(len(a), len(b)) / (len(a) + len(b))) * 2 * (acc_a - acc_b)
            table.append((int(l), float(acc_a), len(a), float(acc_b), len(b)))
        lists = {}
        for i in in_imgs:
            regs = list(range(offsets[i], offsets[i + 1]))
            if len(regs) <= 1:
                continue
            p = int(np.argmax(image_scores[i]))
            col = [region_scores[r][p] for r in regs]
            best = regs[int(np.argmax(col))]
            if pred[i] != y[i] and y[i] in g and g[y[i]] < 0:
                lists.setdefault(y[i], []).append(best in members)
        h = max(np.mean(v) for v in lists.values()) if lists else -np.inf
        gaps.append(sum(np.abs(v) for v in g.values()))
        infl.append(h)
        crit.append(any(v > 0 for v in g.values()) and any(v < 0 for v in g.values()))
        tables.append(table)
    order = np.argsort(np.array(gaps))[::-1]
    out = []
    for a in order:
        if crit[a] and infl[a] >= threshold:
            c = ids[a]
            idx = np.where(clusters == c)[0]
            sim = (emb[idx] @ emb[medoids[c]].reshape(1, -1).T).flatten()
            out.append((c, gaps[a], infl[a], idx[np.argsort(sim)[::-1]].tolist(), tables[a]))
    return out


def planted_scores(seed, n=400, n_classes=5, regions=4, d=32, spurious_class=2, strength=0.9, noise=0.35,
                   duplicates=False):
    """A synthetic discovery case with a planted feature: every image has ``regions`` regions, one the digit
    (class prototype + noise), one maybe the feature (a fixed direction + noise), the rest background; a
    'model' that reads the feature as ``spurious_class`` (predictions flip to it when the feature is present
    with probability ``strength``). Returns (emb, y, pred, image_scores, region_scores, counts, is_feature)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(n_classes + 2, d))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    feat, bg = protos[n_classes], protos[n_classes + 1]
    y = rng.integers(0, n_classes, n)
    has = rng.random(n) < 0.5
    counts = np.full(n, regions, dtype=np.int64)
    if not duplicates:
        counts[rng.random(n) < 0.1] = regions - 1
    emb, is_feat, region_cls = [], [], []
    for i in range(n):
        rows = [protos[y[i]] + noise * rng.normal(size=d) / np.sqrt(d) * 3]
        kinds = [y[i]]
        if has[i] and counts[i] >= 2:
            rows.append(feat if duplicates else feat + noise * rng.normal(size=d) / np.sqrt(d) * 3)
            kinds.append(-1)
        while len(rows) < counts[i]:
            rows.append(bg + noise * rng.normal(size=d) / np.sqrt(d) * 3)
            kinds.append(-2)
        emb.extend(rows)
        is_feat.extend([k == -1 for k in kinds])
        region_cls.extend(kinds)
    emb = np.asarray(emb)
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    present = np.array([has[i] and counts[i] >= 2 for i in range(n)])
    pred = y.copy()
    flip = present & (rng.random(n) < strength)
    pred[flip] = spurious_class
    wrong = (~present) & (y == spurious_class) & (rng.random(n) < strength)
    pred[wrong] = (spurious_class + 1) % n_classes
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), pred] += 6.0
    image_scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rl = rng.normal(size=(len(emb), n_classes))
    rc = np.array(region_cls)
    rl[rc >= 0, rc[rc >= 0]] += 4.0
    rl[rc == -1, spurious_class] += 8.0
    region_scores = np.exp(rl) / np.exp(rl).sum(1, keepdims=True)
    return (emb, y, pred, image_scores.astype(np.float32), region_scores.astype(np.float32), counts,
            np.asarray(is_feat))
