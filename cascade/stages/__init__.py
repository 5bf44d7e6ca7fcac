"""Stages of the cascade; each is an estimator with the interface of :class:`cascade.stages.base.Stage`.

Every module of this package is imported here, so a stage registers itself (``@register_stage("name")``) by
being a file in this folder: the registry (:func:`stage_names`, :func:`get_stage`) is the only list of stage
names, and adding a stage is one new file. Stages defined outside the package register the same way when their
module is imported, or through the ``cascade.stages`` entry-point group of an installed package
(docs/extending.md).
"""
import importlib
import pkgutil
from importlib import metadata

from .base import (NotFittedError, ParameterError, Stage, UnknownStageError, check_features, check_labels,
                   get_stage, register_stage, stage_name, stage_names, validate_params)
from .calibration import compatible_marginal, estimate_prior, fit_pool_weights, fit_temperature, marginal_test
from .clip_adapter import CLIPAdapter
from .gda import GDA
from .inmap import InMaP, image_opt, sinkhorn
from .lpp import LinearProbePP
from .tip_adapter import TipAdapter, TipAdapterF
from .zeroshot import ZeroShot


def _import_stage_modules() -> None:
    """Import every module of this package (each registers the stages it defines), then the modules named by
    installed packages under the ``cascade.stages`` entry-point group."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    for entry in metadata.entry_points(group="cascade.stages"):
        entry.load()


_import_stage_modules()

__all__ = ["Stage", "NotFittedError", "ParameterError", "UnknownStageError", "check_features", "check_labels",
           "register_stage", "get_stage", "stage_names", "stage_name", "validate_params", "ZeroShot", "InMaP",
           "LinearProbePP", "GDA", "TipAdapter", "TipAdapterF", "CLIPAdapter", "sinkhorn", "image_opt", "estimate_prior", "fit_temperature",
           "fit_pool_weights", "marginal_test", "compatible_marginal"]
