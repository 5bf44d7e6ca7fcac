"""Layers shared by the architectures (one file each in this package)."""
from __future__ import annotations

from cascade.runtime import jittor as _jittor

jt = _jittor()
from jittor import nn  # noqa: E402  (after the runtime wiring)

__all__ = ["LayerNorm", "layer_norm_last"]


def layer_norm_last(x, weight, bias, eps: float):
    """LayerNorm over the last axis, two-pass (mean, then mean of squared deviations) like PyTorch."""
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    return xc / jt.sqrt(var + eps) * weight + bias


class LayerNorm(nn.Module):
    """LayerNorm with float32 ``weight`` and ``bias`` of shape [dim] (PyTorch's names, so converted weights load
    as they are) and PyTorch's default eps 1e-5 (CLIP's; ConvNeXt-V2 passes 1e-6).

    ``data_format`` says which axis holds the channels when the module is called on its own:
    ``channels_last`` (the last axis: tokens, NHWC) or ``channels_first`` (axis 1 of NCHW, as in ConvNeXt-V2's
    stem and downsampling layers). :meth:`normalize_last` always normalises the last axis."""

    def __init__(self, dim: int, eps: float = 1e-5, data_format: str = "channels_last"):
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be channels_last or channels_first, not {data_format!r}")
        self.weight = jt.ones((dim,), dtype="float32")
        self.bias = jt.zeros((dim,), dtype="float32")
        self.eps = eps
        self.data_format = data_format

    def normalize_last(self, x):
        return layer_norm_last(x, self.weight, self.bias, self.eps)

    def execute(self, x):
        if self.data_format == "channels_first":
            return self.normalize_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.normalize_last(x)
