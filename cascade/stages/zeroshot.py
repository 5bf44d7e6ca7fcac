"""Zero-shot CLIP: cosine similarity between an image feature and each class's text embedding."""
from __future__ import annotations

import numpy as np

from .base import Stage, check_features


class ZeroShot(Stage):
    """Zero-shot classifier ``logits = x . t_c / temperature``.

    Parameters
    ----------
    temperature : float
        Softmax temperature of the probabilities (CLIP's learned logit scale is 100, i.e. 0.01).
    """

    def __init__(self, temperature: float = 0.01):
        self.temperature = temperature

    def fit(self, X=None, y=None, *, text) -> "ZeroShot":
        """Store the class text embeddings ``text`` [C, D] (X and y are accepted and ignored)."""
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        self.text_ = check_features(text, "text")
        return self

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted()
        X = check_features(X, "X", dim=self.text_.shape[1])
        return (X @ self.text_.T) / np.float32(self.temperature)
