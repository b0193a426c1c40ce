"""Benchmark: one CoOp training step (text tower forward with the learned context injected, fused prompt-logit CE,
backward into the context, AdamW step) through our EOT-truncated text path, against the same step through a plain
full-context text-encoder forward (the way the CoOp reference does it: all ``context_length`` (77) positions run
for every prompt). Same model, same learner initialisation, same image-feature batch; the two losses are checked
to agree before timing (the truncated path is exact, not an approximation).

Providers:

* ``vlmfast-truncated``: :class:`vlmfast.tuning.PromptLearner` as shipped (only ``max EOT + 1`` positions run);
* ``plain-77``: the learner with its text encoder swapped for the full-length forward (peer and reference).

The reported ratio (``speedup_vs_peer``) is plain / ours. Models are random-init open_clip configs (timing does not
depend on the weights); class names are the digits (C = 10) or the first C words of ``noun_vocabulary()``.

    python benchmarks/bench_prompt_tuning.py                  # the CPU configs (and the GPU one when present)
    python benchmarks/bench_prompt_tuning.py --config quick   # seconds; what the test suite runs
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(model="vlmfast-tiny-rn", C=4, batch=8, device="cpu", method="coop"),
    "cpu-tiny-rn-c10": dict(model="vlmfast-tiny-rn", C=10, batch=32, device="cpu", method="coop"),
    "cpu-tiny-rn-c10-dor": dict(model="vlmfast-tiny-rn", C=10, batch=32, device="cpu", method="coop", dor=True),
    "cpu-vitb32-c100": dict(model="ViT-B-32", C=100, batch=32, device="cpu", method="coop"),
    "gpu-vitb32-c1000": dict(model="ViT-B-32", C=1000, batch=32, device="cuda", method="coop"),
}


def encode_full(parts, tokens: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """The plain text-encoder forward over all ``context_length`` positions, with optional injected embeddings
    (zero-padded past what the learner built: the causal mask keeps those positions away from every EOT)."""
    from vlmfast.models.text import eot_positions

    length = int(parts.positional_embedding.shape[0])
    tokens = F.pad(tokens, (0, length - tokens.shape[1]))
    cast = parts.transformer.get_cast_dtype()
    if embeddings is None:
        x = parts.token_embedding(tokens).to(cast)
    else:
        x = F.pad(embeddings, (0, 0, 0, length - embeddings.shape[1])).to(cast)
    x = x + parts.positional_embedding.to(cast)
    x = parts.transformer(x, attn_mask=parts.attn_mask)
    x = parts.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), eot_positions(tokens, parts.pool_type, parts.eos_id)]
    proj = parts.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


@contextlib.contextmanager
def full_text_path():
    """Swap the learner's text encoder for :func:`encode_full` while the block runs."""
    import vlmfast.tuning.prompt as prompt_mod

    saved = prompt_mod.encode_truncated
    prompt_mod.encode_truncated = encode_full
    try:
        yield
    finally:
        prompt_mod.encode_truncated = saved


def _classnames(c: int) -> list[str]:
    from vlmfast.data import CLASSNAMES, noun_vocabulary

    if c <= len(CLASSNAMES):
        return list(CLASSNAMES[:c])
    words = [w for w in noun_vocabulary() if w not in CLASSNAMES]
    return words[:c]


def make_step(model, classnames, x, y, method: str, dor: bool, device: str):
    """A closure running one training step of a freshly initialised learner (seed 0), and the learner."""
    from vlmfast.tuning import PromptLearner, outlier_pool, prompt_loss

    learner = PromptLearner(model, classnames, method=method, seed=0)
    if dor:
        learner.set_outlier_pool(outlier_pool(model, classnames, k=200, cache=False))
    opt = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=2e-3, weight_decay=5e-4)
    scale = learner.logit_scale
    state = {"step": 0}

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if dor:
            idx = learner.sample_outliers(0, state["step"], len(classnames))
            cls, tuned = learner.text_features(None, outliers=idx)
            loss = prompt_loss(x, cls.float(), scale, y) + 8.0 * learner.dor_term(tuned, learner.pool_features[idx])
        else:
            loss = prompt_loss(x, learner.text_features().float(), scale, y)
        loss.backward()
        opt.step()
        state["step"] += 1
        return float(loss.detach())

    return step, learner


def run(name: str, cfg: dict, reps: int | None, record: bool) -> None:
    from vlmfast.models import create_model
    from vlmfast.models.text import eot_positions, text_parts

    device = cfg["device"]
    torch.manual_seed(0)
    model = create_model(cfg["model"], pretrained=None, device=device)
    classnames = _classnames(cfg["C"])
    parts = text_parts(model)
    vis = int(model.visual.output_dim)
    x = torch.randn(cfg["batch"], vis, device=device)
    y = torch.randint(0, len(classnames), (cfg["batch"],), device=device)
    dor = bool(cfg.get("dor", False))

    ours, learner = make_step(model, classnames, x, y, cfg["method"], dor, device)
    with full_text_path():
        plain, _ = make_step(model, classnames, x, y, cfg["method"], dor, device)
        loss_plain = plain()
    loss_ours = ours()
    if abs(loss_ours - loss_plain) > 1e-4 * max(1.0, abs(loss_plain)):
        raise RuntimeError(f"truncated and full text paths disagree: loss {loss_ours} vs {loss_plain}")
    eot = eot_positions(learner._class_rows.tokens, parts.pool_type, parts.eos_id)
    length = int(eot.max()) + 1
    ctx_len = int(parts.positional_embedding.shape[0])

    n = reps or (5 if name == "quick" else 20)
    timings = {"vlmfast-truncated": _runner.time_fn(ours, device, reps=n, warmup=1)}
    with full_text_path():
        timings["plain-77"] = _runner.time_fn(plain, device, reps=n, warmup=1)
    note = (f"{cfg['model']} random init, method {cfg['method']}{'+dor' if dor else ''}, C={len(classnames)}, "
            f"batch {cfg['batch']}, positions run {length} of {ctx_len}, first-step losses {loss_ours:.6f} vs "
            f"{loss_plain:.6f}")
    print(f"\n### prompt tuning step: {name}\n")
    _runner.report("prompt_tuning", name, device, timings, ref="plain-77", peer="plain-77", extra_note=note,
                   record=record)
    ratio = timings["plain-77"].median / timings["vlmfast-truncated"].median
    print(f"\nratio plain-77 / truncated: {ratio:.2f}x ({length} of {ctx_len} positions)")


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run)


if __name__ == "__main__":
    raise SystemExit(main())
