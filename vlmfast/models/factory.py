"""Model factory: open_clip models by config name, the built-in tiny configs, and a vectorised preprocess.

Every open_clip config name works (``list_models()``), plus the two tiny configs that ship with vlmfast and are
registered through open_clip's public ``open_clip.add_model_config`` when :mod:`vlmfast.models` is imported:

``vlmfast-tiny-rn``  (ModifiedResNet, the RaVL / region path; ~1.3 M vision + 3.3 M text parameters)
    ``image_size`` 64, ``layers`` [1, 1, 1, 1], ``width`` 16 (trunk channels 64 / 128 / 256 / 512), attention
    pool of 8 heads x 64 over the 2 x 2 last map, embed dim 64.

    **Geometry.** The spurious-MNIST composites are 56 x 56 canvases of four 28 x 28 quadrants. open_clip's
    ModifiedResNet downsamples 4x in the stem and 2x in each of layer2..4 (32x in all); the attention pool needs
    an input size divisible by 32, and at 56 px the last map would be 1 x 1. The composites are therefore resized
    to **64 px** (bilinear, in :func:`preprocess`): stem/layer1 16 x 16, **layer2 8 x 8**, layer3 4 x 4, layer4
    2 x 2 (one cell per quadrant). A quadrant covers **4 x 4 cells of layer2**, which is where
    :func:`vlmfast.models.region_features` cuts the trunk by default for this model (``layer="auto"`` picks the
    deepest stage at least 8 cells wide: layer3 for RN50 at 224 px, as ViLLA; layer2 here). RoIAlign resamples a
    box to the full 8 x 8 layer2 grid, so layer3, layer4 and the attention pool see exactly the geometry of a
    whole image (ViLLA-style region embeddings, no positional-embedding interpolation).

    Why 64 px rather than 128 px with layer3 (8 x 8 at 128 px, also 4 x 4 cells per quadrant): the image tower
    costs ~4x less per image, which is what makes a CPU-pretrained base (:func:`vlmfast.models.pretrain_base`:
    98 % zero-shot in 3 minutes on 2 cores) and CPU fine-tuning/audit runs practical. Measured on 2 busy cores,
    60 s of pretraining each: 64 px 97 % zero-shot, 96 px 92 %, 128 px 47-84 %. Pass
    ``force_image_size=128`` to :func:`create_model` for the 128 px / layer3 variant.
``vlmfast-tiny-vit`` (ViT; ~0.3 M vision + 3.3 M text parameters)
    ``image_size`` 64, ``patch_size`` 8 (an 8 x 8 token grid: a quadrant is 4 x 4 patches), 3 layers of width 96
    (3 heads of 32), MLP ratio 2, embed dim 64.

Both text towers are open_clip's causal transformer with context 77 and the CLIP BPE vocabulary of 49408 (so
the stock tokenizer works offline): width 64, 2 heads, 2 layers, MLP ratio 2. The 49408 x 64 token embedding
(3.2 M) is most of each model's parameters; the compute is small (forward + backward of 96 composites: ~0.2 s
for either image tower on 2 CPU cores).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vlmfast.models.weights import load_state_dict_file, load_weights_into

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TINY_RN = "vlmfast-tiny-rn"
TINY_VIT = "vlmfast-tiny-vit"
BUILTIN_CONFIGS = (TINY_RN, TINY_VIT)

# OpenAI CLIP normalisation (open_clip.constants.OPENAI_DATASET_MEAN / _STD), the default of every CLIP config.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16", "amp_bfloat16")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

# attribute set on every model this module builds: {"name": config name, "model_cfg": config dict}
CONFIG_ATTR = "vlmfast_config"


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("vlmfast.models needs open_clip: pip install open_clip_torch torchvision") from e
    return open_clip


def register_configs() -> list[str]:
    """Register the JSON configs of ``vlmfast/models/configs/`` with open_clip (public ``add_model_config``).
    Idempotent; returns the names registered. Called at import of :mod:`vlmfast.models`."""
    oc = _open_clip()
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    known = set(oc.list_models())
    if not all(n in known for n in names):
        oc.add_model_config(CONFIG_DIR)
    return names


def list_models() -> list[str]:
    """Every config name :func:`create_model` accepts (open_clip's registry, which includes the vlmfast tiny
    configs)."""
    return list(_open_clip().list_models())


def get_model_config(name: str) -> dict[str, Any]:
    """A copy of the open_clip config dict of ``name``. Raises ValueError for an unknown name."""
    _check_name(name)
    cfg = _open_clip().get_model_config(name)
    if cfg is None:
        raise ValueError(f"name: unknown model config {name!r}; see vlmfast.models.list_models()")
    return cfg


def _check_name(name: Any) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str (an open_clip config name), got {type(name).__name__}")
    if not name:
        raise ValueError("name: expected a non-empty config name, got ''")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: Any) -> torch.device:
    """``torch.device(device)``; None picks CUDA when available, else CPU. ValueError for anything else."""
    if device is None:
        return default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: expected a torch device or None, got {device!r}") from e


def _looks_like_path(pretrained: str) -> bool:
    return (
        os.sep in pretrained
        or (os.altsep is not None and os.altsep in pretrained)
        or pretrained.endswith(_CHECKPOINT_SUFFIXES)
        or os.path.exists(pretrained)
    )


def create_model(
    name: str,
    pretrained: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    **open_clip_kwargs: Any,
) -> torch.nn.Module:
    """An open_clip model for config ``name``, in eval mode.

    ``pretrained``:
      * ``None``: random initialisation (no file, no network);
      * a local file (``.safetensors``, or a ``.pt``/``.pth``/``.bin`` state dict): loaded with
        :func:`vlmfast.models.load_state_dict_file` (safetensors, or ``torch.load(weights_only=True)`` — never an
        unpickle of arbitrary objects) and checked key by key against the model, with an error naming the file and
        the key on any mismatch;
      * an open_clip pretrained tag (e.g. ``"openai"``, ``"laion2b_s34b_b79k"``): passed to open_clip, which
        downloads from the hub (set ``HF_HUB_OFFLINE=1`` to fail fast where there is no network).

    ``device``: None picks CUDA when available, else CPU. ``precision``: open_clip's precision string ("fp32",
    "bf16", "fp16", "pure_bf16", ...). Extra keyword arguments go to ``open_clip.create_model``. The returned model
    carries ``model.vlmfast_config = {"name": name, "model_cfg": config dict}`` (used by
    :func:`vlmfast.models.save_checkpoint` and the text path to find the tokenizer).
    """
    _check_name(name)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    oc = _open_clip()
    model_cfg = get_model_config(name)
    dev = resolve_device(device)
    weights_file: Path | None = None
    tag: str | None = None
    if pretrained is not None:
        if isinstance(pretrained, os.PathLike):
            weights_file = Path(pretrained)
        elif isinstance(pretrained, str):
            if not pretrained:
                raise ValueError("pretrained: expected None, a file path or an open_clip tag, got ''")
            if _looks_like_path(pretrained):
                weights_file = Path(pretrained)
            else:
                tags = list(oc.list_pretrained_tags_by_model(name.replace("/", "-")))
                if pretrained not in tags:
                    raise ValueError(
                        f"pretrained: {pretrained!r} is neither an existing file nor an open_clip tag of {name!r} "
                        f"(tags: {tags or 'none'})"
                    )
                tag = pretrained
        else:
            raise TypeError(f"pretrained: expected None, a path or a tag string, got {type(pretrained).__name__}")
    if weights_file is not None and not weights_file.is_file():
        raise FileNotFoundError(f"pretrained: no such file {str(weights_file)!r}")

    with _quiet_random_init(tag is None):
        model = oc.create_model(name, pretrained=tag, precision=precision, device=dev, **open_clip_kwargs)
    if weights_file is not None:
        state = load_state_dict_file(weights_file)
        load_weights_into(model, state, weights_file, config_name=name)
    model.eval()
    setattr(model, CONFIG_ATTR, {"name": name, "model_cfg": _apply_overrides(model_cfg, open_clip_kwargs)})
    return model


_FORCE_KEYS = {
    "force_image_size": ("vision_cfg", "image_size"),
    "force_context_length": ("text_cfg", "context_length"),
    "force_patch_dropout": ("vision_cfg", "patch_dropout"),
}


def _apply_overrides(model_cfg: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The config a model was actually built with: open_clip's ``force_*`` overrides and extra model kwargs applied
    (so a checkpoint card can rebuild it exactly)."""
    import copy

    cfg = copy.deepcopy(model_cfg)
    for key, value in kwargs.items():
        if value is None or value is False:
            continue
        if key in _FORCE_KEYS:
            tower, field = _FORCE_KEYS[key]
            cfg[tower][field] = list(value) if isinstance(value, tuple) else value
        elif key == "force_quick_gelu":
            cfg["quick_gelu"] = True
        elif key == "force_custom_text":
            cfg["custom_text"] = True
        elif not key.startswith("force_") and key not in _NON_MODEL_KWARGS:
            cfg[key] = value
    return cfg


