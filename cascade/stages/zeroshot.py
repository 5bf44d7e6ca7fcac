"""Zero-shot CLIP: cosine similarity between an image feature and each class's text embedding."""
from __future__ import annotations

import numpy as np

from numbers import Real

from .base import Interval, Stage, check_features, register_stage


@register_stage("zeroshot")
class ZeroShot(Stage):
    """Zero-shot classifier ``logits = x . t_c / temperature``.

    Parameters
    ----------
    temperature : float
        Softmax temperature of the probabilities (CLIP's learned logit scale is 100, i.e. 0.01).
    """

    _parameter_constraints = {"temperature": [Interval(Real, 0, None, closed="neither")]}

    def __init__(self, temperature: float = 0.01):
        self.temperature = temperature

    def fit(self, X=None, y=None, *, text=None, val=None, query=None) -> "ZeroShot":
        """Store the class text embeddings ``text`` [C, D] (the other arguments are accepted and ignored)."""
        self._validate_params()
        if text is None:
            raise ValueError("ZeroShot.fit needs the class text embeddings (text=[C, D])")
        self.text_ = check_features(text, "text")
        return self

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted()
        X = check_features(X, "X", dim=self.text_.shape[1])
        return (X @ self.text_.T) / np.float32(self.temperature)
