"""Prompt tuning (vlmfast.tuning.prompt): the embeddings hook of the truncated text path is exact, CoOp / CoCoOp /
KgCoOp (+ DOR) train, layouts, CSC, batching, the DOR pool and its sampling, save/load, base-to-new, the CLI and
every bad-input message. Tiny random-init models; ViT-B-32 for shapes only."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("open_clip")

import vlmfast.models as M  # noqa: E402
from vlmfast.cli import main  # noqa: E402
from vlmfast.models import text as T  # noqa: E402
from vlmfast.tuning import (  # noqa: E402
    PromptLearner,
    base_to_new_split,
    evaluate_base_to_new,
    fit,
    load_prompt_learner,
    outlier_pool,
)
from vlmfast.tuning import prompt as P  # noqa: E402

NAMES = ["cat", "dog", "car", "tree"]
VOCAB = ["apple", "banana", "Cat", " DOG ", "bird", "house", "river", "stone", "lamp", "Tree", "horse", "boat",
         "apple"]


def _model(name="vlmfast-tiny-vit"):
    torch.manual_seed(0)
    return M.create_model(name, device="cpu")


def _color_data(per_class=8, n_cls=4, seed=0):
    """Solid-colour images, one colour per class: separable even by a random image tower."""
    g = torch.Generator().manual_seed(seed)
    cols = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255]], dtype=torch.float)
    labels = torch.arange(n_cls).repeat_interleave(per_class)
    imgs = (cols[labels][:, :, None, None] * 0.8 + torch.rand(len(labels), 3, 32, 32, generator=g) * 50)
    return SimpleNamespace(images=imgs.clamp(0, 255).to(torch.uint8), labels=labels,
                           classnames=(NAMES + ["sky"])[:n_cls])


def _pool(model, base=NAMES[:2], new=NAMES[2:], **kw):
    return outlier_pool(model, base, new_classnames=new, vocabulary=VOCAB, k=kw.pop("k", 6), cache=False, **kw)


@pytest.fixture(scope="module")
def vit():
    return _model("vlmfast-tiny-vit")


@pytest.fixture(scope="module")
def rn():
    return _model("vlmfast-tiny-rn")


# ------------------------------------------------------------------------------------------------ the hook


@pytest.mark.parametrize("name", ["vlmfast-tiny-vit", "vlmfast-tiny-rn"])
def test_embeddings_hook_equals_plain_path(name):
    model = _model(name)
    parts = T.text_parts(model)
    tok = M.get_tokenizer(model)(["a photo of a dog.", "x", "the digit nine is here"])
    with torch.no_grad():
        plain = T.encode_truncated(parts, tok)
        full = parts.token_embedding(tok)  # the whole context: only the first max-EOT+1 positions run
        hooked = T.encode_truncated(parts, tok, full)
        cut = T.encode_truncated(parts, tok[:, :8], full[:, :8])
    torch.testing.assert_close(hooked, plain, atol=0, rtol=0)
    torch.testing.assert_close(cut, plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="embeddings: expected shape"):
        T.encode_truncated(parts, tok, full[:, :3])


@pytest.mark.parametrize("name", ["vlmfast-tiny-vit", "vlmfast-tiny-rn"])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("init", [None, "a photo of a"])
def test_placeholder_ctx_equals_encode_text(name, position, init, vit, rn):
    """ctx set to the placeholder/init token embeddings -> exactly encode_text of the same (laid-out) tokens."""
    model = vit if name == "vlmfast-tiny-vit" else rn
    lr = PromptLearner(model, NAMES + ["golden retriever"], n_ctx=None if init else 5, ctx_init=init,
                       class_token_position=position)
    rows = lr._class_rows
    with torch.no_grad():
        lr.ctx.copy_(T.text_parts(model).token_embedding(rows.tokens)[0, 1:1 + lr.n_ctx])
        got = lr()
    tokens = rows.tokens if rows.perm is None else torch.gather(rows.tokens, 1, rows.perm)
    torch.testing.assert_close(got, T.encode_text(model, tokens, normalize=False), atol=1e-5, rtol=0)


def test_class_positions_give_the_token_layout(vit):
    tok = M.get_tokenizer(vit)
    x = int(tok(["X"])[0, 1])
    name = tok(["golden retriever"])[0, 1:3].tolist()
    dot, sos, eot = int(tok(["."])[0, 1]), int(tok([""])[0, 0]), int(tok([""])[0, 1])
    want = {"end": [sos, x, x, x, x] + name + [dot, eot],
            "front": [sos] + name + [x, x, x, x, dot, eot],
            "middle": [sos, x, x] + name + [x, x, dot, eot]}
    for pos, layout in want.items():
        lr = PromptLearner(vit, ["golden retriever"], n_ctx=4, class_token_position=pos)
        rows = lr._class_rows
        tokens = rows.tokens if rows.perm is None else torch.gather(rows.tokens, 1, rows.perm)
        assert tokens[0].tolist() == layout, pos
        assert lr.token_prefix.shape == (1, 1, lr.ctx_dim)
        assert lr.token_suffix.shape == (1, len(layout) - 1 - 4, lr.ctx_dim)  # name, '.', EOT (cut at EOT)


def test_init_phrase_and_random_init(vit):
    lr = PromptLearner(vit, NAMES, ctx_init="a  photo of a")
    assert lr.n_ctx == 4 and lr.ctx_init == "a photo of a"
    emb = T.text_parts(vit).token_embedding(M.get_tokenizer(vit)(["a photo of a"]))[0, 1:5]
    torch.testing.assert_close(lr.ctx.detach(), emb.detach())
    r = PromptLearner(vit, NAMES, n_ctx=16, seed=3)
    assert r.ctx.shape == (16, 64) and 0.015 < float(r.ctx.detach().std()) < 0.025
    torch.testing.assert_close(r.ctx, PromptLearner(vit, NAMES, n_ctx=16, seed=3).ctx)  # seeded
    assert set(r.state_dict()) == {"ctx"}  # the model is referenced, not registered
    assert all(not p.requires_grad for p in vit.parameters())


def test_csc_shapes(vit):
    lr = PromptLearner(vit, NAMES, n_ctx=3, csc=True)
    assert lr.ctx.shape == (4, 3, 64) and lr().shape == (4, 64)
    lr2 = PromptLearner(vit, NAMES, ctx_init="a photo of a", csc=True)
    assert lr2.ctx.shape == (4, 4, 64)
    co = PromptLearner(vit, NAMES, method="cocoop", n_ctx=2, csc=True)
    assert co(torch.randn(3, 64)).shape == (3, 4, 64)


def test_vit_b32_shapes_one_forward():
    model = M.create_model("ViT-B-32", device="cpu")
    lr = PromptLearner(model, ["cat", "dog", "car"], n_ctx=4)
    assert lr.ctx.shape == (4, 512)
    with torch.no_grad():
        assert lr().shape == (3, 512)


# ------------------------------------------------------------------------------------------------ gradients, training


@pytest.mark.parametrize("method", ["coop", "cocoop", "kgcoop"])
def test_grads_reach_ctx_only(method):
    model = _model()
    lr = PromptLearner(model, NAMES, method=method)
    img = torch.randn(5, 64)
    y = torch.tensor([0, 1, 2, 3, 0])
    logits = lr.logits(img)
    F.cross_entropy(logits, y).backward()
    assert lr.ctx.grad is not None and float(lr.ctx.grad.abs().sum()) > 0
    if method == "cocoop":
        assert all(p.grad is not None for p in lr.meta_net.parameters())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method,dor,lr", [("coop", False, 0.02), ("cocoop", False, 0.02), ("kgcoop", False, 0.002),
                                           ("coop", True, 0.02), ("cocoop", True, 0.002), ("kgcoop", True, 0.002)])
def test_each_method_trains_and_its_loss_drops(method, dor, lr):
    model = _model()
    learner = fit(model, _color_data(), method=method, dor=dor, n_ctx=4 if method == "coop" else None, steps=25,
                  batch_size=32, lr=lr, progress=False, vocabulary=VOCAB, dor_k=6, new_classnames=["sky"],
                  vocab_cache=False)
    losses = learner.train_log["losses"]
    assert len(losses) == 25
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    m = learner.train_log["metrics"]
    assert ("kg" in m) == (method == "kgcoop") and ("dor" in m) == dor
    assert learner.hparams["optimizer"] == "AdamW" and learner.hparams["dor_lam"] == (P.DOR_LAM[method] if dor
                                                                                       else None)
    assert all(not p.requires_grad for p in model.parameters())


def test_fit_is_deterministic_and_resumes(tmp_path):
    data = _color_data()
    kw = dict(method="coop", dor=True, n_ctx=4, steps=6, lr=0.01, progress=False, vocabulary=VOCAB, dor_k=6,
              vocab_cache=False, seed=1)
    a = fit(_model(), data, **kw)
    b = fit(_model(), data, checkpoint_dir=tmp_path / "ck", checkpoint_every=3, **kw)
    torch.testing.assert_close(a.ctx, b.ctx, atol=0, rtol=0)
    c = fit(_model(), data, checkpoint_dir=tmp_path / "ck", checkpoint_every=3, **kw)  # finished run: restored
    torch.testing.assert_close(a.ctx, c.ctx, atol=0, rtol=0)
    assert c.train_log["resumed_from"]


def test_shots_are_seeded_per_class():
    labels = torch.tensor([0] * 5 + [1] * 7)
    a = P._select_shots(labels, ["a", "b"], 3, seed=0)
    assert a.tolist() == P._select_shots(labels, ["a", "b"], 3, seed=0).tolist()
    assert [int((labels[a] == c).sum()) for c in (0, 1)] == [3, 3]
    with pytest.raises(ValueError, match=r"shots: expected at most 5 .*class 0 'a'.*got 6"):
        P._select_shots(labels, ["a", "b"], 6, seed=0)


# ------------------------------------------------------------------------------------------------ CoCoOp, KgCoOp


def test_cocoop_batched_equals_per_image_loop(vit):
    lr = PromptLearner(vit, NAMES, method="cocoop", class_token_position="middle")
    torch.nn.init.normal_(lr.meta_net[2].weight, std=0.05)  # make the bias matter
    img = torch.randn(3, 64)
    with torch.no_grad():
        batched = lr(img)
        loop = torch.stack([lr(img[i:i + 1])[0] for i in range(3)])
        logits = lr.logits(img)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)
    want = lr.logit_scale * torch.einsum("bd,bcd->bc", F.normalize(img, dim=-1), F.normalize(loop, dim=-1))
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=0)
    assert not torch.allclose(batched[0], batched[1])


def test_kgcoop_term_zero_at_init_and_matches_formula(vit):
    lr = PromptLearner(vit, NAMES, method="kgcoop", ctx_init="a photo of a", kg_template="a photo of a {}.")
    with torch.no_grad():
        assert abs(float(lr.kg_term(lr()))) < 1e-5
        zs = M.zero_shot_head(vit, NAMES, ["a photo of a {}."])
        torch.testing.assert_close(lr.kg_features, zs)
        lr.ctx.add_(0.05 * torch.randn_like(lr.ctx))
        w = lr()
        want = 1 - (F.normalize(w, dim=-1) * zs).sum(-1).mean()
        torch.testing.assert_close(lr.kg_term(w), want, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ DOR


def test_dor_pool_excludes_base_and_new_names(vit):
    pool = _pool(vit, k=100)
    low = {w.lower() for w in pool.words}
    assert not low & {"cat", "dog", "car", "tree"}
    assert len(pool.words) == 9 and len(set(pool.words)) == 9  # k clipped; duplicates dropped
    assert bool((pool.scores[:-1] >= pool.scores[1:]).all())
    base_only = _pool(vit, k=100, exclude="base")
    assert {"Tree"} <= set(base_only.words) and not {"Cat", "DOG"} & set(base_only.words)
    top = _pool(vit, k=3)
    assert top.words == pool.words[:3]
    with torch.no_grad():
        want = T.encode_text(vit, ["a photo of a {}.".format(w) for w in top.words])
    torch.testing.assert_close(top.features, want, atol=1e-5, rtol=0)


def test_dor_vocab_cache(vit, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path))
    a = outlier_pool(vit, NAMES[:2], vocabulary=VOCAB, k=4, cache=True)
    assert list((tmp_path / "features").glob("vocab-*.safetensors"))
    b = outlier_pool(vit, NAMES[:2], vocabulary=VOCAB, k=4, cache=True)
    assert a.words == b.words
    torch.testing.assert_close(a.features, b.features)


def test_dor_sampling_is_deterministic_per_seed_and_step(vit):
    lr = PromptLearner(vit, NAMES[:2], n_ctx=3)
    lr.set_outlier_pool(_pool(vit))
    a, b = lr.sample_outliers(0, 7, 4), lr.sample_outliers(0, 7, 4)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 4
    assert lr.sample_outliers(0, 8, 4).tolist() != a.tolist() or lr.sample_outliers(1, 7, 4).tolist() != a.tolist()
    assert lr.sample_outliers(0, 3, 20).shape == (20,)  # more than K: with replacement


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_outliers_in_the_same_call_equal_separate_encoding(vit, method):
    lr = PromptLearner(vit, ["golden retriever", "cat"], method=method, n_ctx=3, class_token_position="front")
    lr.set_outlier_pool(_pool(vit, base=["golden retriever", "cat"]))
    idx = lr.sample_outliers(0, 0, 3)
    img = torch.randn(2, 64) if method == "cocoop" else None
    with torch.no_grad():
        cls, out = lr.text_features(None, img, outliers=idx)
        torch.testing.assert_close(cls, lr(img), atol=1e-5, rtol=0)
        ctx = lr.ctx + (lr.instance_bias(img).mean(0) if method == "cocoop" else 0)
        rows = lr._outlier_rows(idx)
        sep = lr._encode([(ctx.unsqueeze(0).expand(3, -1, -1), rows)])[0]
    torch.testing.assert_close(out, sep, atol=1e-5, rtol=0)
    d = lr.dor_term(out, lr.pool_features[idx])
    assert 0 <= float(d) <= 2


# ------------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("method", ["coop", "cocoop", "kgcoop"])
def test_save_load_round_trip(tmp_path, method, vit):
    lr = PromptLearner(vit, NAMES, method=method, class_token_position="middle", seed=2)
    with torch.no_grad():
        lr.ctx.add_(0.1)
    lr.hparams = {"steps": 3}
    path = lr.save(tmp_path / "learner")
    card = json.loads((tmp_path / "learner.json").read_text())
    assert card["method"] == method and card["classnames"] == NAMES and card["config"] == "vlmfast-tiny-vit"
    assert card["class_token_position"] == "middle" and card["hparams"] == {"steps": 3}
    back = load_prompt_learner(path, vit)
    img = torch.randn(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(back.logits(img), lr.logits(img), atol=0, rtol=0)
    assert set(back.state_dict()) == set(lr.state_dict())


def test_load_validates_the_model(tmp_path, vit):
    path = PromptLearner(vit, NAMES, n_ctx=2).save(tmp_path / "l")
    big = M.create_model("ViT-B-32", device="cpu")
    with pytest.raises(ValueError, match="ctx_dim = 64, this model has ctx_dim = 512"):
        load_prompt_learner(path, big)
    other = _model("vlmfast-tiny-rn")
    with pytest.raises(ValueError, match="config 'vlmfast-tiny-vit', this model is 'vlmfast-tiny-rn'"):
        load_prompt_learner(path, other)
    with pytest.warns(UserWarning, match="other weights"):
        load_prompt_learner(path, other, strict=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_prompt_learner(tmp_path / "missing", vit)
    (tmp_path / "l.safetensors").write_bytes((tmp_path / "l.safetensors").read_bytes()[:-4] + b"xxxx")
    with pytest.raises(ValueError, match="SHA-256"):
        load_prompt_learner(path, vit)


# ------------------------------------------------------------------------------------------------ base-to-new


def test_base_to_new_split():
    assert base_to_new_split(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert base_to_new_split(list("abcdefg")) == ([0, 1, 2, 3], [4, 5, 6])
    with pytest.raises(ValueError, match="at least 2 classes, got 1"):
        base_to_new_split(1)
    with pytest.raises(TypeError, match="classnames_or_c"):
        base_to_new_split("abc")


def test_evaluate_base_to_new(vit):
    data = _color_data(per_class=4, n_cls=5)
    lr = PromptLearner(vit, data.classnames[:3], n_ctx=4)
    zs = evaluate_base_to_new(vit, None, data, data.classnames)
    tuned = evaluate_base_to_new(vit, lr, data, data.classnames)
    for r in (zs, tuned):
        assert r["base"]["n"] == 12 and r["new"]["n"] == 8
        assert r["base"]["classnames"] == data.classnames[:3] and r["new"]["classnames"] == data.classnames[3:]
        for part in ("base", "new"):
            assert {"ece", "ace", "mce", "mce_weighted", "accuracy", "nll", "brier"} <= set(r[part])
        b, n = r["base_accuracy"], r["new_accuracy"]
        assert r["H"] == pytest.approx(2 * b * n / (b + n) if b + n else 0.0)
    feats = M.encode_images(vit, data)
    x = feats[data.labels >= 3]
    with torch.no_grad():
        acc = float((lr.logits(x, data.classnames[3:]).argmax(1) == data.labels[data.labels >= 3] - 3).float().mean())
    assert tuned["new"]["accuracy"] == pytest.approx(acc)
    with pytest.raises(ValueError, match="csc=True"):
        evaluate_base_to_new(vit, PromptLearner(vit, data.classnames[:3], n_ctx=2, csc=True), data)
    with pytest.raises(ValueError, match="csc=True.*cannot be transferred"):
        PromptLearner(vit, NAMES, n_ctx=2, csc=True).text_features(["sky"])


def test_cli_finetune(tmp_path, capsys):
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", "vlmfast-tiny-vit", "--method", "kgcoop", "--dor", "--shots", "2",
               "--steps", "2", "--dor-k", "20", "--train-n", "200", "--test-n", "40", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| zero-shot |" in text and "| kgcoop+dor |" in text
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]["kgcoop+dor"]) >= {"base", "new", "H"}
    card = json.loads((out / "learner.json").read_text())
    assert card["classnames"] == ["zero", "one", "two", "three", "four"]
    assert card["hparams"]["dor_exclude"] == "base+new"
    rc = main(["finetune", "--model", "vlmfast-tiny-vit", "--shots", "0", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == "vlmfast finetune: error: --shots: expected an int >= 1, got 0"
    rc = main(["finetune", "--model", "vlmfast-tiny-vit", "--shots", "1000", "--steps", "1", "--train-n", "100",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--shots" not in err and "shots: expected at most" in err and "class 0 'zero'" in err


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs(vit):
    data = _color_data()
    with pytest.raises(ValueError, match=r"method: expected one of \('coop', 'cocoop', 'kgcoop'\), got 'maple'"):
        fit(vit, data, method="maple")
    with pytest.raises(ValueError, match="method: expected one of"):
        PromptLearner(vit, NAMES, method="maple")
    with pytest.raises(ValueError, match="classnames: expected at least one class name, got an empty list"):
        PromptLearner(vit, [])
    with pytest.raises(ValueError, match="classnames: expected at least one class name"):
        fit(vit, data, classnames=[])
    with pytest.raises(TypeError, match=r"classnames\[1\]: expected a str, got int"):
        PromptLearner(vit, ["a", 3])
    with pytest.raises(ValueError, match="distinct"):
        PromptLearner(vit, ["Cat", "cat"])
    with pytest.raises(ValueError, match="model: prompt tuning needs an open_clip"):
        PromptLearner(torch.nn.Linear(2, 2), NAMES)
    long_name = " ".join(["word"] * 80)
    with pytest.raises(ValueError, match=r"classnames\[1\]: the prompt of class 'word word .*\.\.\.' .*needs 99 "
                                         r"tokens, more than the model's context length 77"):
        PromptLearner(vit, ["cat", long_name], n_ctx=16)
    with pytest.raises(ValueError, match="class_token_position: expected one of"):
        PromptLearner(vit, NAMES, class_token_position="left")
    with pytest.raises(ValueError, match="n_ctx: ctx_init 'a photo of a' has 4 tokens, so n_ctx must be 4"):
        PromptLearner(vit, NAMES, n_ctx=3, ctx_init="a photo of a")
    with pytest.raises(ValueError, match="n_ctx: expected an int >= 1, got 0"):
        PromptLearner(vit, NAMES, n_ctx=0)
    with pytest.raises(ValueError, match="ctx_init: expected a non-empty phrase"):
        PromptLearner(vit, NAMES, ctx_init="  ")
    with pytest.raises(ValueError, match=r"shots: expected at most 8 .*class 0 'cat'.*got 9"):
        fit(vit, data, shots=9, steps=1, progress=False)
    with pytest.raises(TypeError, match=r"train_data: expected a dataset with .images"):
        fit(vit, [1, 2, 3], classnames=NAMES)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        fit(vit, data, classnames=NAMES[:2], steps=1)
    with pytest.raises(ValueError, match="steps: expected an int >= 1, got 0"):
        fit(vit, data, steps=0)
    with pytest.raises(ValueError, match="exclude: expected one of"):
        fit(vit, data, dor=True, exclude="none")
    with pytest.raises(ValueError, match="lam: the knowledge-guided weight applies to method='kgcoop' only"):
        fit(vit, data, lam=1.0)
    with pytest.raises(ValueError, match="image_features: CoCoOp's class features depend on the image"):
        PromptLearner(vit, NAMES, method="cocoop")()
    with pytest.raises(ValueError, match="dor: no outlier pool attached"):
        PromptLearner(vit, NAMES).sample_outliers(0, 0, 2)
    with pytest.raises(ValueError, match="vocabulary: no candidate words left"):
        outlier_pool(vit, ["cat"], vocabulary=["Cat", "cat "], cache=False)
    with pytest.raises(ValueError, match="k: expected an int >= 1, got 0"):
        outlier_pool(vit, ["cat"], vocabulary=VOCAB, k=0, cache=False)


def test_loss_falls_back_or_uses_the_op():
    x, w, y = torch.randn(6, 8), torch.randn(3, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    want = F.cross_entropy(10.0 * F.normalize(x, dim=-1) @ F.normalize(w, dim=-1).T, y)
    torch.testing.assert_close(P.prompt_loss(x, w, torch.tensor(10.0), y), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(P._fallback_prompt_ce(x, w, 10.0, y), want, atol=1e-6, rtol=1e-6)
