"""Model architectures (one file each) and safe weight loading.

Importing this package is cheap: the architecture modules import Jittor (several seconds, and it must be configured
first by :func:`cascade.runtime.jittor`), so :func:`load_clip` and :func:`load_convnextv2` import them when called;
torch is imported only to read PyTorch checkpoints; the tokenizer's vocabulary is read on first use.
"""
from __future__ import annotations

from .tokenizer import tokenize
from .weights import CheckpointError, load_weights, read_checkpoint, save_weights

__all__ = ["load_clip", "tokenize", "load_convnextv2", "CheckpointError", "read_checkpoint", "save_weights",
           "load_weights"]


def load_clip(path, **kwargs):
    """Load a CLIP model (any OpenAI size, ViT or modified ResNet) from converted weights or any checkpoint
    :func:`read_checkpoint` understands. See :func:`cascade.models.clip.load_clip`."""
    from .clip import load_clip as _load_clip

    return _load_clip(path, **kwargs)


def load_convnextv2(path, **kwargs):
    """Load a ConvNeXt-V2 model. See :func:`cascade.models.convnextv2.load_convnextv2`."""
    from .convnextv2 import load_convnextv2 as _load

    return _load(path, **kwargs)
