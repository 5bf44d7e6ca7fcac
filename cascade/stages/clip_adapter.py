"""CLIP-Adapter: a residual bottleneck MLP on the image features (Gao et al., arXiv 2110.04544).

Written from the paper and from reading the authors' model code (gaopengcuhk/CLIP-Adapter); nothing is copied.
For an image feature x the adapted feature and the logits are::

    a(x) = ReLU(W2 ReLU(W1 x))                    W1: [D/reduction, D], W2: [D, D/reduction], no biases
    f(x) = ratio * a(x) + (1 - ratio) * x         residual ratio 0.2 (the paper's choice for generic datasets)
    z(x) = logit_scale * (f / ||f||) . T^T        T: the class text embeddings (fixed)

Only W1 and W2 are trained, by cross-entropy on the support rows. The authors publish the model but no trainer
settings beyond pointing to CoOp, so the recipe is CoOp's (its Dassl defaults for ViT-B/32 few-shot training):
SGD with momentum 0.9 and weight decay 5e-4, batches of 32 drawn without replacement (the last incomplete
batch dropped when there are at least 32 rows), one warm-up epoch at a constant 1e-5, then a cosine
learning-rate schedule over ``epochs`` (200) stepped per epoch from the end of the warm-up (Dassl's order:
the warm-up epoch counts among the 200, and the first epoch after it runs at the full rate), and the weights after the LAST epoch (CoOp
evaluates the final model; validation rows are not used). The layers start like torch's ``nn.Linear``
(uniform in +-1/sqrt(fan_in)), from a seeded numpy generator.

``lr`` defaults to CoOp's 0.002, the rate of the recipe the paper points to; 0.01 (the other rate the project's
reference runs used) is no better on the shared tasks on average over seeds (docs/experts.md).
The authors apply the adapter to the unnormalised CLIP feature; here features arrive L2-normalised.
"""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from numbers import Integral, Real

from .base import Interval, Stage, check_features, check_support, register_stage, softmax


