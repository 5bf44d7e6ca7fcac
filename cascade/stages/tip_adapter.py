"""Tip-Adapter and Tip-Adapter-F: a key-value cache of the support features (Zhang et al., arXiv 2207.09519).

Written from the paper and from reading the authors' code (gaopengcuhk/Tip-Adapter); nothing is copied.
The cache keys are the support features, the values their one-hot labels. The logits of a feature x are::

    z(x) = logit_scale * x . T^T  +  alpha * exp(-beta * (1 - x . K^T)) @ V

(``T``: class text embeddings, ``K``: keys, ``V``: one-hot values.) ``beta`` sharpens the affinities, ``alpha``
weighs the cache against zero-shot CLIP.

* Hyperparameter search, as the authors' ``search_hp`` on the validation rows: ``beta`` over
  ``0.1 + i (scale_beta - 0.1) / steps_beta`` for i < steps_beta, ``alpha`` likewise; the first pair (beta outer,
  alpha inner) with the strictly highest validation accuracy wins.
* Defaults: the authors' ``configs/imagenet.yaml`` (grid scales 7 and 3, 200 x 20 steps, beta 1, alpha 1.17),
  because the tasks this tool is built for are ImageNet-like (hundreds of mostly fine-grained classes).
  ``AUTHOR_CONFIGS`` holds the authors' other per-dataset settings; pass one as ``TipAdapter(**AUTHOR_CONFIGS[k])``.
* Without validation rows (or with zero of them) there is no search: the config's ``init_beta``/``init_alpha``
  are used, the values the authors' scripts use before their search.
* Tip-Adapter-F makes the keys learnable: AdamW (lr 0.001, eps 1e-4, torch's default weight decay 0.01),
  cosine learning rate over all steps, ``epochs`` (20) epochs of shuffled batches of 256 support rows,
  cross-entropy of the logits with ``init_beta``/``init_alpha``; the keys after the LAST epoch are kept (the
  authors' script also reports the epoch best on the test set, not a fair choice); then beta/alpha are searched
  on the validation rows with the fine-tuned keys. No augmentation: the features are given.

A class of ``text`` with no support rows gets no cache term (its logits are zero-shot CLIP's alone).
"""
from __future__ import annotations

import numpy as np

from numbers import Integral, Real

from .base import Interval, Stage, check_features, check_support, register_stage, softmax

#: The authors' per-dataset settings (configs/<dataset>.yaml of gaopengcuhk/Tip-Adapter): search grid and the
#: initial beta/alpha. Every config trains Tip-Adapter-F with lr 0.001 for 20 epochs (EuroSAT: 100).
AUTHOR_CONFIGS = {
    "imagenet": dict(search_scale=(7.0, 3.0), init_alpha=1.17),
    "caltech101": dict(search_scale=(12.0, 5.0), init_alpha=3.0),
    "food101": dict(search_scale=(10.0, 10.0), init_alpha=1.17),
    "oxford_pets": dict(search_scale=(7.0, 3.0), init_alpha=1.17),
    "dtd": dict(search_scale=(13.0, 13.0), init_alpha=2.0),
    "eurosat": dict(search_scale=(12.0, 10.0), init_alpha=2.0, epochs=100),
    "fgvc": dict(search_scale=(30.0, 30.0), init_alpha=5.0),
    "oxford_flowers": dict(search_scale=(50.0, 50.0), init_alpha=10.0),
    "stanford_cars": dict(search_scale=(20.0, 10.0), init_alpha=3.0),
    "sun397": dict(search_scale=(12.0, 10.0), init_alpha=1.17),
    "ucf101": dict(search_scale=(7.0, 3.0), init_alpha=3.0),
}


def search_grid(scale: float, steps: int) -> np.ndarray:
    """The authors' grid: ``0.1 + i (scale - 0.1) / steps`` for i = 0..steps-1."""
    return np.array([i * (scale - 0.1) / steps + 0.1 for i in range(steps)], dtype=np.float64)


