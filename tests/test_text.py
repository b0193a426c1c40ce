"""The text path: exact EOT truncation against open_clip's 77-token encode_text, the token cache, zero-shot heads
and batched image encoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

import vlmfast.models as M  # noqa: E402
from vlmfast.models import text as T  # noqa: E402

ATOL = 1e-5

MIXED = [
    "a",
    "a photo of a dog.",
    "the digit nine",
    "an image of a rather long sentence, with punctuation; and more words than most prompts have",
    " ".join(["word"] * 120),  # fills the context: truncated by the tokenizer to 77 tokens, EOT at position 76
    "",
    "a photo of a {}.".format("golden retriever"),
]


@pytest.fixture(scope="module")
def tiny_models():
    return {name: M.create_model(name, device="cpu") for name in M.BUILTIN_CONFIGS}


@pytest.fixture(scope="module")
def vit_b32():
    return M.create_model("ViT-B-32", device="cpu")


def _full(model, texts, name=None):
    tok = M.get_tokenizer(name or M.model_config(model)["name"])(texts)
    with torch.no_grad():
        return model.encode_text(tok, normalize=False), tok


def test_mixed_lengths_include_a_full_context_row():
    tok = M.get_tokenizer("vlmfast-tiny-rn")(MIXED)
    eot = tok.argmax(-1)
    assert int(eot.max()) == 76  # the long row fills the 77-token context
    assert int(eot.min()) == 1  # the empty string: SOT, EOT
    assert len(set(eot.tolist())) >= 5


@pytest.mark.parametrize("name", ["vlmfast-tiny-rn", "vlmfast-tiny-vit"])
@pytest.mark.parametrize("batch_size", [1, 3, 1024])
def test_truncated_equals_full_tiny(tiny_models, name, batch_size):
    model = tiny_models[name]
    assert M.text_path(model) == "truncated"
    full, _ = _full(model, MIXED)
    with torch.no_grad():
        got = M.encode_text(model, MIXED, normalize=False, batch_size=batch_size)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)


def test_truncated_equals_full_vit_b32(vit_b32):
    assert M.text_path(vit_b32) == "truncated"
    full, tok = _full(vit_b32, MIXED, "ViT-B-32")
    with torch.no_grad():
        got = M.encode_text(vit_b32, MIXED, normalize=False, batch_size=4)
        got_tok = M.encode_text(vit_b32, tok, normalize=False)
    torch.testing.assert_close(got, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_tok, full, atol=ATOL, rtol=0)
    # normalised output = normalised full output
    with torch.no_grad():
        got_n = M.encode_text(vit_b32, MIXED)
    torch.testing.assert_close(got_n, F.normalize(full, dim=-1), atol=ATOL, rtol=0)


def test_short_batch_really_runs_fewer_positions(tiny_models, monkeypatch):
    model = tiny_models["vlmfast-tiny-rn"]
    seen = []
    orig = T._causal_mask

    def spy(parts, length):
        seen.append(length)
        return orig(parts, length)

    monkeypatch.setattr(T, "_causal_mask", spy)
    with torch.no_grad():
        M.encode_text(model, ["a", "a photo of a dog.", "the digit nine"], batch_size=2)
    # sorted by EOT: ("a", "the digit nine") then ("a photo of a dog.",); each batch cut to its own longest row
    assert seen == [5, 8]


def test_wrong_truncation_is_detected(tiny_models, monkeypatch):
    """The equality check above is sharp: a mask that is not causal over the kept positions, or a cut shorter than
    the longest EOT, breaks it."""
    model = tiny_models["vlmfast-tiny-vit"]
    full, _ = _full(model, MIXED)

    # 1. slicing the positions but dropping the causal structure (e.g. a mask of zeros) changes the outputs
    monkeypatch.setattr(T, "_causal_mask", lambda parts, length: torch.zeros(length, length))
    with torch.no_grad():
        bad = M.encode_text(model, MIXED, normalize=False)
    assert (bad - full).abs().max() > 1e-3

    # 2. an unsliced 77 x 77 mask on a truncated sequence cannot run
    monkeypatch.setattr(T, "_causal_mask", lambda parts, length: parts.attn_mask)
    with pytest.raises((RuntimeError, AssertionError)), torch.no_grad():
        M.encode_text(model, ["a photo of a dog."], normalize=False)
    monkeypatch.undo()

    # 3. cutting at the shortest EOT instead of the longest loses the long rows' EOT
    monkeypatch.setattr(T, "_truncated_length", lambda eot: int(eot.min()) + 1)
    with pytest.raises(IndexError), torch.no_grad():
        M.encode_text(model, MIXED, normalize=False, batch_size=len(MIXED))


def test_custom_text_clip_truncated_and_fallbacks():
    # CustomTextCLIP with open_clip's TextTransformer: truncated path, exact
    model = M.create_model("vlmfast-tiny-vit", device="cpu", force_custom_text=True)
    assert type(model).__name__ == "CustomTextCLIP"
    assert M.text_path(model) == "truncated"
    tok = M.get_tokenizer("vlmfast-tiny-vit")(MIXED)
    with torch.no_grad():
        torch.testing.assert_close(M.encode_text(model, MIXED, normalize=False), model.encode_text(tok),
                                   atol=ATOL, rtol=0)
    # a bidirectional text tower cannot be truncated: falls back to the model's own encode_text
    cfg = M.get_model_config("vlmfast-tiny-vit")
    cfg["text_cfg"]["no_causal_mask"] = True
    model = open_clip.CLIP(**cfg).eval()
    assert M.text_path(model) == "full"
    with torch.no_grad():
        torch.testing.assert_close(M.encode_text(model, tok, normalize=False), model.encode_text(tok),
                                   atol=0, rtol=0)

    # an unknown model type with an encode_text of its own
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(77, 5))

        def encode_text(self, tokens):
            return tokens.float() @ self.w

    other = Other()
    assert M.text_path(other) == "full"
    with torch.no_grad():
        torch.testing.assert_close(M.encode_text(other, tok, normalize=False), other.encode_text(tok))


def test_token_cache_tokenizes_each_text_once():
    calls = []
    base = M.get_tokenizer("vlmfast-tiny-rn")

    def counting(texts):
        calls.append(list(texts))
        return base(texts)

    T.clear_token_cache()
    a = T.tokenize(["x y", "z", "x y"], counting)
    b = T.tokenize(["z", "w"], counting)
    assert calls == [["x y", "z"], ["w"]]
    assert torch.equal(a[0], a[2]) and torch.equal(a[1], b[0])
    assert torch.equal(b, base(["z", "w"]))


def test_encode_text_order_gradients_and_errors(tiny_models):
    model = tiny_models["vlmfast-tiny-rn"]
    texts = ["the digit nine", "a", "an image of a seven", "one"]
    with torch.no_grad():
        all_at_once = M.encode_text(model, texts)
        one_by_one = torch.cat([M.encode_text(model, [t]) for t in texts])
    torch.testing.assert_close(all_at_once, one_by_one, atol=ATOL, rtol=0)
    torch.testing.assert_close(all_at_once.norm(dim=-1), torch.ones(4))
    assert M.encode_text(model, "one").shape == (1, 64)
    # differentiable (prompt tuning trains through it)
    out = M.encode_text(model, texts)
    out.sum().backward()
    assert model.token_embedding.weight.grad is not None
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="batch_size"):
        M.encode_text(model, texts, batch_size=0)
    with pytest.raises(ValueError, match="texts_or_tokens"):
        M.encode_text(model, torch.zeros(3, 77))
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        M.encode_text(model, ["a", 3])


def naive_head(model, classnames, templates):
    tok = M.get_tokenizer(M.model_config(model)["name"])
    rows = []
    with torch.no_grad():
        for c in classnames:
            e = F.normalize(model.encode_text(tok([t.format(c) for t in templates])), dim=-1)
            rows.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["vlmfast-tiny-rn", "vlmfast-tiny-vit"])
def test_zero_shot_head_equals_naive_loop(tiny_models, name):
    model = tiny_models[name]
    classes = ["zero", "one", "two", "a fairly long class name with several words", "nine"]
    templates = ["a photo of the number {}", "the digit {}", "an image of a {}", "{}"]
    head = M.zero_shot_head(model, classes, templates, batch_size=3)
    assert head.shape == (5, 64) and head.dtype == torch.float32
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(head, naive_head(model, classes, templates), atol=ATOL, rtol=0)


def test_zero_shot_head_template_forms(tiny_models):
    model = tiny_models["vlmfast-tiny-vit"]
    a = M.zero_shot_head(model, ["cat", "dog"], ["a photo of a {}.", "{}"])
    b = M.zero_shot_head(model, ["cat", "dog"], ["a photo of a {c}.", lambda c: c])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert M.fill_templates(["x"], ["{classname}!", "<{}>"]) == ["x!", "<x>"]
    with pytest.raises(ValueError, match="placeholder"):
        M.zero_shot_head(model, ["cat"], ["no placeholder"])
    with pytest.raises(ValueError, match="classnames"):
        M.zero_shot_head(model, [], ["{}"])
    with pytest.raises(ValueError, match="templates"):
        M.zero_shot_head(model, ["cat"], [])


def test_encode_images_batching_cache_and_inputs(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMFAST_CACHE", str(tmp_path))
    model = tiny_models["vlmfast-tiny-rn"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (37, 3, 56, 56), dtype=torch.uint8, generator=g)
    a = M.encode_images(model, images, batch_size=256)
    b = M.encode_images(model, images, batch_size=7)
    assert a.shape == (37, 64) and a.dtype == torch.float32 and a.device.type == "cpu"
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(37), atol=1e-6, rtol=0)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(M.preprocess(images, 64)), dim=-1)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=0)

    class DS:
        pass

    ds = DS()
    ds.images = images
    torch.testing.assert_close(M.encode_images(model, ds), a, atol=0, rtol=0)
    raw = M.encode_images(model, images, normalize=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), a, atol=1e-6, rtol=0)

    c1 = M.encode_images(model, images, cache=True)
    files = list((tmp_path / "features").glob("*.safetensors"))
    assert len(files) == 1
    c2 = M.encode_images(model, images, cache=True)
    torch.testing.assert_close(c1, a, atol=0, rtol=0)
    torch.testing.assert_close(c2, a, atol=0, rtol=0)
    # a different model (weights) gets its own entry
    other = M.create_model("vlmfast-tiny-rn", device="cpu")
    with torch.no_grad():
        other.visual.attnpool.c_proj.bias.add_(0.1)
    M.encode_images(other, images, cache=True)
    assert len(list((tmp_path / "features").glob("*.safetensors"))) == 2

    with pytest.raises(ValueError, match="data_or_images"):
        M.encode_images(model, torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="data_or_images"):
        M.encode_images(model, [1, 2, 3])
    with pytest.raises(ValueError, match="batch_size"):
        M.encode_images(model, images, batch_size=0)
