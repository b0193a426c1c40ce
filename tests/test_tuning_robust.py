"""Robust fine-tuning (vlmfast.tuning.robust): FLYP / CaRot / FT / LP / LP-FT train through the engine, the CaRot
pieces (projection matrices, OC and cross-Frobenius terms, EMA teacher and its text cache, L_SD inside the fused
loss), WiSE-FT in place, evaluation (per-batch ECE, sigma_min), save/load, resume, the CLI and bad input. Tiny
random-init models on separable colour images; ViT-B-32 for shapes only."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

import vlmfast.models as M  # noqa: E402
from vlmfast.cli import main  # noqa: E402
from vlmfast.metrics import calibration  # noqa: E402
from vlmfast.tuning import robust as R  # noqa: E402

NAMES = ["cat", "dog", "car", "tree"]
TEMPLATES = ["a photo of a {}", "{}"]


def _data(per_class=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=torch.float)
    labels = torch.arange(4).repeat_interleave(per_class)
    imgs = cols[labels][:, :, None, None] * 0.8 + torch.rand(len(labels), 3, 32, 32, generator=g) * 50
    return SimpleNamespace(images=imgs.clamp(0, 255).to(torch.uint8), labels=labels, classnames=NAMES)


@pytest.fixture(scope="module")
def rn():
    torch.manual_seed(0)
    return M.create_model("vlmfast-tiny-rn", device="cpu")


@pytest.fixture(scope="module")
def data():
    return _data()


def _fit(model, data, method, **kw):
    kw.setdefault("steps", 12)
    kw.setdefault("batch_size", 16)
    kw.setdefault("lr", 2e-3)
    return R.fit(model, data, method, templates=TEMPLATES, progress=False, **kw)


# accuracy on the separable colours after 25 steps from random init (zero-shot: chance, 0.25). The classifier
# methods reach 1.0; the contrastive ones learn slower through a random text tower, CaRot slowest: its EMA teacher
# starts at the random model, and L_SD (weight 1.5) pulls the student back toward that near-uniform softmax.
LEARNS = {"ft": 0.9, "lp": 0.9, "lpft": 0.9, "flyp": 0.7, "carot": 0.45}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return M.create_model("vlmfast-tiny-vit", device="cpu")


@pytest.mark.parametrize("method", R.METHODS)
def test_every_method_trains_and_leaves_the_input_model_alone(vit, data, method):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    res = _fit(vit, data, method, steps=25, lr=3e-3)
    assert all(torch.equal(v, vit.state_dict()[k]) for k, v in before.items())  # a copy was trained
    acc = R.evaluate(res.classifier, {"train": data})["train"]["accuracy"]
    zs = R.evaluate(res.zero_shot, {"train": data})["train"]["accuracy"]
    assert acc >= LEARNS[method] and acc > zs + 0.2, (method, acc, zs)
    if method != "lp":
        losses = res.train_log["losses"]
        assert len(losses) == 25 and sum(losses[-5:]) < sum(losses[:5])
    assert res.hparams["method"] == method and res.hparams["optimizer"].startswith("AdamW")


def test_flyp_first_loss_is_the_clip_loss_of_its_batch(rn, data, monkeypatch):
    """Step 0 of FLYP = symmetric InfoNCE (open_clip's ClipLoss) of the batch's images and their drawn captions."""
    open_clip_loss = pytest.importorskip("open_clip.loss")
    from vlmfast.models.factory import get_tokenizer, preprocess_for
    from vlmfast.models.text import fill_templates, tokenize
    from vlmfast.train import EpochSampler, step_generator

    res = _fit(rn, data, "flyp", steps=1, seed=3)
    idx = EpochSampler(48, 16, seed=3)(0)
    tid = torch.randint(0, 2, (16,), generator=step_generator(3, 0, "template"))
    prompts = fill_templates(NAMES, TEMPLATES)
    caps = [prompts[int(c) * 2 + int(t)] for c, t in zip(data.labels[idx], tid)]
    m = copy.deepcopy(rn).train()  # fit trains in train mode (batch-norm statistics of the batch)
    with torch.no_grad():
        img = F.normalize(m.encode_image(preprocess_for(m, data.images[idx])), dim=-1)
        txt = F.normalize(m.encode_text(tokenize(caps, get_tokenizer(m))), dim=-1)
        want = open_clip_loss.ClipLoss()(img, txt, m.logit_scale.exp())
    assert res.train_log["losses"][0] == pytest.approx(float(want), rel=1e-4)


def test_carot_terms_and_teacher(rn, data):
    res = _fit(rn, data, "carot", steps=10, ema_every=3)
    log = res.train_log
    assert log["ema_updates"] == 4  # steps 0, 3, 6, 9
    h = log["history"][-1]
    assert {"mcl", "sd", "oc", "cf", "loss"} <= set(h)
    w = R.image_projection(res.model)
    assert float(h["oc"]) > 0 and w.shape[1] == res.model.visual.output_dim
    # the teacher is an EMA of the student: it differs from both the student and the initial model
    t, s = res.teacher.state_dict(), res.model.state_dict()
    name = next(k for k in t if t[k].is_floating_point() and t[k].numel() > 100)
    assert not torch.equal(t[name], s[name]) and not torch.equal(t[name], rn.state_dict()[name])


def test_penalties_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 5, generator=g)
    q, _ = torch.linalg.qr(w)
    assert float(R.orthogonality_penalty(q)) == pytest.approx(0.0, abs=1e-5)  # orthonormal columns
    want = torch.sqrt(((w.t() @ w - torch.eye(5)) ** 2).sum())
    assert float(R.orthogonality_penalty(w)) == pytest.approx(float(want), rel=1e-6)
    assert float(R.orthogonality_penalty(w, squared=True)) == pytest.approx(float(want) ** 2, rel=1e-5)
    wt = torch.randn(7, 5, generator=g)
    assert float(R.cross_frobenius(w, wt)) == pytest.approx(float(torch.sqrt(((w @ wt.t()) ** 2).sum())), rel=1e-6)


def test_projections_of_resnet_and_vit(rn):
    assert R.image_projection(rn).shape == (rn.visual.attnpool.c_proj.in_features, rn.visual.output_dim)
    assert R.image_projection(rn).data_ptr() == rn.visual.attnpool.c_proj.weight.data_ptr()
    vit = M.create_model("vlmfast-tiny-vit", device="cpu")
    assert R.image_projection(vit) is vit.visual.proj
    assert R.text_projection(vit).shape[1] == vit.visual.output_dim
    with pytest.raises(ValueError, match="no image projection"):
        R.image_projection(torch.nn.Linear(2, 2))


def test_ema_schedule_and_update():
    assert R.ema_momentum(0, 25030) == pytest.approx(0.05)
    assert R.ema_momentum(2503, 25030) == pytest.approx(0.05 + 0.85 * 0.5)
    assert R.ema_momentum(5006, 25030) == pytest.approx(0.9)
    assert R.ema_momentum(20000, 25030) == pytest.approx(0.9)
    assert R.default_ema_every(25030) == 500 and R.default_ema_every(300) == 6 and R.default_ema_every(10) == 1
    student = torch.nn.Linear(3, 2)
    seen = []
    ema = R.EMATeacher(student, steps=100, every=5, on_update=lambda t: seen.append(t.weight.clone()))
    t0 = ema.teacher.weight.clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    ema.on_step_end(SimpleNamespace(step=2))  # step 1: not a multiple of 5
    assert torch.equal(ema.teacher.weight, t0) and len(seen) == 1
    ema.on_step_end(SimpleNamespace(step=6))  # step 5: update with m(5) = 0.05 + 0.85 * 5 / 20
    m = 0.05 + 0.85 * 5 / 20
    torch.testing.assert_close(ema.teacher.weight, m * t0 + (1 - m) * student.weight.detach())
    assert len(seen) == 2 and ema.updates == 1
    state = ema.state_dict()
    other = R.EMATeacher(torch.nn.Linear(3, 2), steps=100, every=5)
    other.load_state_dict(state)
    assert torch.equal(other.teacher.weight, ema.teacher.weight) and other.updates == 1


def test_wise_ft_interpolates_every_tensor_in_place(rn, data):
    with pytest.raises(ValueError, match="same features"):  # LP heads read raw features
        lp = _fit(rn, data, "lp", steps=2)
        R.wise_ft(lp.zero_shot, lp.classifier, [0.5], lambda c: None)
    res = _fit(rn, data, "ft", steps=6)
    ids = []

    def ev(c):
        ids.append(id(c))
        return R.predict(c, data)[0]

    (a0, l0), (a5, l5), (a1, l1) = R.wise_ft(res.zero_shot, res.classifier, [0.0, 0.5, 1.0], ev)
    torch.testing.assert_close(l0, R.predict(res.zero_shot, data)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, R.predict(res.classifier, data)[0], rtol=1e-5, atol=1e-5)
    assert len(set(ids)) == 1  # one preallocated classifier, rebuilt in place
    zs, ft = res.zero_shot.state_dict(), res.classifier.state_dict()
    work = R.interpolate_(copy.deepcopy(res.classifier), zs, ft, 0.5)
    for k, v in work.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, 0.5 * zs[k] + 0.5 * ft[k])
    assert not torch.allclose(l5, l0) and not torch.allclose(l5, l1)


def test_evaluate_metrics(rn, data):
    res = _fit(rn, data, "lp", steps=10)
    ev = R.evaluate(res.classifier, {"d": data}, per_batch=20)["d"]
    logits, feats = R.predict(res.classifier, data)
    y = data.labels
    r = calibration(logits, y, n_bins=10)
    assert ev["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert ev["ece"] == pytest.approx(float(r.ece)) and ev["nll"] == pytest.approx(float(r.nll), rel=1e-6)
    parts = [(logits[s:s + 20], y[s:s + 20]) for s in range(0, 48, 20)]
    manual = sum(float(calibration(lg, yy, n_bins=10).ece) * len(yy) for lg, yy in parts) / 48
    assert ev["ece_per_batch"] == pytest.approx(manual, rel=1e-6)
    assert ev["ece_per_batch"] != pytest.approx(ev["ece"])


def test_sigma_min():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=g) * torch.tensor([1.0, 5.0, 0.1, 3.0]) + 7.0
    assert R.sigma_min(x) == pytest.approx(1.0, abs=0.05)  # standardized independent dims: identity
    x[:, 3] = x[:, 0] * 2 + 1e-3 * torch.randn(20000, generator=g)  # a nearly collinear pair
    assert R.sigma_min(x) < 1e-3


def test_save_and_load_round_trip(rn, data, tmp_path):
    res = _fit(rn, data, "carot", steps=3)
    folder = res.save(tmp_path / "run")
    model, clf, card = R.load_robust(folder)
    torch.testing.assert_close(R.predict(clf, data)[0], R.predict(res.classifier, data)[0])
    assert card["method"] == "robust-carot" and card["hparams"]["lam_oc"] == 0.2
    assert card["train"]["metrics"]["loss"] == pytest.approx(res.train_log["losses"][-1])
    assert json.loads((folder / "model.json").read_text())["method"] == "robust-carot"


def test_resume_continues_exactly(rn, data, tmp_path):
    full = _fit(rn, data, "carot", steps=6, ema_every=2, seed=5)
    part = _fit(rn, data, "carot", steps=6, ema_every=2, seed=5, checkpoint_dir=tmp_path, checkpoint_every=3)
    again = _fit(rn, data, "carot", steps=6, ema_every=2, seed=5, checkpoint_dir=tmp_path, checkpoint_every=3)
    assert again.train_log["resumed_from"] is not None
    for k, v in full.classifier.state_dict().items():
        torch.testing.assert_close(part.classifier.state_dict()[k], v)
        torch.testing.assert_close(again.classifier.state_dict()[k], v)
    for k, v in full.teacher.state_dict().items():
        torch.testing.assert_close(again.teacher.state_dict()[k], v)


def test_vit_b_32_shapes():  # noqa: D103
    """One CaRot step on ViT-B-32 at random init (shapes of the real thing: 768-wide visual.proj)."""
    torch.manual_seed(0)
    vit = M.create_model("ViT-B-32", device="cpu")
    d = SimpleNamespace(images=torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), labels=torch.tensor([0, 1]),
                        classnames=["cat", "dog"])
    res = R.fit(vit, d, "carot", steps=1, batch_size=2, templates=["{}"], progress=False)
    assert R.image_projection(res.model).shape == (768, 512)
    assert math.isfinite(res.train_log["losses"][-1])


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(method="sgd"), ValueError, r"method: expected one of \('flyp'"),
    (dict(classnames=[]), ValueError, "classnames: expected at least one"),
    (dict(classnames=["a", "b"]), ValueError, r"labels must lie in \[0, 2\)"),
    (dict(templates=["no slot"]), ValueError, "templates"),
    (dict(steps=0), ValueError, "steps: expected an int >= 1"),
    (dict(targets="soft"), ValueError, "targets"),
    (dict(lam_oc=-1.0), ValueError, "lam_oc"),
    (dict(ema_every=0), ValueError, "ema_every"),
])
def test_bad_input(rn, data, kwargs, exc, match):
    kw = dict(method="flyp", steps=2)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        R.fit(rn, data, kw.pop("method"), progress=False, **kw)
    with pytest.raises(TypeError, match="data: expected a dataset"):
        R.fit(rn, [1, 2], "ft")


def test_cli_robust_method(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["finetune", "--method", "carot", "--model", "vlmfast-tiny-rn", "--steps", "3", "--train-n", "100",
               "--test-n", "40", "--no-progress", "--wise", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| carot |" in text and "| zero-shot |" in text and "wise-ft a=0.5" in text
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "carot" and set(res["ood"]) == {"sklearn-digits", "noise-3", "blur-3", "contrast-3",
                                                             "invert-3", "occlusion-3"}
    assert (out / "model" / "head.safetensors").is_file()
    rc = main(["finetune", "--method", "carot", "--dor", "--model", "vlmfast-tiny-rn", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "--dor: the DOR term is a prompt-tuning regulariser" in err
