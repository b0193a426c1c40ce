"""RaVL discovery (vlmfast.audit.spurious.discover_from_scores) against a literal restatement of the official
implementation's semantics (tests/_ravl_reference.py) and the reference's clustering stack."""

import numpy as np
import pytest
import torch

from _ravl_reference import planted_scores, reference_cluster, reference_identify_and_rank
from vlmfast.audit.spurious import discover, discover_from_scores, precision_at_k, zero_shot_scores
from vlmfast.cluster import kmedoids

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _compare(ours, ref):
    got = [(c.id, c.gap, c.influence, c.regions) for c in ours.clusters]
    want = [(c, g, h, r) for c, g, h, r, _ in ref]
    assert got == want  # ids, order, gap and influence to the last bit, region ranking
    for c, (_, _, _, _, table) in zip(ours.clusters, ref):
        assert [(r.label, r.acc_present, r.n_present, r.acc_absent, r.n_absent) for r in c.table] == table


@pytest.mark.parametrize("seed", range(6))
def test_given_clustering_equals_the_reference_exactly(seed):
    emb, y, pred, isc, rsc, cnt, _ = planted_scores(seed, n=250, duplicates=seed % 2 == 1)
    rng = np.random.default_rng(seed)
    k = int(rng.integers(4, 16))
    # a random clustering (many clusters pass), then a k-medoids one
    cl = np.unique(rng.integers(0, k, len(emb)), return_inverse=True)[1]
    med = np.array([rng.choice(np.where(cl == c)[0]) for c in range(cl.max() + 1)])
    _compare(discover_from_scores(emb, y, pred, isc, rsc, cnt, clusters=cl, medoids=med),
             reference_identify_and_rank(emb, cl, med, y, pred, isc, rsc, cnt))
    fit = kmedoids(emb, k, metric="dot", clip_distances=True)
    cl, med = fit.labels.numpy(), fit.medoids.numpy()
    res = discover_from_scores(torch.from_numpy(emb), torch.from_numpy(y), pred, torch.from_numpy(isc), rsc, cnt,
                               clusters=cl, medoids=med)
    _compare(res, reference_identify_and_rank(emb, cl, med, y, pred, isc, rsc, cnt))


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9])
def test_threshold_and_arrays(threshold):
    emb, y, pred, isc, rsc, cnt, _ = planted_scores(11, n=200)
    cl = np.random.default_rng(0).integers(0, 9, len(emb))
    med = np.array([np.where(cl == c)[0][0] for c in range(9)])
    res = discover_from_scores(emb, y, pred, isc, rsc, cnt, clusters=cl, medoids=med, threshold=threshold)
    _compare(res, reference_identify_and_rank(emb, cl, med, y, pred, isc, rsc, cnt, threshold=threshold))
    assert res.gaps.shape == res.influence.shape == res.criterion.shape == (9,)
    for c in res.clusters:
        assert res.criterion[c.id] and res.influence[c.id] >= threshold and res.gaps[c.id] == c.gap


def test_our_clustering_finds_the_reference_top_cluster_and_the_planted_feature():
    for seed in (0, 1, 2):
        emb, y, pred, isc, rsc, cnt, feat = planted_scores(seed, n=300, duplicates=seed == 1)
        res = discover_from_scores(emb, y, pred, isc, rsc, cnt, ks=range(10, 16))
        lab, med, k, scores = reference_cluster(emb, range(10, 16))
        ref = reference_identify_and_rank(emb, lab, med, y, pred, isc, rsc, cnt)
        assert res.k == k and res.found and ref
        assert set(res.top.regions) == set(ref[0][3])
        assert precision_at_k(res, feat) >= 0.8
        assert res.top.attribute == 2  # the class the planted feature is read as


def test_without_medoids_uses_exact_medoids():
    emb, y, pred, isc, rsc, cnt, _ = planted_scores(3, n=150)
    cl = np.random.default_rng(1).integers(0, 6, len(emb))
    res = discover_from_scores(emb, y, pred, isc, rsc, cnt, clusters=cl)
    assert res.medoids.shape == (6,) and all(cl[m] == c for c, m in enumerate(res.medoids))


