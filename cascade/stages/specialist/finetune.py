"""Fine-tuning a ConvNeXt-V2 for one domain's classes (the specialist's optional ``finetune`` modes).

AdamW, linear warm-up over the first epoch, then cosine decay to zero (the learning rate only goes down after
warm-up), cross-entropy with label smoothing, training views from
:meth:`cascade.preprocess.Preprocess.train_view`. Jittor is imported when a function runs, not with the
module: the frozen-backbone specialist never needs it.
"""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from ...data import load_image
from ...preprocess import DEFAULT_PRESET, preprocess_for
from ...runtime import jittor as _jittor

__all__ = ["finetune_backbone", "load_images", "restore_state", "encode_views", "state_arrays"]


def load_images(images) -> list:
    """PIL images or paths -> RGB PIL images (files decoded by :func:`cascade.data.load_image`)."""
    return [im.convert("RGB") if hasattr(im, "convert") else load_image(im) for im in images]


def state_arrays(model) -> dict[str, np.ndarray]:
    """A model's weights as float32 numpy arrays (a copy)."""
    return {k: np.array(v.numpy(), dtype=np.float32) for k, v in model.state_dict().items()}


def restore_state(model, state: dict[str, np.ndarray]) -> None:
    """Load ``state`` (from :func:`state_arrays`) back into ``model`` in place."""
    jt = _jittor()
    for k, p in model.state_dict().items():
        p.assign(jt.array(state[k]))


def encode_views(model, pil_views, preset, batch_size: int = 32) -> np.ndarray:
    """``model.encode_image`` of PIL views, float64 [N, D]."""
    p = preprocess_for(preset)
    model.eval()
    out = []
    for i in range(0, len(pil_views), batch_size):
        x = np.stack([p.to_array(v) for v in pil_views[i:i + batch_size]])
        out.append(np.asarray(model.encode_image(x).numpy(), dtype=np.float64))
    return np.concatenate(out) if out else np.zeros((0, model.num_features))


def finetune_backbone(model, images, y_local, n_classes: int, mode: str = "last_stage", epochs: int = 15,
                      lr: float = 1e-4, weight_decay: float = 0.05, batch_size: int = 32,
                      label_smoothing: float = 0.1, preset=DEFAULT_PRESET, seed: int = 0,
                      progress: bool = True):
    """Fine-tune a ConvNeXt-V2 in place on (PIL images, local labels 0..n_classes-1) with a new linear head.

    mode "last_stage": the last stage, the final norm and the head train; earlier stages run without
    gradients. mode "all": everything trains. The head reads the L2-normalised feature times sqrt(D) (so it
    applies to the feature cache's normalised features); it is returned as (W [K, D] with that scale folded
    in, b [K]) numpy arrays: logits = l2(feature) @ W.T + b."""
    jt = _jittor()
    from jittor import nn  # lazy: Jittor is imported (and configured) only when fine-tuning runs

    rng = np.random.default_rng(seed)
    jt.set_global_seed(seed)
    p = preprocess_for(preset)
    D = model.num_features
    feat_scale = float(np.sqrt(D))
    head = nn.Linear(D, n_classes)
    head.weight.assign(jt.init.trunc_normal_(jt.zeros((n_classes, D)), std=0.02))
    head.bias.assign(jt.zeros((n_classes,)))
    last = len(model.stages) - 1
    if mode == "all":
        params = list(model.parameters())
    elif mode == "last_stage":
        params = list(model.stages[last].parameters()) + list(model.downsample_layers[last].parameters()) + \
            list(model.norm.parameters())
    else:
        raise ValueError(f"mode must be 'last_stage' or 'all', not {mode!r}")
    params += list(head.parameters())
    opt = jt.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    y_local = np.asarray(y_local)
    n = len(images)
    steps_per_epoch = max(1, -(-n // batch_size))
    total = epochs * steps_per_epoch
    warm = steps_per_epoch
    step = 0
    bar = tqdm(total=total, desc=f"fine-tune ({mode})", unit="step", disable=not progress)
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            if len(idx) == 0:
                continue
            x = jt.array(np.stack([p.to_array(p.train_view(images[i], rng)) for i in idx]))
            t = y_local[idx]
            opt.lr = lr * (step + 1) / warm if step < warm else \
                0.5 * lr * (1 + np.cos(np.pi * (step - warm) / max(1, total - warm)))
            model.train()
            if mode == "last_stage":
                with jt.no_grad():
                    h = model.forward_stages(x, 0, last).stop_grad()
                h = model.forward_stages(h, last, last + 1)
                feat = model.norm.normalize_last(h.mean(dims=(1, 2)))
            else:
                feat = model.forward_features(x)
            feat = feat / jt.sqrt((feat * feat).sum(dim=1, keepdims=True) + 1e-12) * feat_scale
            logits = head(feat)
            logp = logits - logits.max(dim=1, keepdims=True).stop_grad()
            logp = logp - jt.log(jt.exp(logp).sum(dim=1, keepdims=True))
            onehot = np.full((len(idx), n_classes), label_smoothing / n_classes, dtype=np.float32)
            onehot[np.arange(len(idx)), t] += 1.0 - label_smoothing
            loss = -(logp * jt.array(onehot)).sum(dim=1).mean()
            opt.step(loss)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.item()):.3f}")
    bar.close()
    model.eval()
    return head.weight.numpy() * feat_scale, head.bias.numpy().copy()
