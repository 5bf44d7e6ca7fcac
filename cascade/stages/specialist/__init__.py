"""The specialist: a ConvNeXt-V2 classifier for one domain's classes that re-ranks the queries routed there.

- :mod:`.head`: :class:`SpecialistStage`, the estimator (logistic-regression head on backbone features, its
  blending weight chosen by cross-validation, the re-ranking rule, save and load).
- :mod:`.logistic`: the head's solver.
- :mod:`.views`: the cached augmented views of the support images.
- :mod:`.finetune`: the optional fine-tuning loop.

Preprocessing is :class:`cascade.preprocess.Preprocess`, shared with CLIP (:data:`PRESETS` are the
checkpoint families).
"""
from ...preprocess import DEFAULT_PRESET, PRESETS, Preprocess
from .finetune import finetune_backbone
from .head import SpecialistStage, stratified_group_folds
from .logistic import fit_logistic, logistic_loss_grad
from .views import eval_view, make_views, random_resized_crop_flip, support_view_features, to_array

__all__ = ["SpecialistStage", "Preprocess", "PRESETS", "DEFAULT_PRESET", "random_resized_crop_flip", "eval_view",
           "to_array", "make_views", "support_view_features", "stratified_group_folds", "fit_logistic",
           "logistic_loss_grad", "finetune_backbone"]