@register_stage("clip-adapter")
class CLIPAdapter(Stage):
    """CLIP-Adapter over the classes of ``text`` (see the module docstring).

    Parameters
    ----------
    reduction : int >= 1, 4          bottleneck width: D // reduction (at least 1).
    ratio : float in [0, 1), 0.2     residual ratio: weight of the adapted feature (1 would leave only the
                                     adapter's ReLU output, which can be all zero: no direction to score).
    epochs : int >= 1, 200
    lr : float > 0, 0.002            peak SGD learning rate (CoOp's; see the module docstring).
    batch_size : int >= 1, 32
    momentum : float in [0, 1), 0.9
    weight_decay : float >= 0, 5e-4
    warmup_epochs : int >= 0, 1      epochs at the constant ``warmup_lr`` before the cosine schedule.
    warmup_lr : float > 0, 1e-5
    logit_scale : float > 0, 100.0   CLIP's logit scale.
    random_state : int, 0            seed of the initial weights and of the batch order.
    """

    transductive = False

    def __init__(self, reduction: int = 4, ratio: float = 0.2, epochs: int = 200, lr: float = 0.002,
                 batch_size: int = 32, momentum: float = 0.9, weight_decay: float = 5e-4, warmup_epochs: int = 1,
                 warmup_lr: float = 1e-5, logit_scale: float = 100.0, random_state: int = 0):
        self.reduction = reduction
        self.ratio = ratio
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_epochs = warmup_epochs
        self.warmup_lr = warmup_lr
        self.logit_scale = logit_scale
        self.random_state = random_state

    _parameter_constraints = {
        "reduction": [Interval(Integral, 1, None)],
        "ratio": [Interval(Real, 0, 1, closed="left")],
        "epochs": [Interval(Integral, 1, None)],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None)],
        "momentum": [Interval(Real, 0, 1, closed="left")],
        "weight_decay": [Interval(Real, 0, None)],
        "warmup_epochs": [Interval(Integral, 0, None)],
        "warmup_lr": [Interval(Real, 0, None, closed="neither")],
        "logit_scale": [Interval(Real, 0, None, closed="neither")],
        "random_state": [Interval(Integral)],
    }

    def _lr(self, epoch: int) -> float:
        """Learning rate of an epoch, as Dassl's warm-up wrapper steps it: ``warmup_lr`` for the first
        ``warmup_epochs`` epochs, then the cosine schedule over ``epochs`` from its start (the cosine scheduler is
        stepped only once the warm-up is over, so epoch ``warmup_epochs`` trains at the full ``lr``)."""
        if epoch < self.warmup_epochs:
            return float(self.warmup_lr)
        step = epoch - int(self.warmup_epochs)
        return 0.5 * float(self.lr) * (1.0 + np.cos(np.pi * step / self.epochs))

    def fit(self, X, y=None, *, text=None, val=None, query=None) -> "CLIPAdapter":
        """Train the adapter on support ``X`` [Ns, D] / ``y`` against ``text`` [C, D].

        ``val`` and ``query`` are accepted and ignored (the last epoch is kept; an inductive stage)."""
        self._validate_params()
        X, y, text, _ = check_support(X, y, text)
        N, D = X.shape
        H = max(1, D // int(self.reduction))
        rng = np.random.default_rng(self.random_state)
        W1 = rng.uniform(-1.0, 1.0, (H, D)).astype(np.float32) / np.float32(np.sqrt(D))
        W2 = rng.uniform(-1.0, 1.0, (D, H)).astype(np.float32) / np.float32(np.sqrt(H))
        params = [W1, W2]
        bufs = [np.zeros_like(W1), np.zeros_like(W2)]
        T = np.float32(self.logit_scale) * text                      # scaled once
        with threadpool_limits(limits=1, user_api="blas"):   # thousands of small products: threads only cost
            self._train(X, y, T, params, bufs, rng)
        self.W1_, self.W2_ = W1, W2
        self.text_ = text
        return self

    def _train(self, X, y, T, params, bufs, rng) -> None:
        W1, W2 = params
        N, B = X.shape[0], int(self.batch_size)
        drop_last = N >= B
        mom, wd = np.float32(self.momentum), np.float32(self.weight_decay)
        first = True
        for epoch in range(int(self.epochs)):
            lr = np.float32(self._lr(epoch))
            perm = rng.permutation(N)
            stop = (N // B) * B if drop_last else N
            for start in range(0, stop, B):
                idx = perm[start:start + B]
                grads = self._grads(X[idx], y[idx], W1, W2, T)
                for p, g, buf in zip(params, grads, bufs):   # torch SGD: g += wd p; buf = m buf + g; p -= lr buf
                    g += wd * p
                    if first:
                        buf[...] = g
                    else:
                        buf *= mom
                        buf += g
                    p -= lr * buf
                first = False

    def _grads(self, xb, yb, W1, W2, T):
        """Gradients of the mean cross-entropy of one batch with respect to W1 and W2."""
        r = np.float32(self.ratio)
        h = xb @ W1.T
        np.maximum(h, 0, out=h)
        a = h @ W2.T
        np.maximum(a, 0, out=a)
        f = r * a + (np.float32(1.0) - r) * xb
        norm = np.sqrt(np.einsum("ij,ij->i", f, f))[:, None]
        u = f / norm
        G = softmax(u @ T.T)
        G[np.arange(xb.shape[0]), yb] -= 1.0
        G *= np.float32(1.0 / xb.shape[0])
        du = G @ T
        df = (du - u * np.einsum("ij,ij->i", u, du)[:, None]) / norm      # through f / ||f||
        da = r * df * (a > 0)
        dW2 = da.T @ h
        dh = (da @ W2) * (h > 0)
        dW1 = dh.T @ xb
        return dW1, dW2

    def transform(self, X) -> np.ndarray:
        """The adapted, L2-normalised image features [N, D]."""
        self._check_fitted()
        X = check_features(X, "X", dim=self.text_.shape[1])
        r = np.float32(self.ratio)
        a = np.maximum(np.maximum(X @ self.W1_.T, 0) @ self.W2_.T, 0)
        f = r * a + (np.float32(1.0) - r) * X
        return f / np.sqrt(np.einsum("ij,ij->i", f, f))[:, None]

    def decision_function(self, X) -> np.ndarray:
        return np.float32(self.logit_scale) * (self.transform(X) @ self.text_.T)
