"""Stages of the cascade; each is an estimator with the interface of :class:`cascade.stages.base.Stage`.

``STAGES`` maps a short name to each stage class (used by configs and the bench); a new stage is a new
file plus one line here.
"""
from .base import NotFittedError, Stage, check_features, check_labels
from .calibration import compatible_marginal, estimate_prior, fit_pool_weights, fit_temperature, marginal_test
from .clip_adapter import CLIPAdapter
from .gda import GDA
from .inmap import InMaP, image_opt, sinkhorn
from .lpp import LinearProbePP
from .tip_adapter import TipAdapter, TipAdapterF
from .zeroshot import ZeroShot

STAGES = {"zero-shot": ZeroShot, "inmap": InMaP, "lpp": LinearProbePP, "gda": GDA}
STAGES["tip-adapter"] = TipAdapter
STAGES["tip-adapter-f"] = TipAdapterF
STAGES["clip-adapter"] = CLIPAdapter

__all__ = ["Stage", "NotFittedError", "check_features", "check_labels", "ZeroShot", "InMaP", "LinearProbePP", "GDA",
           "sinkhorn", "image_opt", "estimate_prior", "fit_temperature", "fit_pool_weights",
           "marginal_test", "compatible_marginal", "STAGES"]