def test_nothing_found_is_an_explicit_empty_result():
    emb, y, pred, isc, rsc, cnt, _ = planted_scores(4, n=120, strength=0.0)
    pred = y.copy()  # a perfect model: no gaps, nothing is spurious
    res = discover_from_scores(emb, y, pred, isc, rsc, cnt, clusters=np.arange(len(emb)) % 5)
    assert not res.found and res.top is None and res.clusters == []
    assert "no cluster" in res.notes[0] and "no spurious feature" in res.summary()
    assert precision_at_k(res, np.zeros(len(emb), bool)) == 0.0


def test_precision_at_k():
    truth = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0], bool)
    assert precision_at_k(list(range(12)), truth, k=10) == 0.7
    assert precision_at_k([0, 2, 3], truth, k=10) == 0.3
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        precision_at_k([0], truth, k=0)


def test_zero_shot_scores_temperature():
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    s = zero_shot_scores(e, t, 0.07)
    expected = torch.softmax(torch.tensor([[1.0, 0.0], [0.6, 0.8]]) / 0.07, -1)
    torch.testing.assert_close(s, expected)
    with pytest.raises(ValueError, match="temperature"):
        zero_shot_scores(e, t, 0)


def test_bad_input():
    emb, y, pred, isc, rsc, cnt, _ = planted_scores(5, n=40)
    args = (emb, y, pred, isc, rsc, cnt)
    with pytest.raises(ValueError, match=r"regions_per_image: expected non-negative counts summing to R"):
        discover_from_scores(emb, y, pred, isc, rsc, cnt + 1, clusters=np.zeros(len(emb), int))
    with pytest.raises(ValueError, match=r"region_scores: expected shape"):
        discover_from_scores(emb, y, pred, isc, rsc[:-1], cnt)
    with pytest.raises(ValueError, match=r"labels: expected class indices in 0..4"):
        discover_from_scores(emb, y + 5, pred, isc, rsc, cnt)
    with pytest.raises(TypeError, match="predictions: expected integers"):
        discover_from_scores(emb, y, pred.astype(float), isc, rsc, cnt)
    with pytest.raises(ValueError, match="medoids: given without clusters"):
        discover_from_scores(*args, medoids=[0])
    with pytest.raises(ValueError, match="medoids: expected one region index per cluster id"):
        discover_from_scores(*args, clusters=np.arange(len(emb)) % 3, medoids=[0, 1])
    with pytest.raises(ValueError, match="class_names: expected 5 names"):
        discover_from_scores(*args, clusters=np.arange(len(emb)) % 3, class_names=["a"])


def test_discover_finds_the_planted_square_in_a_shortcut_model():
    """Image level, end to end: a weak base fine-tuned (contrastive, 60 steps) on composites where the red square
    goes with 'nine' (Cramér's V 0.95) learns the shortcut; discovery on unbiased evaluation composites must rank
    square quadrants at the top (Precision@10 >= 0.8) and name 'nine' as the attribute."""
    import vlmfast.data as D
    import vlmfast.models as M
    from vlmfast.tuning import region as TR

    base, _ = M.pretrain_base("vlmfast-tiny-rn", preset="test", steps=100, progress=False)
    train = D.spurious_mnist("train", n=1000, strength=0.95, spurious_class=9, seed=0, cache=False)
    ft = TR.fit(base, train, lam=1.0, steps=60, batch_size=64, lr=1e-4, seed=0, progress=False)
    ev = D.spurious_mnist("test", n=300, seed=5, cache=False)
    res = discover(ft.model, ev, train.classnames, seed=0)
    truth = (ev.region_labels == D.REGION_SPURIOUS).reshape(-1).numpy()
    assert res.found, res.summary()
    assert precision_at_k(res, truth, 10) >= 0.8, res.summary()
    assert res.top.attribute_name == "nine"
    assert res.medoid_embeddings.shape == (res.k, 64)
    # the region ranking is by similarity to the medoid, the medoid first
    assert res.top.regions[0] == res.top.medoid
