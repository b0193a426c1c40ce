"""RaVL stage 2 (vlmfast.tuning.region): the frozen region split (nearest Stage-1 medoid), the fine-tuning loop
(lam = 1 is plain contrastive fine-tuning; the region loss changes the result; resumable), the group evaluation
(hand-computed), bad input."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vlmfast.data as D
import vlmfast.models as M
from vlmfast.audit.regions import region_embeddings
from vlmfast.tuning import region as TR


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return M.create_model(M.TINY_RN, device="cpu").eval()


@pytest.fixture(scope="module")
def train():
    return D.spurious_mnist("train", n=60, strength=0.9, seed=0, cache=False)


def test_split_assigns_every_region_to_its_nearest_medoid(rn, train):
    emb = region_embeddings(rn, train).embeddings  # (N * 4, 64)
    g = torch.Generator().manual_seed(0)
    med = F.normalize(emb[torch.randperm(emb.shape[0], generator=g)[:7]] + 0.01 * torch.randn(7, 64, generator=g),
                      dim=-1)
    split = TR.split_regions(rn, train, med.numpy(), [2, 5])
    want = (emb @ med.T).argmax(1).reshape(-1, 4)
    assert torch.equal(split.cluster, want)
    assert torch.equal(split.spurious, (want == 2) | (want == 5))
    assert torch.equal(split.relevant, ~split.spurious)
    assert split.boxes.shape == (train.images.shape[0], 4, 4)
    s = split.summary()
    assert s["spurious_regions"] == int(split.spurious.sum()) and s["regions"] == 4 * train.images.shape[0]
    # a discovery result carries the medoids; its top cluster is the default spurious id
    class Found:
        medoid_embeddings = med.numpy()
        clusters = [type("C", (), {"id": 5})(), type("C", (), {"id": 2})()]
    top = TR.split_regions(rn, train, discovered=Found())
    assert torch.equal(top.spurious, want == 5)
    assert not rn.training  # the Stage-1 model is left as it was


def test_lam_one_is_plain_contrastive_and_the_region_loss_matters(rn, train):
    spur = torch.as_tensor(train.region_labels) == D.REGION_SPURIOUS
    gt = TR.RegionSplit(torch.as_tensor(train.region_boxes).float(), spur.long(), spur, ~spur)
    kw = dict(steps=3, batch_size=16, lr=1e-4, seed=1, progress=False)
    a = TR.fit(rn, train, lam=1.0, **kw)
    b = TR.fit(rn, train, lam=1.0, split=gt, **kw)  # lam = 1: the split is not used
    c = TR.fit(rn, train, lam=0.8, split=gt, **kw)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())
    assert "ravl" in c.train_log["metrics"] and math.isfinite(c.train_log["metrics"]["ravl"])
    assert c.method == "ravl" and c.hparams["lam"] == 0.8 and c.hparams["split"]["spurious_regions"] == int(spur.sum())
    # the input model is untouched
    torch.manual_seed(0)
    fresh = M.create_model(M.TINY_RN, device="cpu")
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in rn.state_dict().items())


def test_resumes_from_a_checkpoint(rn, train, tmp_path, monkeypatch):
    spur = torch.as_tensor(train.region_labels) == D.REGION_SPURIOUS
    gt = TR.RegionSplit(torch.as_tensor(train.region_boxes).float(), spur.long(), spur, ~spur)
    kw = dict(batch_size=16, lr=1e-4, seed=2, progress=False, split=gt)
    import vlmfast.ops.region_loss as RL

    whole = TR.fit(rn, train, steps=4, **kw)
    real, calls = RL.region_loss, []

    def dies_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(RL, "region_loss", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        TR.fit(rn, train, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    monkeypatch.setattr(RL, "region_loss", real)
    again = TR.fit(rn, train, steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    assert again.train_log["resumed_from"].endswith("step-00000002.pt")
    for k, v in whole.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[k], v, atol=1e-6, rtol=0)


def test_group_table_by_hand():
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    present = torch.tensor([1, 0, 0, 1, 1, 0]).bool()
    pred = torch.tensor([0, 0, 1, 1, 0, 1])
    t = TR._group_table(pred, y, present, 2)
    assert t["accuracy"] == pytest.approx(4 / 6)
    assert t["groups"] == {"0|without": (0.5, 2), "0|with": (1.0, 1), "1|without": (1.0, 1), "1|with": (0.5, 2)}
    assert t["worst_group"] == 0.5


def test_evaluate_groups_of_a_zero_shot_classifier(rn):
    from vlmfast.tuning.robust import zero_shot_classifier

    te = D.spurious_mnist("test", n=20, seed=0, cache=False)
    clf = zero_shot_classifier(rn, te.classnames, ["a photo of the number {}"]).eval()  # BatchNorm: eval
    out = TR.evaluate_groups(clf, te)
    assert not clf.training  # left as it was
    logits = clf(M.preprocess(te.images, 64))
    assert out["image"]["accuracy"] == pytest.approx(float((logits.argmax(1) == te.labels).float().mean()))
    q = (te.region_labels == D.REGION_DIGIT).float().argmax(1)
    boxes = te.region_boxes.float()[torch.arange(20), q][:, None]
    with torch.no_grad():
        r = M.region_features(rn, te.images, boxes)[:, 0]
    want = float((clf.head(r).argmax(1) == te.labels).float().mean())
    assert out["region"]["accuracy"] == pytest.approx(want)
    assert sum(n for _, n in out["region"]["groups"].values()) == 20


def test_bad_input(rn, train):
    med = np.eye(64, dtype=np.float32)[:3]
    with pytest.raises(ValueError, match="lam: expected a weight in \\[0, 1\\]"):
        TR.fit(rn, train, medoid_embeddings=med, spurious_ids=[0], lam=1.5, steps=1)
    with pytest.raises(ValueError, match="temperature: expected > 0"):
        TR.fit(rn, train, medoid_embeddings=med, spurious_ids=[0], temperature=0.0, steps=1)
    with pytest.raises(ValueError, match="medoid_embeddings: expected the Stage-1 medoid embeddings"):
        TR.fit(rn, train, steps=1, lam=0.8, discovered=type("R", (), {"clusters": []})())
    with pytest.raises(ValueError, match="spurious_ids: expected cluster ids in 0..2"):
        TR.split_regions(rn, train, med, [3])
    with pytest.raises(ValueError, match="medoid_embeddings: expected width 64"):
        TR.split_regions(rn, train, np.eye(8, dtype=np.float32)[:2], [0])
    with pytest.raises(ValueError, match="boxes: expected shape \\(N, K, 4\\)"):
        TR.split_regions(rn, train, med, [0], boxes=torch.zeros(5, 4))
    with pytest.raises(TypeError, match="data: expected a dataset with .images"):
        TR.fit(rn, torch.zeros(3), steps=1)


def test_cli_audit_spurious_then_finetune_ravl(tmp_path, capsys):
    import json

    from safetensors.torch import load_file, save_file

    from vlmfast.cli import main

    out = tmp_path / "spurious"
    rc = main(["audit", "spurious", "--model", "vlmfast-tiny-rn", "--n", "40", "--ks", "20:22", "--no-progress",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["k"] in (20, 21) and set(res) >= {"found", "precision_at_10", "clusters", "summary", "medoids"}
    med = load_file(str(out / "medoids.safetensors"))
    assert med["medoid_embeddings"].shape == (res["k"], 64)
    assert (out / "gallery.png").is_file() == res["found"]
    assert "Precision@10 (red-square quadrants)" in capsys.readouterr().out
    # a discovery folder that found cluster 1 (hand-made), then the mitigation
    disc = tmp_path / "disc"
    disc.mkdir()
    (disc / "results.json").write_text(json.dumps({"model": "vlmfast-tiny-rn", "found": True}))
    save_file({"medoid_embeddings": F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(0)), dim=-1),
               "spurious_ids": torch.tensor([1])}, str(disc / "medoids.safetensors"))
    rc = main(["finetune", "--model", "vlmfast-tiny-rn", "--method", "ravl", "--discovery", str(disc), "--steps", "2",
               "--train-n", "40", "--test-n", "20", "--batch-size", "8", "--no-progress", "--out",
               str(tmp_path / "ravl")])
    assert rc == 0
    r = json.loads((tmp_path / "ravl" / "results.json").read_text())
    assert r["method"] == "ravl" and r["spurious_ids"] == [1] and r["split"]["regions"] == 4 * 38
    assert set(r["results"]) == {"zero-shot", "ravl"} and "worst_group" in r["results"]["ravl"]["image"]
    assert (tmp_path / "ravl" / "model" / "head.safetensors").is_file()
    assert "| ravl |" in capsys.readouterr().out
    # usage errors: one line, exit 2
    assert main(["finetune", "--model", "vlmfast-tiny-rn", "--method", "ravl", "--out", str(tmp_path / "x")]) == 2
    assert "--discovery" in capsys.readouterr().err
    assert main(["audit", "spurious", "--model", "vlmfast-tiny-rn", "--ks", "9", "--out", str(tmp_path / "y")]) == 2
    assert "--ks: expected A:B" in capsys.readouterr().err
