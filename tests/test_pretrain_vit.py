"""The ViT recipes of :func:`vlmfast.models.pretrain_base`: picked for ViT configs, the ResNet recipe and its cache
keys unchanged, and the fast ViT test preset learns (cached after the first run)."""

import pytest

import vlmfast.models as M
import vlmfast.models.pretrain as P

# Cache keys of the ResNet bases as written before the ViT recipes existed (CPU, fp32, seed 0, format version 2):
# cached RN bases must stay valid.
RN_KEYS = {"default": "acd4b71f77174a00", "test": "74a482d647ea642d"}


def _planned_run(monkeypatch, config, **kw):
    """What pretrain_base would train (recipe, cache key, ...), without training: ``_train`` is replaced."""
    monkeypatch.setattr(P, "_train", lambda **run: run)
    return M.pretrain_base(config, cache=False, device="cpu", **kw)


def test_config_family_and_preset_tables():
    assert P.config_family(M.TINY_RN) == "resnet" and P.config_family(M.TINY_VIT) == "vit"
    assert P.config_family("RN50") == "resnet" and P.config_family("ViT-B-32") == "vit"
    assert P.presets_for(M.TINY_RN) is P.PRESETS and P.presets_for("RN50") is P.PRESETS
    assert P.presets_for(M.TINY_VIT) is P.VIT_PRESETS and P.presets_for("ViT-B-16") is P.VIT_PRESETS
    assert M.PRESETS is P.PRESETS
    # same preset names and keys, so the same overrides work for either family
    assert set(P.VIT_PRESETS) == set(P.PRESETS)
    for name in P.PRESETS:
        assert set(P.VIT_PRESETS[name]) == set(P.PRESETS[name])
    with pytest.raises(ValueError, match="unknown model config"):
        P.presets_for("no-such-config")


def test_rn_recipe_and_cache_keys_unchanged(monkeypatch):
    assert P.PRESETS["default"] == dict(
        steps=600, batch_size=128, lr=2e-3, text_lr_scale=0.05, weight_decay=0.1, warmup=0.05,
        init_logit_scale=1 / 0.07, max_logit_scale=100.0, targets="class", zoom_p=0.25, train_n=10_000,
        test_n=2000, shift_n=None, eval_corruptions=("noise", "blur", "contrast", "invert", "occlusion"))
    assert P.PRESETS["test"] == dict(
        steps=160, batch_size=64, lr=2e-3, text_lr_scale=0.05, weight_decay=0.1, warmup=0.1,
        init_logit_scale=1 / 0.07, max_logit_scale=100.0, targets="class", zoom_p=0.25, train_n=4000,
        test_n=500, shift_n=500, eval_corruptions=("noise",))
    for preset, key in RN_KEYS.items():
        run = _planned_run(monkeypatch, M.TINY_RN, preset=preset, precision="fp32")
        assert run["recipe"] == P.PRESETS[preset] and run["key"] == key, (preset, run["key"])
    # the default config is still the ResNet, with its default recipe
    run = M.pretrain_base(cache=False, device="cpu", precision="fp32")
    assert run["config"] == M.TINY_RN and run["key"] == RN_KEYS["default"]


def test_vit_config_selects_the_vit_recipe(monkeypatch):
    for preset in ("default", "test"):
        run = _planned_run(monkeypatch, M.TINY_VIT, preset=preset, precision="fp32")
        assert run["recipe"] == P.VIT_PRESETS[preset] and run["preset"] == preset
        assert run["data_desc"]["n"] == P.VIT_PRESETS[preset]["train_n"]
    vit = _planned_run(monkeypatch, M.TINY_VIT, preset="test")
    rn = _planned_run(monkeypatch, M.TINY_RN, preset="test")
    assert vit["key"] != rn["key"]
    # overrides apply on top of the ViT preset; unknown keys and presets are still refused
    run = _planned_run(monkeypatch, M.TINY_VIT, preset="test", steps=7, lr=1e-3)
    assert run["recipe"] == dict(P.VIT_PRESETS["test"], steps=7, lr=1e-3)
    with pytest.raises(TypeError, match="unknown recipe keys"):
        M.pretrain_base(M.TINY_VIT, preset="test", learning_rate=1)
    with pytest.raises(ValueError, match="preset"):
        M.pretrain_base(M.TINY_VIT, preset="huge")


def test_vit_test_preset_learns():
    """The fast ViT test preset (cached in ``cache_dir("models")`` after the first run, like the RN test base)."""
    model, card = M.pretrain_base(M.TINY_VIT, preset="test", device="cpu")
    assert card["config"] == M.TINY_VIT and card["recipe"]["steps"] == P.VIT_PRESETS["test"]["steps"]
    m = card["metrics"]
    assert m["zero_shot_test"] >= 0.7, m  # measured 0.838 (seed 0); chance is 0.1
    assert m["zero_shot_sklearn_digits"] < m["zero_shot_test"], m
