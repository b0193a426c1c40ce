"""Benchmark: the EOT-truncated text path (:func:`vlmfast.models.encode_text`) against open_clip's 77-token
``encode_text``, on class prompts ``"a photo of a {classname}."`` for C class names (ImageNet-21k lemmas from
``vlmfast.data.noun_vocabulary``, a fixed random sample), under ``torch.no_grad``.

Providers (speed-up column = vs the first one, open_clip on pre-tokenised ids):

* ``open_clip encode_text [77 tokens]``: the reference, all C prompts in one call;
* ``vlmfast encode_text [truncated, bucketed]``: rows sorted by EOT position, batches of 256, each cut to its own
  longest prompt;
* ``vlmfast encode_text [truncated, one batch]``: one batch cut to the longest prompt of all;
* ``open_clip tokenize + encode_text`` vs ``vlmfast encode_text from texts (token cache warm)``: end to end
  from strings (vlmfast's LRU makes repeated tokenisation free, e.g. one zero-shot head per evaluated model).

The notes give the share of the 77 x C positions the bucketed path actually runs (attention's cost falls
faster than that, quadratically, so the speed-up can exceed its inverse).

    python benchmarks/bench_text.py                   # the CPU configs (and the GPU one when a GPU is present)
    python benchmarks/bench_text.py --config quick    # seconds
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _runner  # noqa: E402

CONFIGS = {
    "quick": dict(models=("vlmfast-tiny-rn",), C=100, device="cpu", reps=5),
    "cpu-tiny-c1000": dict(models=("vlmfast-tiny-rn", "vlmfast-tiny-vit"), C=1000, device="cpu", reps=10),
    "cpu-vitb32-c100": dict(models=("ViT-B-32",), C=100, device="cpu", reps=5),
    "cpu-vitb32-c1000": dict(models=("ViT-B-32",), C=1000, device="cpu", reps=3),
    "gpu-vitb32-c1000": dict(models=("ViT-B-32",), C=1000, device="cuda", reps=20),
}
TEMPLATE = "a photo of a {}."


def classnames(C: int, seed: int = 0) -> list[str]:
    try:
        from vlmfast.data import noun_vocabulary

        vocab = noun_vocabulary()
    except Exception:  # no timm: synthetic names of realistic length
        vocab = [f"object kind {i}" for i in range(40_000)]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(vocab), generator=g)[:C]
    return [vocab[int(i)] for i in idx]


def run_config(name: str, cfg: dict, reps: int | None, record: bool) -> list[dict]:
    import vlmfast.models as M
    from vlmfast.models.text import eot_positions

    device = cfg["device"]
    C = cfg["C"]
    reps = reps or cfg["reps"]
    prompts = [TEMPLATE.format(c) for c in classnames(C)]
    rows = []
    for model_name in cfg["models"]:
        model = M.create_model(model_name, device=device)
        tokenizer = M.get_tokenizer(model_name)
        tokens = tokenizer(prompts).to(device)
        eot = eot_positions(tokens.cpu())
        config = f"{model_name} text tower, C={C} prompts '{TEMPLATE}', {device}"
        print(f"\n## text encoding: {config}  ({_runner.device_name(device)})\n")
        print(f"EOT positions: mean {eot.float().mean():.1f}, max {int(eot.max())} (of 77)")
        M.encode_text(model, prompts)  # warm the token cache

        def ref():
            with torch.no_grad():
                return model.encode_text(tokens)

        def bucketed():
            with torch.no_grad():
                return M.encode_text(model, tokens, normalize=False, batch_size=256)

        def one_batch():
            with torch.no_grad():
                return M.encode_text(model, tokens, normalize=False, batch_size=C)

        def oc_e2e():
            with torch.no_grad():
                return model.encode_text(tokenizer(prompts).to(device))

        def vf_e2e():
            with torch.no_grad():
                return M.encode_text(model, prompts, normalize=False)

        err = (bucketed() - ref()).abs().max().item()
        cases = {
            "open_clip encode_text [77 tokens]": ref,
            "vlmfast encode_text [truncated, bucketed]": bucketed,
            "vlmfast encode_text [truncated, one batch]": one_batch,
            "open_clip tokenize + encode_text": oc_e2e,
            "vlmfast encode_text from texts (token cache warm)": vf_e2e,
        }
        timings = {k: _runner.time_fn(fn, device, reps=reps, warmup=1) for k, fn in cases.items()}
        ref_t = timings["open_clip encode_text [77 tokens]"]
        e2e_t = timings["open_clip tokenize + encode_text"]
        # positions run by the bucketed path
        order = torch.argsort(eot, stable=True)
        positions = sum((int(eot[order[s:s + 256]].max()) + 1) * len(order[s:s + 256]) for s in range(0, C, 256))
        share = positions / (77 * C)
        for provider, t in timings.items():
            row = _runner.base_row("text", config, device)
            row.update(
                provider=provider, median_ms=t.median, p20_ms=t.p20, p80_ms=t.p80,
                speedup_vs_ref=ref_t.median / t.median, speedup_vs_peer=e2e_t.median / t.median,
                notes=f"{t.reps} reps; {100 * share:.0f}% of positions run; max |diff| vs ref {err:.1e}"
                if "truncated, bucketed" in provider else f"{t.reps} reps",
            )
            rows.append(row)
        print(_runner.markdown_table(rows[-len(timings):]))
        print("(speedup_vs_peer: vs open_clip tokenize + encode_text)")
    if record:
        _runner.append_results(rows)
        print(f"\nappended {len(rows)} rows to {_runner.RESULTS}")
    return rows


def main(argv=None) -> int:
    return _runner.cli(argv, __doc__, CONFIGS, run_config, skip_by_default=("quick", "cpu-vitb32-c1000"), default_reps=None)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
