"""OpenAI CLIP in Jittor: the vision transformer and modified-ResNet image towers and the text transformer.

Parameters carry OpenAI's names (``visual.transformer.resblocks.0.attn.in_proj_weight``, ``visual.layer1.0.bn1
.running_mean``, ``token_embedding.weight``, ...) and every size is read from the weights' shapes
(:func:`config_from_state`), so RN50/RN101/ViT-B/32/ViT-B/16/ViT-L/14 checkpoints all load. Semantics follow
OpenAI's ``clip/model.py``: QuickGELU MLPs, pre-norm residual attention blocks, a class token with
``ln_pre``/``ln_post`` and a projection for ViT, a three-convolution stem, anti-aliased (average-pool) strides and
attention pooling for the ResNet, a causal text transformer read at the end-of-text token. Computation is fp32.

For inference :func:`load_clip` folds each BatchNorm into the convolution before it (same function, fewer
passes over memory); ``CLIP.load_state(state)`` with ``fuse=False`` keeps them separate.
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from cascade.runtime import jittor as _jittor
from cascade.models.weights import CheckpointError, load_weights, read_checkpoint

jt = _jittor()
from jittor import nn  # noqa: E402  (after the runtime set-up)

from .layers import LayerNorm  # noqa: E402

__all__ = ["CLIP", "VisionTransformer", "ModifiedResNet", "Transformer", "config_from_state",
           "map_openai_keys", "load_clip", "convert_state_dict", "is_clip_state"]

# keys OpenAI's TorchScript archives carry besides parameters (plain ints stored as tensors)
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


# ------------------------------------------------------------------------------------------------ building blocks
class Linear(nn.Module):
    """y = x W^T + b with torch's parameter layout (weight [out, in])."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        self.weight = jt.zeros((out_features, in_features))
        self.bias = jt.zeros((out_features,)) if bias else None

    def execute(self, x):
        y = nn.matmul_transpose(x, self.weight)
        return y if self.bias is None else y + self.bias


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation CLIP was trained with."""

    def execute(self, x):
        return x * jt.sigmoid(1.702 * x)


def onednn_conv_available() -> bool:
    """True on CPU when Jittor has its oneDNN ops: then the ResNet runs channels-last (NHWC), where oneDNN's
    convolutions are about twice as fast here and 1x1 convolutions are plain matrix products."""
    return not jt.flags.use_cuda and getattr(jt, "mkl_ops", None) is not None


class BatchNorm2d(nn.Module):
    """Inference BatchNorm with torch's parameter names; :meth:`Conv2d.fold` merges it into a convolution."""

    def __init__(self, channels: int, eps: float = 1e-5):
        self.weight = jt.ones((channels,))
        self.bias = jt.zeros((channels,))
        self.running_mean = jt.zeros((channels,))
        self.running_var = jt.ones((channels,))
        self.eps = eps

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        scale = self.weight.numpy() / np.sqrt(self.running_var.numpy() + self.eps)
        return scale, self.bias.numpy() - self.running_mean.numpy() * scale

    def execute(self, x, nhwc: bool = False):
        shape = (1, 1, 1, -1) if nhwc else (1, -1, 1, 1)
        scale = self.weight / jt.sqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(shape) + shift.reshape(shape)


