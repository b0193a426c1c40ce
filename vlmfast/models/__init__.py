"""vlmfast.models: open_clip models by name, tiny built-in configs, safe checkpoints, the EOT-truncated text path,
region embeddings, a CPU-trainable pretrained base, and ``ModelSpec`` for fleet manifests.

Layering (no import cycles): ``weights`` (safe state-dict files) <- ``factory`` (create_model, preprocess) <-
``checkpoint`` (safetensors + card) <- ``text``, ``regions``, ``spec``, ``pretrain``.

Importing this module registers the configs in ``vlmfast/models/configs/`` with open_clip (public
``open_clip.add_model_config``): ``vlmfast-tiny-rn`` (ModifiedResNet at 64 px, the region/RaVL path) and
``vlmfast-tiny-vit`` (ViT at 64 px); see :mod:`vlmfast.models.factory` for their geometry.

=========================  ==================================================================================
``create_model``           open_clip model by config name; ``pretrained`` = None / a local file / an open_clip tag
``get_tokenizer``          open_clip tokenizer for a config name or a model
``list_models``            every config name (open_clip's + vlmfast's)
``preprocess``             uint8 ``(N, 3, H, W)`` -> normalised float at the model size (vectorised, no PIL)
``image_size``, ``model_family``  (H, W) of the image tower; "resnet" / "vit" / "timm" / "other"
``region_features``        RoIAlign region embeddings in the joint space (ResNet), crop-and-encode otherwise
``save_checkpoint``        ``<path>.safetensors`` + ``<path>.json`` card; ``load_checkpoint`` -> (model, card)
``encode_text``            exact EOT-truncated text encoding (token cache, length bucketing)
``zero_shot_head``         (C, D) class embeddings averaged over templates
``encode_images``          batched image features, optional on-disk cache
``pretrain_base``          contrastive pretraining of a tiny CLIP on unbiased composites (cached, resumable;
                           trained by :func:`vlmfast.train.fit` with :func:`vlmfast.losses.clip_loss`)
``ModelSpec``              a fleet manifest entry (JSON round trip, ``build()``)
=========================  ==================================================================================
"""

from __future__ import annotations

from vlmfast.models.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_file,
    read_card,
    save_checkpoint,
)
from vlmfast.models.factory import (
    BUILTIN_CONFIGS,
    CLIP_MEAN,
    CLIP_STD,
    TINY_RN,
    TINY_VIT,
    create_model,
    get_model_config,
    get_tokenizer,
    image_size,
    list_models,
    model_config,
    model_family,
    preprocess,
    preprocess_for,
    register_configs,
)
from vlmfast.models.pretrain import PRESETS, pretrain_base, zero_shot_accuracy
from vlmfast.models.regions import region_features
from vlmfast.models.spec import ModelSpec
from vlmfast.models.text import (
    encode_images,
    encode_text,
    fill_templates,
    text_path,
    tokenize,
    weights_hash,
    zero_shot_head,
)

register_configs()

__all__ = [
    "BUILTIN_CONFIGS",
    "CLIP_MEAN",
    "CLIP_STD",
    "CheckpointError",
    "ModelSpec",
    "PRESETS",
    "TINY_RN",
    "TINY_VIT",
    "create_model",
    "encode_images",
    "encode_text",
    "fill_templates",
    "get_model_config",
    "get_tokenizer",
    "image_size",
    "list_models",
    "load_checkpoint",
    "load_state_dict_file",
    "model_config",
    "model_family",
    "preprocess",
    "preprocess_for",
    "pretrain_base",
    "read_card",
    "region_features",
    "register_configs",
    "save_checkpoint",
    "text_path",
    "tokenize",
    "weights_hash",
    "zero_shot_accuracy",
    "zero_shot_head",
]