class _Cache:
    """The class-sum of ``exp(-beta (1 - affinity))`` over the keys, computed without a one-hot matmul."""

    def __init__(self, labels: np.ndarray, n_classes: int):
        self.order = np.argsort(labels, kind="stable")
        present, starts = np.unique(labels[self.order], return_index=True)
        self.present, self.starts, self.n_classes = present, starts, n_classes

    def affinity(self, X: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """``X . keys^T`` [N, Ns] with the columns sorted by class (the order ``logits`` expects)."""
        return X @ keys[self.order].T

    def logits(self, affinity: np.ndarray, beta: float) -> np.ndarray:
        """[N, C] cache logits (alpha 1) from class-sorted affinities (``affinity``); computed in one buffer."""
        E = np.subtract(affinity, np.float32(1.0), dtype=np.float32)
        E *= np.float32(beta)
        np.exp(E, out=E)
        return self._sum_sorted(E)

    def class_sum(self, E: np.ndarray) -> np.ndarray:
        """``E @ onehot(labels)``: [N, Ns] -> [N, C], summing each class's columns (columns in key order)."""
        return self._sum_sorted(E[:, self.order])

    def _sum_sorted(self, E: np.ndarray) -> np.ndarray:
        out = np.zeros((E.shape[0], self.n_classes), dtype=E.dtype)
        out[:, self.present] = np.add.reduceat(E, self.starts, axis=1)
        return out


class _Pair:
    """Two numbers of ``kind`` (beta's, then alpha's), each above ``low`` (a parameter constraint)."""

    def __init__(self, kind, low, closed: str):
        self.one = Interval(kind, low, None, closed=closed)

    def __call__(self, value) -> bool:
        return (isinstance(value, (list, tuple, np.ndarray)) and len(value) == 2
                and all(self.one(v.item() if isinstance(v, np.generic) else v) for v in value))

    def __str__(self) -> str:
        return f"two values (beta, alpha), each {self.one}"


@register_stage("tip-adapter")
class TipAdapter(Stage):
    """Tip-Adapter over the classes of ``text`` (training-free cache model; see the module docstring).

    Parameters (authors' imagenet.yaml)
    ----------
    init_beta : float > 0, 1.0     beta used without validation rows (and, in Tip-Adapter-F, for training).
    init_alpha : float >= 0, 1.17  alpha, likewise.
    search_scale : (float, float), (7.0, 3.0)   upper ends of the beta and alpha grids (each > 0.1).
    search_step : (int, int), (200, 20)         grid sizes for beta and alpha (each >= 1).
    logit_scale : float > 0, 100.0              CLIP's logit scale of the zero-shot term.
    """

    transductive = False

    def __init__(self, init_beta: float = 1.0, init_alpha: float = 1.17, search_scale=(7.0, 3.0),
                 search_step=(200, 20), logit_scale: float = 100.0):
        self.init_beta = init_beta
        self.init_alpha = init_alpha
        self.search_scale = search_scale
        self.search_step = search_step
        self.logit_scale = logit_scale

    # -- checks and shared pieces -----------------------------------------------------------------------
    _parameter_constraints = {
        "init_beta": [Interval(Real, 0, None, closed="neither")],
        "init_alpha": [Interval(Real, 0, None)],
        "search_scale": [_Pair(Real, 0.1, "neither")],
        "search_step": [_Pair(Integral, 1, "left")],
        "logit_scale": [Interval(Real, 0, None, closed="neither")],
    }

    def _check_params(self) -> None:
        self._validate_params()

    def _search(self, keys: np.ndarray, cache: _Cache, val) -> tuple[float, float, float | None]:
        """(beta, alpha, validation accuracy %) from the authors' grid; the init values without val rows."""
        if val is None:
            return float(self.init_beta), float(self.init_alpha), None
        vx, vy = val
        clip_logits = np.float32(self.logit_scale) * (vx @ self.text_.T)
        affinity = cache.affinity(vx, keys)
        alpha_grid = search_grid(float(self.search_scale[1]), int(self.search_step[1]))
        alphas = alpha_grid.astype(np.float32)
        best = (-1.0, 0.0, 0.0)
        for beta in search_grid(float(self.search_scale[0]), int(self.search_step[0])):
            c = cache.logits(affinity, beta)
            z = clip_logits[None] + alphas[:, None, None] * c[None]          # [n_alpha, Nv, C]
            acc = (np.argmax(z, axis=2) == vy).mean(axis=1) * 100.0
            i = int(np.argmax(acc))                                         # first best alpha of this beta
            if acc[i] > best[0]:                                            # strictly better: earlier wins
                best = (float(acc[i]), float(beta), float(alpha_grid[i]))
        return best[1], best[2], best[0]

    def _finish(self, keys, y, text, val) -> None:
        self.text_ = text
        self.cache_labels_ = y
        cache = _Cache(y, text.shape[0])
        self.beta_, self.alpha_, acc = self._search(keys, cache, val)
        if acc is not None:
            self.val_accuracy_ = acc

    # -- estimator --------------------------------------------------------------------------------------
    def fit(self, X, y=None, *, text=None, val=None, query=None) -> "TipAdapter":
        """Build the cache from support ``X`` [Ns, D] / ``y`` and search beta/alpha on ``val`` = (Xv, yv).

        ``query`` is ignored (an inductive stage)."""
        self._check_params()
        X, y, text, val = check_support(X, y, text, val)
        self.cache_keys_ = X
        self._finish(X, y, text, val)
        return self

    def decision_function(self, X) -> np.ndarray:
        self._check_fitted()
        X = check_features(X, "X", dim=self.text_.shape[1])
        cache = _Cache(np.asarray(self.cache_labels_), self.text_.shape[0])
        z = np.float32(self.logit_scale) * (X @ self.text_.T)
        z += np.float32(self.alpha_) * cache.logits(cache.affinity(X, self.cache_keys_), self.beta_)
        return z


@register_stage("tip-adapter-f")
class TipAdapterF(TipAdapter):
    """Tip-Adapter-F: Tip-Adapter whose cache keys are fine-tuned on the support rows (module docstring).

    Parameters: those of :class:`TipAdapter`, plus
    ----------
    epochs : int >= 1, 20          training epochs (the keys after the last one are kept).
    lr : float > 0, 0.001          AdamW learning rate (cosine-annealed to 0 over all steps).
    batch_size : int >= 1, 256
    eps : float > 0, 1e-4          AdamW epsilon.
    weight_decay : float >= 0, 0.01    AdamW decoupled weight decay (torch's default, which the authors keep).
    random_state : int, 0          seed of the batch shuffling.
    """

    def __init__(self, init_beta: float = 1.0, init_alpha: float = 1.17, search_scale=(7.0, 3.0),
                 search_step=(200, 20), logit_scale: float = 100.0, epochs: int = 20, lr: float = 0.001,
                 batch_size: int = 256, eps: float = 1e-4, weight_decay: float = 0.01, random_state: int = 0):
        super().__init__(init_beta=init_beta, init_alpha=init_alpha, search_scale=search_scale,
                         search_step=search_step, logit_scale=logit_scale)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.eps = eps
        self.weight_decay = weight_decay
        self.random_state = random_state

    _parameter_constraints = {
        **TipAdapter._parameter_constraints,
        "epochs": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None)],
        "eps": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None)],
        "random_state": [Interval(Integral)],
    }

    def fit(self, X, y=None, *, text=None, val=None, query=None) -> "TipAdapterF":
        """Fine-tune the keys on support ``X`` [Ns, D] / ``y``, then search beta/alpha on ``val`` = (Xv, yv).

        ``query`` is ignored (an inductive stage)."""
        self._check_params()
        X, y, text, val = check_support(X, y, text, val)
        self.cache_keys_ = self._train_keys(X, y, text)
        self._finish(self.cache_keys_, y, text, val)
        return self

    def _train_keys(self, X: np.ndarray, y: np.ndarray, text: np.ndarray) -> np.ndarray:
        N, C = X.shape[0], text.shape[0]
        keys = X.copy()
        cache = _Cache(y, C)
        beta, alpha = np.float32(self.init_beta), np.float32(self.init_alpha)
        clip_logits = np.float32(self.logit_scale) * (X @ text.T)      # fixed: the text is not trained
        m = np.zeros_like(keys)
        v = np.zeros_like(keys)
        b1, b2 = 0.9, 0.999
        n_batches = -(-N // int(self.batch_size))
        total = int(self.epochs) * n_batches
        rng = np.random.default_rng(self.random_state)
        step = 0
        for _ in range(int(self.epochs)):
            perm = rng.permutation(N)
            for start in range(0, N, int(self.batch_size)):
                idx = perm[start:start + int(self.batch_size)]
                grad = self._grad(keys, X[idx], y[idx], clip_logits[idx], cache, y, beta, alpha)
                # torch AdamW: decoupled decay, then Adam with bias correction; lr from the cosine schedule
                lr = 0.5 * self.lr * (1.0 + np.cos(np.pi * step / total))
                step += 1
                keys *= np.float32(1.0 - lr * self.weight_decay)
                m *= np.float32(b1)
                m += np.float32(1.0 - b1) * grad
                v *= np.float32(b2)
                v += np.float32(1.0 - b2) * grad * grad
                denom = np.sqrt(v) / np.float32(np.sqrt(1.0 - b2 ** step)) + np.float32(self.eps)
                keys -= np.float32(lr / (1.0 - b1 ** step)) * m / denom
        return keys

    @staticmethod
    def _grad(keys, xb, yb, clip_b, cache: _Cache, labels, beta, alpha) -> np.ndarray:
        """Gradient [Ns, D] of the batch's mean cross-entropy with respect to the keys."""
        A = xb @ keys.T                                       # [B, Ns] affinities
        E = np.exp(beta * (A - 1.0))
        G = softmax(clip_b + alpha * cache.class_sum(E))
        G[np.arange(xb.shape[0]), yb] -= 1.0
        G /= xb.shape[0]                                      # dLoss/dlogits
        dA = (alpha * beta) * G[:, labels] * E                # through alpha * E @ onehot(labels)
        return dA.T @ xb
