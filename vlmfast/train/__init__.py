"""vlmfast.train: one small training engine for pretraining and every tuning method.

=========================  ==================================================================================
``TrainConfig``            steps, lr, weight_decay, betas, eps, warmup, schedule, grad_clip, seed,
                           checkpoint_every / checkpoint_dir, precision ("auto" | "fp32" | "bf16"), progress
``fit``                    ``fit(model, loss_fn, batches, config, params=, callbacks=)`` -> ``TrainState``;
                           resumes from the newest checkpoint in ``checkpoint_dir``
``param_groups``           optimizer groups by name rules: per-group ``lr_scale`` / ``weight_decay``;
                           ``is_text_tower`` / ``is_image_tower`` / ``no_weight_decay`` selectors
``cosine_with_warmup``     the default schedule (``constant_with_warmup`` too)
``EpochSampler``           batch indices as a pure function of the step; ``step_generator(seed, step)``
``Callback``               ``on_train_start`` / ``on_step_end`` / ``on_log`` / ``on_train_end`` + state_dict;
                           ``LambdaCallback``, ``MetricsCallback``
=========================  ==================================================================================

A run is a deterministic function of (model init, ``loss_fn``, ``batches``, ``config``): its length is a number
of steps, and a run killed at any point and started again with the same ``checkpoint_dir`` ends with the same
weights as one that was never interrupted (bitwise on CPU at a fixed thread count).

    from vlmfast.train import TrainConfig, fit, param_groups, is_text_tower, EpochSampler

    sampler = EpochSampler(len(data), batch_size=128, seed=0)
    state = fit(model, loss_fn=lambda b: clip_loss(*model_features(b), model.logit_scale.exp()),
                batches=lambda step: data[sampler(step)],
                config=TrainConfig(steps=600, lr=2e-3, weight_decay=0.1, warmup=0.05, checkpoint_every=100,
                                   checkpoint_dir="runs/base"),
                params=param_groups(model, [(is_text_tower, 0.05)]))
"""

from vlmfast.train.config import PRECISIONS, SCHEDULES, TrainConfig
from vlmfast.train.engine import Callback, LambdaCallback, MetricsCallback, TrainState, fit, resolve_precision
from vlmfast.train.params import is_image_tower, is_text_tower, no_weight_decay, param_groups
from vlmfast.train.sampling import EpochSampler, step_generator, step_seed
from vlmfast.train.schedule import constant_with_warmup, cosine_with_warmup
from vlmfast.train.state import list_checkpoints

__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "Callback",
    "EpochSampler",
    "LambdaCallback",
    "MetricsCallback",
    "TrainConfig",
    "TrainState",
    "constant_with_warmup",
    "cosine_with_warmup",
    "fit",
    "is_image_tower",
    "is_text_tower",
    "list_checkpoints",
    "no_weight_decay",
    "param_groups",
    "resolve_precision",
    "step_generator",
    "step_seed",
]