_NON_MODEL_KWARGS = {
    "load_weights", "jit", "pretrained_image", "pretrained_text", "pretrained_image_path", "pretrained_text_path",
    "cache_dir", "output_dict", "require_pretrained", "weights_only", "force_preprocess_cfg",
}


def build_from_config(model_cfg: dict[str, Any], *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A randomly initialised model from a full open_clip config dict (as stored in a checkpoint card), through
    open_clip's public ``local-dir:`` schema so that the model class (CLIP / CustomTextCLIP / CoCa) and the
    preprocessing config are chosen exactly as open_clip does. No weights are read."""
    import json
    import tempfile

    oc = _open_clip()
    with tempfile.TemporaryDirectory(prefix="vlmfast-cfg-") as d:
        (Path(d) / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
        with _quiet_random_init(True):
            model = oc.create_model("local-dir:" + d, device=device, pretrained_text=False)
    return model.eval()


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "initialized randomly" not in msg and "no CLIP weights found" not in msg


@contextlib.contextmanager
def _quiet_random_init(active: bool):
    """Silence open_clip's "No pretrained weights loaded ... initialized randomly" when random init was asked for."""
    if not active:
        yield
        return
    flt = _DropRandomInitWarning()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def model_config(model: torch.nn.Module) -> dict[str, Any] | None:
    """``{"name", "model_cfg"}`` of a model built by :func:`create_model` (or loaded from a checkpoint), else None."""
    return getattr(model, CONFIG_ATTR, None)


_TOKENIZERS: dict[str, Any] = {}


def get_tokenizer(name_or_model: str | torch.nn.Module):
    """open_clip's tokenizer for a config name (cached per name), or for a model built by :func:`create_model`.
    A model of unknown origin gets the stock CLIP BPE tokenizer at the model's context length."""
    if isinstance(name_or_model, torch.nn.Module):
        cfg = model_config(name_or_model)
        if cfg is not None and cfg.get("name") and cfg["name"] in _open_clip().list_models():
            return get_tokenizer(cfg["name"])
        ctx = int(getattr(name_or_model, "context_length", 77))
        key = f"<simple:{ctx}>"
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = _open_clip().SimpleTokenizer(context_length=ctx)
        return _TOKENIZERS[key]
    _check_name(name_or_model)
    if name_or_model not in _TOKENIZERS:
        get_model_config(name_or_model)  # a clear error for unknown names
        _TOKENIZERS[name_or_model] = _open_clip().get_tokenizer(name_or_model)
    return _TOKENIZERS[name_or_model]


def _visual(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "visual", model)


def image_size(model: torch.nn.Module) -> tuple[int, int]:
    """The (height, width) the model's image tower expects."""
    vis = _visual(model)
    size = getattr(vis, "image_size", None)
    if size is None:
        cfg = model_config(model)
        size = cfg["model_cfg"]["vision_cfg"].get("image_size") if cfg else None
    if size is None:
        raise ValueError(f"model: cannot tell the image size of a {type(model).__name__}")
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def model_family(model: torch.nn.Module) -> str:
    """``"resnet"`` (open_clip ModifiedResNet), ``"vit"`` (open_clip VisionTransformer), ``"timm"`` (a timm trunk)
    or ``"other"``."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    vis = _visual(model)
    if isinstance(vis, ModifiedResNet):
        return "resnet"
    if isinstance(vis, VisionTransformer):
        return "vit"
    if type(vis).__name__ == "TimmModel":
        return "timm"
    return "other"


def model_mean_std(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the model was configured with (open_clip's ``visual.preprocess_cfg``), else CLIP's."""
    pp = getattr(_visual(model), "preprocess_cfg", None) or {}
    mean = tuple(float(v) for v in pp.get("mean", CLIP_MEAN))
    std = tuple(float(v) for v in pp.get("std", CLIP_STD))
    return mean, std


def preprocess(
    images: torch.Tensor,
    image_size: int | Sequence[int],
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Vectorised CLIP preprocessing of a batch of tensors (no PIL, no per-image loop).

    ``images``: ``(N, 3, H, W)`` uint8 in [0, 255] (a floating tensor is taken to be in [0, 1] already).
    Returns ``(N, 3, S, S)`` (or ``(N, 3, h, w)`` for a pair ``image_size``) of ``dtype``: scaled to [0, 1], resized
    with bilinear interpolation (``align_corners=False``; antialiased when shrinking) to ``image_size`` and
    normalised per channel, ``(x - mean) / std``. Differs from open_clip's PIL transform in that the whole image
    is resized to the target (no aspect-preserving resize + centre crop): for square inputs the two agree up to
    interpolation details. ``device`` moves the uint8 batch first (less to copy than floats).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape (N, 3, H, W), got {tuple(images.shape)}")
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)
        if len(size) != 2:
            raise ValueError(f"image_size: expected an int or (height, width), got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"image_size: expected positive sizes, got {size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean/std: expected 3 values each, got {len(mean)} and {len(std)}")
    if device is not None:
        images = images.to(device)
    if images.dtype == torch.uint8:
        x = images.to(dtype if dtype in (torch.float32, torch.float64) else torch.float32) / 255.0
    elif images.is_floating_point():
        x = images.float() if images.dtype not in (torch.float32, torch.float64) else images
    else:
        raise TypeError(f"images: expected uint8 or a floating dtype, got {images.dtype}")
    if tuple(x.shape[-2:]) != size:
        shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def preprocess_for(model: torch.nn.Module, images: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """:func:`preprocess` at the model's image size and normalisation, on the model's device."""
    mean, std = model_mean_std(model)
    kwargs.setdefault("device", model_device(model))
    return preprocess(images, image_size(model), mean=mean, std=std, **kwargs)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
