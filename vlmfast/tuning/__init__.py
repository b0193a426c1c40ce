"""vlmfast.tuning: parameter-efficient tuning of frozen CLIP models.

=========================  ==================================================================================
``fit``                    prompt tuning: CoOp / CoCoOp / KgCoOp, optional DOR term (``dor=True``)
``PromptLearner``          learned context over the exact EOT-truncated text path; ``save`` / ``logits``
``load_prompt_learner``    safetensors + JSON card, validated against the model
``outlier_pool``           DOR's near-OOD word pool (top-K nouns by similarity to the base classes)
``base_to_new_split``      CoCoOp's base / new class split (first ceil(C/2) ids are base)
``evaluate_base_to_new``   accuracies, H and every calibration metric for base and new
``robust``                 robust fine-tuning: ``robust.fit(method="flyp"|"carot"|"ft"|"lp"|"lpft")``,
                           ``robust.wise_ft``, ``robust.evaluate`` (accuracy, ECE, NLL, Brier, sigma_min)
=========================  ==================================================================================
"""

from vlmfast.tuning import robust

from vlmfast.tuning.prompt import (
    DEFAULT_TEMPLATE,
    METHODS,
    OutlierPool,
    PromptLearner,
    base_to_new_split,
    evaluate_base_to_new,
    fit,
    format_base_to_new,
    load_prompt_learner,
    outlier_pool,
    prompt_loss,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "METHODS",
    "OutlierPool",
    "PromptLearner",
    "base_to_new_split",
    "evaluate_base_to_new",
    "fit",
    "format_base_to_new",
    "load_prompt_learner",
    "outlier_pool",
    "prompt_loss",
    "robust",
]
