"""Model architectures (one file each) and safe weight loading.

Importing this package is cheap: jittor, torch and the tokenizer's vocabulary are loaded only when a function
that needs them is called.
"""
from __future__ import annotations

from .weights import CheckpointError, load_weights, read_checkpoint, save_weights

__all__ = ["load_clip", "tokenize", "load_convnextv2", "CheckpointError", "read_checkpoint", "save_weights",
           "load_weights"]


def load_clip(path, **kwargs):
    """Load a CLIP model (any OpenAI size, ViT or modified ResNet) from converted weights or any checkpoint
    :func:`read_checkpoint` understands. See :func:`cascade.models.clip.load_clip`."""
    from .clip import load_clip as _load_clip

    return _load_clip(path, **kwargs)


def tokenize(texts, context_length: int = 77):
    """OpenAI CLIP token ids, int64 numpy [N, context_length]. See :func:`cascade.models.tokenizer.tokenize`."""
    from .tokenizer import tokenize as _tokenize

    return _tokenize(texts, context_length=context_length)


def load_convnextv2(path, **kwargs):
    """Load a ConvNeXt-V2 model. See :func:`cascade.models.convnextv2.load_convnextv2`."""
    from .convnextv2 import load_convnextv2 as _load

    return _load(path, **kwargs)