class Conv2d(nn.Module):
    """2-D convolution with torch's parameter names; ``bias`` appears only once a BatchNorm has been folded in.
    ``execute(x, nhwc=True)`` takes and returns channels-last tensors (oneDNN on CPU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0):
        self.weight = jt.zeros((out_channels, in_channels, kernel_size, kernel_size))
        self.bias = None
        self.stride, self.padding = stride, padding
        self._hwio = None  # weight as [kh, kw, in, out] for the channels-last path (not a parameter)

    def reset_cache(self) -> None:
        self._hwio = None

    def execute(self, x, nhwc: bool = False):
        s, p = self.stride, self.padding
        if nhwc:
            if self._hwio is None:
                self._hwio = jt.array(np.ascontiguousarray(self.weight.numpy().transpose(2, 3, 1, 0)))
            y = jt.mkl_ops.mkl_conv(x, self._hwio, s, s, p, p, 1, 1, 1, "acdb", "hwio", "acdb")
            return y if self.bias is None else y + self.bias
        y = nn.conv2d(x, self.weight, None, stride=s, padding=p)
        return y if self.bias is None else y + self.bias.reshape((1, -1, 1, 1))

    def fold(self, bn: BatchNorm2d) -> None:
        """Absorb the following BatchNorm: w' = w * s, b' = beta - mean * s with s = gamma / sqrt(var + eps)."""
        scale, shift = bn.scale_shift()
        w = self.weight.numpy().astype(np.float64) * scale.astype(np.float64)[:, None, None, None]
        self.weight = jt.array(w.astype(np.float32))
        self.bias = jt.array(shift.astype(np.float32))
        self._hwio = None


def avg_pool(x, k: int, nhwc: bool = False):
    """Average pooling with kernel = stride = k and no padding (torch's AvgPool2d(k)); rows/cols that do not
    fill a window are dropped, as torch does."""
    if k == 1:
        return x
    if nhwc:
        n, h, w, c = x.shape
    else:
        n, c, h, w = x.shape
    hh, ww = h // k, w // k
    if nhwc:
        if hh * k != h or ww * k != w:
            x = x[:, :hh * k, :ww * k, :]
        return x.reshape((n, hh, k, ww, k, c)).mean((2, 4))
    if hh * k != h or ww * k != w:
        x = x[:, :, :hh * k, :ww * k]
    return x.reshape((n, c, hh, k, ww, k)).mean((3, 5))


def attention(q, k, v, mask=None, scale=None):
    """Scaled dot-product attention on [N, heads, L, head_dim]; ``mask`` is added to the scores. ``scale``
    defaults to head_dim^-0.5 (pass 1.0 when the queries are already scaled)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = nn.matmul(q if scale == 1.0 else q * scale, k.transpose(0, 1, 3, 2))
    if mask is not None:
        scores = scores + mask
    return nn.matmul(nn.softmax(scores, dim=-1), v)


def split_heads(x, heads: int):
    n, length, width = x.shape
    return x.reshape((n, length, heads, width // heads)).transpose(0, 2, 1, 3)


def merge_heads(x):
    n, heads, length, hd = x.shape
    return x.transpose(0, 2, 1, 3).reshape((n, length, heads * hd))


# ------------------------------------------------------------------------------------------------ transformer
class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters (packed in_proj, out_proj) on batch-first input [N, L, D].

    For speed, the packed projection is split once into query/key/value weights (the query pre-scaled by
    head_dim^-0.5, exact for power-of-two head sizes) kept outside the parameters."""

    def __init__(self, width: int, heads: int):
        self.in_proj_weight = jt.zeros((3 * width, width))
        self.in_proj_bias = jt.zeros((3 * width,))
        self.out_proj = Linear(width, width)
        self.heads = heads
        self._qkv = None

    def reset_cache(self) -> None:
        self._qkv = None

    def _projections(self):
        if self._qkv is None:
            w, b = self.in_proj_weight.numpy(), self.in_proj_bias.numpy()
            width = w.shape[1]
            scale = np.float32((width // self.heads) ** -0.5)
            parts = []
            for i in range(3):
                wi, bi = w[i * width:(i + 1) * width], b[i * width:(i + 1) * width]
                if i == 0:
                    wi, bi = wi * scale, bi * scale
                parts.append((jt.array(np.ascontiguousarray(wi)), jt.array(np.ascontiguousarray(bi))))
            self._qkv = parts
        return self._qkv

    def execute(self, x, mask=None):
        (wq, bq), (wk, bk), (wv, bv) = self._projections()
        q = split_heads(nn.matmul_transpose(x, wq) + bq, self.heads)
        k = split_heads(nn.matmul_transpose(x, wk) + bk, self.heads)
        v = split_heads(nn.matmul_transpose(x, wv) + bv, self.heads)
        return self.out_proj(merge_heads(attention(q, k, v, mask, scale=1.0)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", Linear(width * 4, width))]))
        self.ln_2 = LayerNorm(width)

    def execute(self, x, mask=None):
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        self.width, self.layers = width, layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def execute(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


# ------------------------------------------------------------------------------------------------ image towers
class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int,
                 output_dim: int):
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = Conv2d(3, width, patch_size, stride=patch_size)
        grid = input_resolution // patch_size
        self.class_embedding = jt.zeros((width,))
        self.positional_embedding = jt.zeros((grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = jt.zeros((width, output_dim))

    def execute(self, x):
        w = self.conv1.weight
        width, _, p, _ = w.shape
        n, c, h, wd = x.shape
        gh, gw = h // p, wd // p
        # non-overlapping patches: the stride-p convolution is one matrix product
        patches = x.reshape((n, c, gh, p, gw, p)).transpose(0, 2, 4, 1, 3, 5).reshape((n * gh * gw, c * p * p))
        x = nn.matmul_transpose(patches, w.reshape((width, c * p * p))).reshape((n, gh * gw, width))
        cls = self.class_embedding.reshape((1, 1, width)).broadcast((n, 1, width))
        x = jt.concat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return nn.matmul(self.ln_post(x[:, 0, :]), self.proj)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        self.conv1 = Conv2d(inplanes, planes, 1)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = Conv2d(planes, planes, 3, padding=1)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = Conv2d(planes, planes * self.expansion, 1)
        self.bn3 = BatchNorm2d(planes * self.expansion)
        self.stride = stride
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # OpenAI's names: "-1" is the (parameter-free) average pool, "0" the conv, "1" its BatchNorm
            self.downsample = nn.Sequential(OrderedDict([
                ("0", Conv2d(inplanes, planes * self.expansion, 1)), ("1", BatchNorm2d(planes * self.expansion))]))

    def fold_batchnorm(self) -> None:
        for conv, name in ((self.conv1, "bn1"), (self.conv2, "bn2"), (self.conv3, "bn3")):
            conv.fold(getattr(self, name))
            setattr(self, name, None)
        if self.downsample is not None:
            conv, bn = self.downsample[0], self.downsample[1]
            conv.fold(bn)
            self.downsample = nn.Sequential(OrderedDict([("0", conv)]))

    @staticmethod
    def _bn(bn, x, nhwc):
        return x if bn is None else bn(x, nhwc)

    def execute(self, x, nhwc: bool = False):
        bn = self._bn
        out = nn.relu(bn(self.bn1, self.conv1(x, nhwc), nhwc))
        out = nn.relu(bn(self.bn2, self.conv2(out, nhwc), nhwc))
        out = bn(self.bn3, self.conv3(avg_pool(out, self.stride, nhwc), nhwc), nhwc)
        identity = x
        if self.downsample is not None:
            identity = avg_pool(x, self.stride, nhwc)
            for layer in self.downsample:
                identity = layer(identity, nhwc)
        return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean feature (plus position) queries all positions with one multi-head attention."""

    def __init__(self, spacial_dim: int, embed_dim: int, heads: int, output_dim: int):
        self.positional_embedding = jt.zeros((spacial_dim ** 2 + 1, embed_dim))
        self.k_proj = Linear(embed_dim, embed_dim)
        self.q_proj = Linear(embed_dim, embed_dim)
        self.v_proj = Linear(embed_dim, embed_dim)
        self.c_proj = Linear(embed_dim, output_dim)
        self.heads = heads

    def execute(self, x, nhwc: bool = False):
        if nhwc:
            n, h, w, c = x.shape
            x = x.reshape((n, h * w, c))
        else:
            n, c, h, w = x.shape
            x = x.reshape((n, c, h * w)).transpose(0, 2, 1)  # [N, HW, C]
        x = jt.concat([x.mean(1, keepdims=True), x], dim=1) + self.positional_embedding
        q = split_heads(self.q_proj(x[:, :1, :]), self.heads)
        k = split_heads(self.k_proj(x), self.heads)
        v = split_heads(self.v_proj(x), self.heads)
        out = merge_heads(attention(q, k, v))  # [N, 1, C]
        return self.c_proj(out[:, 0, :])


class ModifiedResNet(nn.Module):
    """OpenAI's ResNet: 3-conv stem with average pool, anti-aliased strided blocks, attention pooling."""

    def __init__(self, layers, output_dim: int, heads: int, input_resolution: int = 224, width: int = 64):
        self.input_resolution, self.output_dim = input_resolution, output_dim
        self.conv1 = Conv2d(3, width // 2, 3, stride=2, padding=1)
        self.bn1 = BatchNorm2d(width // 2)
        self.conv2 = Conv2d(width // 2, width // 2, 3, padding=1)
        self.bn2 = BatchNorm2d(width // 2)
        self.conv3 = Conv2d(width // 2, width, 3, padding=1)
        self.bn3 = BatchNorm2d(width)
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = [Bottleneck(inplanes, planes, 1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)
        self.channels_last = None  # None: channels-last when oneDNN convolutions are available (CPU)

    def stages(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def fold_batchnorm(self) -> None:
        for conv, name in ((self.conv1, "bn1"), (self.conv2, "bn2"), (self.conv3, "bn3")):
            conv.fold(getattr(self, name))
            setattr(self, name, None)
        for stage in self.stages():
            for block in stage:
                block.fold_batchnorm()

    def execute(self, x):
        nhwc = onednn_conv_available() if self.channels_last is None else self.channels_last
        if nhwc:
            x = x.transpose(0, 2, 3, 1)
        bn = Bottleneck._bn
        x = nn.relu(bn(self.bn1, self.conv1(x, nhwc), nhwc))
        x = nn.relu(bn(self.bn2, self.conv2(x, nhwc), nhwc))
        x = nn.relu(bn(self.bn3, self.conv3(x, nhwc), nhwc))
        x = avg_pool(x, 2, nhwc)
        for stage in self.stages():
            for block in stage:
                x = block(x, nhwc)
        return self.attnpool(x, nhwc)


# ------------------------------------------------------------------------------------------------ the model
def _causal_mask(length: int):
    mask = np.triu(np.full((length, length), -np.inf, dtype=np.float32), 1)
    return jt.array(mask)


class CLIP(nn.Module):
    """CLIP with OpenAI's parameter names. Build it with :meth:`from_config` / :func:`config_from_state`."""

    def __init__(self, embed_dim: int, image_resolution: int, vision_layers, vision_width: int,
                 vision_patch_size: int | None, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int):
        self.config = dict(embed_dim=embed_dim, image_resolution=image_resolution,
                           vision_layers=vision_layers, vision_width=vision_width,
                           vision_patch_size=vision_patch_size, context_length=context_length,
                           vocab_size=vocab_size, transformer_width=transformer_width,
                           transformer_heads=transformer_heads, transformer_layers=transformer_layers)
        self.embed_dim = embed_dim
        self.input_resolution = image_resolution
        self.context_length = context_length
        if isinstance(vision_layers, (list, tuple)):
            self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_resolution,
                                         vision_width)
        else:
            self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                            vision_width // 64, embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = jt.zeros((context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = jt.zeros((transformer_width, embed_dim))
        self.logit_scale = jt.array(np.float32(math.log(1 / 0.07)))
        self._masks: dict[int, object] = {}
        self.bn_folded = False
        self.source = None

    @classmethod
    def from_config(cls, config: dict) -> "CLIP":
        cfg = dict(config)
        if isinstance(cfg.get("vision_layers"), list):
            cfg["vision_layers"] = tuple(cfg["vision_layers"])
        return cls(**cfg)

    # -------------------------------------------------------------------------------------------- weights
    def parameter_shapes(self) -> dict[str, tuple]:
        """Expected shape of every parameter (logit_scale is a scalar, as in OpenAI's checkpoints)."""
        shapes = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        shapes["logit_scale"] = ()
        return shapes

    def load_state(self, state: dict[str, np.ndarray], fuse: bool = True, source: str | os.PathLike = "weights"):
        """Copy ``state`` (OpenAI names, already mapped) into the model, exactly: missing, unexpected or
        mis-shaped keys raise :class:`CheckpointError` listing them. ``fuse`` folds BatchNorms for inference."""
        if self.bn_folded:
            raise RuntimeError("load_state must be called before BatchNorm folding")
        own = self.state_dict()
        _check_keys(state, self.parameter_shapes(), self.config, source)
        for key, var in own.items():
            var.assign(jt.array(np.asarray(state[key], dtype=np.float32).reshape(var.shape)))
        for module in self.modules():
            if hasattr(module, "reset_cache"):
                module.reset_cache()
        if fuse and isinstance(self.visual, ModifiedResNet):
            self.visual.fold_batchnorm()
            self.bn_folded = True
        self.eval()
        self.source = str(source)
        return self

    # -------------------------------------------------------------------------------------------- encoders
    def encode_image(self, image):
        """Image embeddings (unnormalised) of normalised images [N, 3, R, R] (numpy float32 or jt.Var)."""
        x = image if isinstance(image, jt.Var) else jt.array(np.ascontiguousarray(image, dtype=np.float32))
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encode_image expects [N, 3, H, W] images, got shape {tuple(x.shape)}")
        r = self.input_resolution
        if tuple(x.shape[2:]) != (r, r):
            raise ValueError(f"this CLIP takes {r}x{r} images, got {x.shape[2]}x{x.shape[3]}")
        if x.shape[0] == 0:
            return jt.zeros((0, self.embed_dim))
        with jt.no_grad():
            return self.visual(x.float32())

    def _mask(self, length: int):
        if length not in self._masks:
            self._masks[length] = _causal_mask(length)
        return self._masks[length]

    def encode_text(self, tokens):
        """Text embeddings (unnormalised) of token ids [N, L] (from :func:`cascade.models.tokenize`), read at
        each row's end-of-text token (the largest id). Thanks to the causal mask, positions after the last
        end token of the batch cannot change the result, so they are not computed."""
        ids = tokens.numpy() if isinstance(tokens, jt.Var) else np.asarray(tokens)
        if ids.ndim != 2:
            raise ValueError(f"encode_text expects token ids [N, L], got shape {ids.shape}")
        if ids.shape[1] > self.context_length:
            raise ValueError(f"{ids.shape[1]} tokens per text exceed the context length {self.context_length}")
        n = ids.shape[0]
        if n == 0:
            return jt.zeros((0, self.embed_dim))
        eot = ids.argmax(axis=-1)
        # compute only up to the last end token, rounded up to a multiple of 16 to reuse compiled kernels
        length = min(ids.shape[1], int(math.ceil((int(eot.max(initial=0)) + 1) / 16) * 16))
        ids = ids[:, :length].astype(np.int32)
        with jt.no_grad():
            x = self.token_embedding(jt.array(ids)) + self.positional_embedding[:length]
            x = self.transformer(x, self._mask(length))
            width = x.shape[-1]
            flat = x.reshape((n * length, width))
            rows = jt.array((np.arange(n) * length + eot).astype(np.int32))
            x = self.ln_final(flat[rows])  # LayerNorm is per position: normalise only the rows we read
            return nn.matmul(x, self.text_projection)

    def execute(self, image, tokens):
        """Logits per image and per text, as OpenAI's forward."""
        img = self.encode_image(image)
        txt = self.encode_text(tokens)
        img = img / jt.sqrt((img * img).sum(-1, keepdims=True))
        txt = txt / jt.sqrt((txt * txt).sum(-1, keepdims=True))
        logits = self.logit_scale.exp() * nn.matmul(img, txt.transpose(1, 0))
        return logits, logits.transpose(1, 0)


def _listing(items, limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------------ weights
def map_openai_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map a CLIP state dict with foreign names onto OpenAI's names: strips wrapper prefixes (``module.``,
    ``model.``, ``clip.``), drops torch's BatchNorm counters (``num_batches_tracked``) and the plain-integer
    entries OpenAI's TorchScript archives carry (``input_resolution``, ``context_length``, ``vocab_size``)."""
    out = {}
    for key, value in state.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in ("module.", "model.", "clip."):
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if name in _OPENAI_EXTRA_KEYS or name.endswith("num_batches_tracked"):
            continue
        out[name] = value
    return out


def missing_clip_keys(state) -> list[str]:
    """The keys every CLIP model has (OpenAI's names) that the (mapped) ``state`` lacks."""
    keys = set(state)
    out = [k for k in ("token_embedding.weight", "text_projection", "ln_final.weight") if k not in keys]
    if "visual.proj" not in keys and "visual.attnpool.positional_embedding" not in keys:
        out.append("visual.proj (ViT) or visual.attnpool.positional_embedding (ResNet)")
    return out


def is_clip_state(state) -> bool:
    """True when the (mapped) keys look like a CLIP model."""
    return not missing_clip_keys(state)


def _count(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def config_from_state(state: dict[str, np.ndarray], source: str | os.PathLike = "weights") -> dict:
    """Every size of the model, read from the weights' shapes and key names (as OpenAI's build_model)."""
    try:
        keys = list(state)
        if "visual.proj" in state:  # vision transformer
            conv = state["visual.conv1.weight"]
            vision_width, vision_patch_size = int(conv.shape[0]), int(conv.shape[-1])
            vision_layers = _count(keys, r"visual\.transformer\.resblocks\.(\d+)\.")
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            image_resolution = vision_patch_size * grid
        else:  # modified ResNet
            vision_layers = [_count(keys, rf"visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4)]
            vision_width = int(state["visual.layer1.0.conv1.weight"].shape[0])
            vision_patch_size = None
            positions = state["visual.attnpool.positional_embedding"].shape[0]
            grid = round((positions - 1) ** 0.5)
            if grid * grid + 1 != positions:
                raise CheckpointError(f"visual.attnpool.positional_embedding has {positions} rows, not a square "
                                      "grid plus one", source)
            image_resolution = grid * 32
        transformer_width = int(state["ln_final.weight"].shape[0])
        return dict(
            embed_dim=int(state["text_projection"].shape[1]),
            image_resolution=int(image_resolution),
            vision_layers=vision_layers,
            vision_width=vision_width,
            vision_patch_size=vision_patch_size,
            context_length=int(state["positional_embedding"].shape[0]),
            vocab_size=int(state["token_embedding.weight"].shape[0]),
            transformer_width=transformer_width,
            transformer_heads=transformer_width // 64,
            transformer_layers=_count(keys, r"transformer\.resblocks\.(\d+)\."),
        )
    except KeyError as exc:
        raise CheckpointError(f"not a CLIP checkpoint: missing key {exc.args[0]!r}", source) from None
    except (IndexError, AttributeError) as exc:
        raise CheckpointError(f"not a CLIP checkpoint: unexpected shapes ({exc})", source) from None


def describe_config(cfg: dict) -> str:
    if isinstance(cfg["vision_layers"], (list, tuple)):
        vision = f"ResNet layers={list(cfg['vision_layers'])} width={cfg['vision_width']}"
    else:
        vision = f"ViT patch={cfg['vision_patch_size']} width={cfg['vision_width']} layers={cfg['vision_layers']}"
    return f"({vision}, resolution {cfg['image_resolution']}, embed {cfg['embed_dim']})"


def arch_name(cfg: dict) -> str:
    """OpenAI's model name for a config when it is one of theirs (e.g. 'ViT-B/32', 'RN101'), else a description."""
    layers = cfg["vision_layers"]
    if isinstance(layers, (list, tuple)):
        known = {(3, 4, 6, 3): "RN50", (3, 4, 23, 3): "RN101", (4, 6, 10, 6): "RN50x4", (6, 8, 18, 8): "RN50x16",
                 (3, 15, 36, 10): "RN50x64"}
        return known.get(tuple(layers), f"RN{list(layers)}")
    size = {768: "B", 1024: "L"}.get(cfg["vision_width"], f"w{cfg['vision_width']}")
    name = f"ViT-{size}/{cfg['vision_patch_size']}"
    return name if cfg["image_resolution"] == 224 else f"{name}@{cfg['image_resolution']}px"


def convert_state_dict(state: dict[str, np.ndarray], source: str | os.PathLike = "weights"):
    """Foreign CLIP state dict -> (OpenAI-named fp32 state, meta with arch and config). Checks that the state
    fits the inferred model exactly (missing/unexpected keys are listed)."""
    mapped = map_openai_keys(state)
    missing = missing_clip_keys(mapped)
    if len(missing) == 4:
        raise CheckpointError("not a CLIP checkpoint (no token_embedding/text_projection/ln_final/visual keys)", source)
    if missing:             # most of a CLIP: name what it lacks
        raise CheckpointError(f"incomplete CLIP checkpoint: missing key(s) {', '.join(missing)}", source)
    cfg = config_from_state(mapped, source)
    model_shapes = CLIP.from_config(cfg).parameter_shapes()
    _check_keys(mapped, model_shapes, cfg, source)
    fp32 = {k: np.asarray(v, dtype=np.float32) for k, v in mapped.items()}
    return fp32, {"arch": "clip", "model": arch_name(cfg), "config": _jsonable(cfg)}


def _check_keys(state, shapes, cfg, source):
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = [f"{k} {tuple(np.shape(state[k]))} != {shapes[k]}" for k in shapes
             if k in state and not _same_shape(np.shape(state[k]), shapes[k])]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {_listing(wrong)}")
    if problems:
        raise CheckpointError("does not fit CLIP " + describe_config(cfg) + ": " + "; ".join(problems), source)


def _same_shape(a, b) -> bool:
    a, b = tuple(a), tuple(b)
    return a == b or (a in ((), (1,)) and b in ((), (1,)))  # Jittor has no 0-d arrays: a scalar is [1]


def _jsonable(cfg: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}


def load_clip(path: str | os.PathLike, fuse: bool = True) -> CLIP:
    """Load CLIP from converted weights (no torch needed) or any checkpoint :func:`read_checkpoint` reads.
    ``fuse`` folds BatchNorm into convolutions (inference; same results)."""
    p = Path(path)
    try:
        state, meta = load_weights(p)
    except CheckpointError as exc:
        if "not converted weights" not in str(exc):
            raise
        state, meta = read_checkpoint(p), {}
    if meta.get("arch") not in (None, "clip"):
        raise CheckpointError(f"holds a {meta.get('arch')} model, not CLIP", p)
    if meta.get("config"):
        state = map_openai_keys(state)
        cfg = meta["config"]
    else:
        state, meta = convert_state_dict(state, p)
        cfg = meta["config"]
    model = CLIP.from_config(cfg)
    model.load_state(state, fuse=fuse, source=p)
    model.meta = meta
    return model
