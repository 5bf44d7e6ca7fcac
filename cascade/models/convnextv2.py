"""ConvNeXt-V2 (Woo et al., "ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders", 2023) in Jittor.

Parameter names follow the official release (facebookresearch/ConvNeXt-V2, ``models/convnextv2.py``), so a
converted official checkpoint loads key for key::

    downsample_layers.0.{0: Conv2d 4x4/4 (stem), 1: LayerNorm channels-first}
    downsample_layers.i.{0: LayerNorm channels-first, 1: Conv2d 2x2/2}          i = 1, 2, 3
    stages.i.j.{dwconv (7x7 depthwise), norm, pwconv1, grn (gamma, beta: [1,1,1,4d]), pwconv2}
    norm (LayerNorm of the pooled feature), head (Linear)

The architecture's size is data: :data:`CONFIGS` (depths and widths of the released models, atto..huge) or the
shapes of the weights (:func:`config_from_state`). Semantics (checked against the official code and timm's
``convnextv2_*`` by ``tests/test_convnextv2.py``): every LayerNorm has eps 1e-6; GRN(x) = gamma * (x * N(x)) +
beta + x with G(x) the L2 norm over the spatial positions per channel and N(x) = G(x) / (mean_channels G(x) +
1e-6); GELU is the exact (erf) form; drop-path is an identity at inference, so the model has none.
``forward_features`` returns the final-LayerNorm'd mean-pooled feature (1024-d for base), ``head`` the logits.

Execution is channels-last (NHWC) inside the network: the stem and the downsampling convolutions have kernel ==
stride, so they are exact patchify-matmuls; the 1x1 convolutions are matmuls (oneDNN on CPU); the channels-first
LayerNorms of the official code normalise over the channel axis, which is the last axis here. The 7x7 depthwise
convolution uses a small OpenMP C++ kernel on CPU inference and Jittor's own convolution otherwise (GPU,
gradients). Inputs and the official weights stay NCHW / PyTorch layout.

Checkpoint names: :func:`convert_state_dict` accepts the official names (optionally with ``module.`` or
``model.`` prefixes) and timm's names (mapped by :func:`timm_to_official`).
"""
from __future__ import annotations

import re

import numpy as np

from cascade.runtime import jittor as _jittor

jt = _jittor()
from jittor import nn  # noqa: E402  (after the runtime wiring)

from .layers import LayerNorm  # noqa: E402
from .weights import CONVNEXT_CONFIGS, convnext_stage_width, load_weights  # noqa: E402

__all__ = [
    "CONFIGS", "DEFAULT_CONFIG", "ConvNeXtV2", "LayerNorm", "GRN", "Block", "DepthwiseConv7", "PatchConv",
    "convnextv2", "config_from_state", "expected_shapes", "timm_to_official", "convert_state_dict",
    "load_convnextv2", "LN_EPS", "GRN_EPS",
]

LN_EPS = 1e-6   # every LayerNorm in ConvNeXt-V2 (official models/convnextv2.py and utils.LayerNorm)
GRN_EPS = 1e-6  # GRN: N(x) = G(x) / (mean_c G(x) + 1e-6)  (official models/utils.GRN)

# name -> (depths, dims) of the released models (official models/convnextv2.py; also timm's convnextv2_*), kept
# with the weights checks, which read a file's size without Jittor
CONFIGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = CONVNEXT_CONFIGS
DEFAULT_CONFIG = "base"
MLP_RATIO = 4  # pwconv1: d -> 4d


# ----------------------------------------------------------------------------------------------------- layers
def _trunc_normal(shape, std: float = 0.02):
    return jt.init.trunc_normal_(jt.zeros(tuple(shape), dtype="float32"), std=std)


class GRN(nn.Module):
    """Global Response Normalization on channels-last input; gamma and beta have the official shape
    [1, 1, 1, dim] and start at zero (GRN is then the identity)."""

    def __init__(self, dim: int, eps: float = GRN_EPS):
        self.gamma = jt.zeros((1, 1, 1, dim), dtype="float32")
        self.beta = jt.zeros((1, 1, 1, dim), dtype="float32")
        self.eps = eps

    def execute(self, x):  # x: [N, H, W, C]
        gx = jt.sqrt((x * x).sum(dims=(1, 2), keepdims=True))          # [N, 1, 1, C]
        nx = gx / (gx.mean(-1, keepdims=True) + self.eps)              # [N, 1, 1, C]
        return self.gamma * (x * nx) + self.beta + x


class PatchConv(nn.Module):
    """Conv2d whose kernel equals its stride (the 4x4/4 stem, the 2x2/2 downsampling), with PyTorch's weight
    layout [out, in, k, k]. On NHWC input it is exactly a matmul over non-overlapping k x k patches; like a
    convolution without padding, trailing rows/columns that do not fill a patch are dropped."""

    def __init__(self, in_ch: int, out_ch: int, k: int):
        self.weight = _trunc_normal((out_ch, in_ch, k, k))
        self.bias = jt.zeros((out_ch,), dtype="float32")
        self.k = k

    def execute(self, x):  # x: [N, H, W, C] -> [N, H/k, W/k, out]
        n, h, w, c = x.shape
        k = self.k
        ho, wo = h // k, w // k
        if ho * k != h or wo * k != w:
            x = x[:, :ho * k, :wo * k, :]
        p = x.reshape((n, ho, k, wo, k, c)).permute(0, 1, 3, 2, 4, 5).reshape((n * ho * wo, k * k * c))
        wt = self.weight.permute(0, 2, 3, 1).reshape((self.weight.shape[0], k * k * c))  # [out, (kh, kw, c)]
        y = nn.matmul_transpose(p, wt) + self.bias
        return y.reshape((n, ho, wo, -1))


_DW_CPU_SRC = r"""
    const int N = in0_shape0, H = in0_shape1, W = in0_shape2, C = in0_shape3;
    const int K = in1_shape0, P = K / 2;
    const float* __restrict__ x = in0_p;
    const float* __restrict__ w = in1_p;   // [K, K, C]
    const float* __restrict__ b = in2_p;   // [C]
    float* __restrict__ y = out0_p;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int n = 0; n < N; n++)
    for (int h = 0; h < H; h++) {
        const int kh0 = h - P < 0 ? P - h : 0;
        const int kh1 = h - P + K > H ? H - h + P : K;
        for (int j = 0; j < W; j++) {
            float* __restrict__ yo = y + ((size_t)(n * H + h) * W + j) * C;
            for (int c = 0; c < C; c++) yo[c] = b[c];
            const int kw0 = j - P < 0 ? P - j : 0;
            const int kw1 = j - P + K > W ? W - j + P : K;
            for (int kh = kh0; kh < kh1; kh++) {
                const float* __restrict__ xr = x + ((size_t)(n * H + h + kh - P) * W + (j - P)) * C;
                const float* __restrict__ wr = w + (size_t)kh * K * C;
                for (int kw = kw0; kw < kw1; kw++) {
                    const float* __restrict__ xi = xr + (size_t)kw * C;
                    const float* __restrict__ wk = wr + (size_t)kw * C;
                    #pragma omp simd
                    for (int c = 0; c < C; c++) yo[c] += xi[c] * wk[c];
                }
            }
        }
    }
"""


class DepthwiseConv7(nn.Module):
    """7x7 depthwise convolution (padding 3) with PyTorch's weight layout [C, 1, 7, 7], on NHWC input."""

    def __init__(self, dim: int, kernel_size: int = 7):
        self.weight = _trunc_normal((dim, 1, kernel_size, kernel_size))
        self.bias = jt.zeros((dim,), dtype="float32")
        self.kernel_size = kernel_size

    def execute(self, x):  # [N, H, W, C]
        if jt.flags.use_cuda or not jt.flags.no_grad:
            # GPU (Jittor's depthwise kernel) or training (Jittor's differentiable convolution)
            y = nn.conv2d(x.permute(0, 3, 1, 2), self.weight, self.bias, stride=1,
                          padding=self.kernel_size // 2, groups=x.shape[3])
            return y.permute(0, 2, 3, 1)
        wk = self.weight.reshape((self.weight.shape[0], self.kernel_size, self.kernel_size)).permute(1, 2, 0)
        return jt.code(x.shape, "float32", [x, wk, self.bias], cpu_src=_DW_CPU_SRC)


class Block(nn.Module):
    """dwconv 7x7 -> LayerNorm -> pwconv1 (d->4d) -> GELU -> GRN -> pwconv2 (4d->d), plus the input."""

    def __init__(self, dim: int):
        self.dwconv = DepthwiseConv7(dim)
        self.norm = LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, MLP_RATIO * dim)
        self.grn = GRN(MLP_RATIO * dim)
        self.pwconv2 = nn.Linear(MLP_RATIO * dim, dim)

    def execute(self, x):  # [N, H, W, C]
        y = self.norm.normalize_last(self.dwconv(x))
        y = nn.gelu(self.pwconv1(y))
        y = self.pwconv2(self.grn(y))
        return x + y


class ConvNeXtV2(nn.Module):
    """ConvNeXt-V2 classifier. ``depths``/``dims`` give the four stages (see :data:`CONFIGS`);
    ``num_classes`` the head's width (1000 for the ImageNet-1k checkpoints)."""

    def __init__(self, depths=CONFIGS[DEFAULT_CONFIG][0], dims=CONFIGS[DEFAULT_CONFIG][1],
                 num_classes: int = 1000, in_chans: int = 3, head_init_scale: float = 1.0):
        depths, dims = tuple(int(d) for d in depths), tuple(int(d) for d in dims)
        if len(depths) != len(dims):
            raise ValueError(f"depths {depths} and dims {dims} must have the same length")
        self.depths, self.dims = depths, dims
        self.num_classes, self.in_chans = int(num_classes), int(in_chans)
        self.num_features = dims[-1]
        stem = nn.Sequential(PatchConv(in_chans, dims[0], 4),
                             LayerNorm(dims[0], eps=LN_EPS, data_format="channels_first"))
        layers = [stem]
        for i in range(1, len(dims)):
            layers.append(nn.Sequential(LayerNorm(dims[i - 1], eps=LN_EPS, data_format="channels_first"),
                                        PatchConv(dims[i - 1], dims[i], 2)))
        self.downsample_layers = nn.ModuleList(layers)
        self.stages = nn.ModuleList([nn.Sequential(*[Block(d) for _ in range(n)]) for n, d in zip(depths, dims)])
        self.norm = LayerNorm(dims[-1], eps=LN_EPS)
        self.head = nn.Linear(dims[-1], self.num_classes)
        # official init (models/convnextv2.py _init_weights): conv/linear weights trunc_normal(std=.02), their
        # biases 0; LayerNorms 1/0 and GRN 0/0 as constructed; the head then scaled by head_init_scale.
        for m in self.modules():
            if isinstance(m, (PatchConv, DepthwiseConv7, nn.Linear)):
                m.weight.assign(_trunc_normal(m.weight.shape))
                m.bias.assign(jt.zeros(m.bias.shape, dtype="float32"))
        if head_init_scale != 1.0:
            self.head.weight.assign(self.head.weight * head_init_scale)
            self.head.bias.assign(self.head.bias * head_init_scale)

    @staticmethod
    def _as_var(x):
        if isinstance(x, np.ndarray):
            x = jt.array(np.ascontiguousarray(x, dtype=np.float32))
        if x.ndim != 4:
            raise ValueError(f"ConvNeXtV2 expects images [N, C, H, W], got shape {tuple(x.shape)}")
        return x

    def forward_stages(self, x, start: int = 0, stop: int | None = None):
        """Run stages ``start``..``stop-1`` (each with its downsampling layer). ``x``: images [N, C, H, W] when
        start == 0, else the NHWC map the previous stage returned. Returns an NHWC map."""
        stop = len(self.stages) if stop is None else stop
        if start == 0:
            x = self._as_var(x).permute(0, 2, 3, 1)
        for i in range(start, stop):
            down = self.downsample_layers[i]
            if i == 0:
                x = down[1].normalize_last(down[0](x))
            else:
                x = down[1](down[0].normalize_last(x))
            x = self.stages[i](x)
        return x

    def forward_spatial(self, x):
        """The last stage's NHWC feature map (before pooling)."""
        return self.forward_stages(x)

    def forward_features(self, x):
        """Mean-pooled, LayerNorm'd feature [N, dims[-1]] (1024-d for base) from images [N, C, H, W]."""
        return self.norm.normalize_last(self.forward_spatial(x).mean(dims=(1, 2)))

    def execute(self, x):
        """Logits [N, num_classes]."""
        return self.head(self.forward_features(x))

    def encode_image(self, x):
        """Inference features for the feature cache: ``forward_features`` without gradients (jt.Var [N, D])."""
        with jt.no_grad():
            return self.forward_features(x)


# ----------------------------------------------------------------------------------------------------- configs
def convnextv2(name: str = DEFAULT_CONFIG, **kwargs) -> ConvNeXtV2:
    """A randomly initialised model of a released size (atto, femto, pico, nano, tiny, base, large, huge)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown ConvNeXt-V2 size {name!r}; known: {', '.join(CONFIGS)}")
    depths, dims = CONFIGS[name]
    return ConvNeXtV2(depths=depths, dims=dims, **kwargs)


def config_name(depths, dims) -> str | None:
    for name, (d, w) in CONFIGS.items():
        if tuple(depths) == d and tuple(dims) == w:
            return name
    return None


def config_from_state(state: dict) -> dict:
    """Infer {name, depths, dims, num_classes, in_chans} from official-named weight shapes."""
    stem = state.get("downsample_layers.0.0.weight")
    if stem is None or np.ndim(stem) != 4:
        raise ValueError("cannot infer the ConvNeXt-V2 size: missing or malformed key downsample_layers.0.0.weight")
    n_stages = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"stages\.(\d+)\.", k))), default=-1)
    shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    if n_stages == 0:
        raise ValueError("cannot infer the ConvNeXt-V2 size: no stages.* keys")
    depths, dims = [], []
    for i in range(n_stages):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))}
        depths.append(1 + max(blocks) if blocks else 0)
        dims.append(convnext_stage_width(shapes, i))
    head = state.get("head.weight")
    return {"name": config_name(depths, dims), "depths": depths, "dims": dims,
            "num_classes": int(np.shape(head)[0]) if head is not None else 0,
            "in_chans": int(np.shape(stem)[1])}


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Official parameter name -> shape for a config (dict with depths, dims, num_classes, in_chans)."""
    depths, dims = config["depths"], config["dims"]
    shapes: dict[str, tuple[int, ...]] = {
        "downsample_layers.0.0.weight": (dims[0], config.get("in_chans", 3), 4, 4),
        "downsample_layers.0.0.bias": (dims[0],),
        "downsample_layers.0.1.weight": (dims[0],), "downsample_layers.0.1.bias": (dims[0],),
    }
    for i in range(1, len(dims)):
        shapes.update({f"downsample_layers.{i}.0.weight": (dims[i - 1],),
                       f"downsample_layers.{i}.0.bias": (dims[i - 1],),
                       f"downsample_layers.{i}.1.weight": (dims[i], dims[i - 1], 2, 2),
                       f"downsample_layers.{i}.1.bias": (dims[i],)})
    for i, (n, d) in enumerate(zip(depths, dims)):
        for j in range(n):
            p = f"stages.{i}.{j}."
            shapes.update({p + "dwconv.weight": (d, 1, 7, 7), p + "dwconv.bias": (d,),
                           p + "norm.weight": (d,), p + "norm.bias": (d,),
                           p + "pwconv1.weight": (MLP_RATIO * d, d), p + "pwconv1.bias": (MLP_RATIO * d,),
                           p + "grn.gamma": (1, 1, 1, MLP_RATIO * d), p + "grn.beta": (1, 1, 1, MLP_RATIO * d),
                           p + "pwconv2.weight": (d, MLP_RATIO * d), p + "pwconv2.bias": (d,)})
    shapes.update({"norm.weight": (dims[-1],), "norm.bias": (dims[-1],),
                   "head.weight": (config["num_classes"], dims[-1]), "head.bias": (config["num_classes"],)})
    return shapes


# ----------------------------------------------------------------------------------------------------- names
_TIMM_RULES = (  # (timm pattern, official replacement), applied in order, first match wins
    (r"^stem\.(\d+)\.", r"downsample_layers.0.\1."),
    (r"^stages\.(\d+)\.downsample\.(\d+)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"stages.\1.\2.norm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.weight$", r"stages.\1.\2.grn.gamma"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.grn\.bias$", r"stages.\1.\2.grn.beta"),
    (r"^head\.norm\.", r"norm."),
    (r"^head\.fc\.", r"head."),
)


def timm_to_official(key: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """Map one timm ``convnextv2_*`` parameter to its official name and shape. GRN parameters become
    [1, 1, 1, C] (timm stores [C]); 1x1-conv MLP weights (timm's conv_mlp variant) become Linear weights.
    Keys that match no rule are returned unchanged (and later reported as unexpected)."""
    for pattern, repl in _TIMM_RULES:
        new, n = re.subn(pattern, repl, key)
        if n:
            if ".grn." in new:
                value = np.reshape(value, (1, 1, 1, -1))
            elif re.search(r"\.pwconv[12]\.weight$", new) and np.ndim(value) == 4:
                value = np.reshape(value, np.shape(value)[:2])
            return new, value
    return key, value


def _is_timm_naming(keys) -> bool:
    return any(k.startswith(("stem.", "head.fc.", "head.norm.")) or ".blocks." in k for k in keys)


def convert_state_dict(state: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Official-named float32 state dict and meta from an official or timm ConvNeXt-V2 state dict.

    Accepts a nested ``{'model': {...}}`` dict, flat ``model.``/``module.`` prefixes, and timm's names. Raises
    ValueError listing missing, unexpected and wrongly shaped keys. meta = {'arch': 'convnextv2', 'config':
    {'name', 'depths', 'dims', 'num_classes', 'in_chans'}, 'source_naming': 'official' | 'timm'}."""
    if isinstance(state.get("model"), dict):
        state = state["model"]
    elif isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    flat = {}
    for k, v in state.items():
        for prefix in ("module.", "model.", "module."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        flat[k] = v
    naming = "timm" if _is_timm_naming(flat) else "official"
    out: dict[str, np.ndarray] = {}
    for k, v in flat.items():
        v = np.asarray(v)
        if naming == "timm":
            k, v = timm_to_official(k, v)
        out[k] = np.ascontiguousarray(v, dtype=np.float32)
    try:
        config = config_from_state(out)
    except ValueError as exc:
        sample = ", ".join(sorted(out)[:8])
        raise ValueError(f"not a ConvNeXt-V2 state dict ({exc}); first keys: {sample}") from None
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(out))
    unexpected = sorted(set(out) - set(shapes))
    wrong = sorted(f"{k} {tuple(out[k].shape)} (expected {shapes[k]})"
                   for k in set(shapes) & set(out) if tuple(out[k].shape) != tuple(shapes[k]))
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                more = f" ... (+{len(items) - 20} more)" if len(items) > 20 else ""
                parts.append(f"{label} keys ({len(items)}): {', '.join(items[:20])}{more}")
        raise ValueError(f"ConvNeXt-V2 state dict ({naming} names, depths {config['depths']}, dims "
                         f"{config['dims']}) does not match the architecture: " + "; ".join(parts))
    meta = {"arch": "convnextv2", "config": config, "source_naming": naming}
    return out, meta


# ----------------------------------------------------------------------------------------------------- loading
def model_from_state(state: dict[str, np.ndarray], config: dict | None = None) -> ConvNeXtV2:
    """Build a model sized from ``config`` (or from the weights' shapes) and load official-named weights."""
    config = config or config_from_state(state)
    model = ConvNeXtV2(depths=config["depths"], dims=config["dims"], num_classes=config["num_classes"],
                       in_chans=config.get("in_chans", 3))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(np.shape(state[k]))]
    if missing or unexpected or wrong:
        raise ValueError(f"ConvNeXt-V2 weights do not fit the model: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}, wrong shape {sorted(wrong)[:10]}")
    for k, p in own.items():
        p.assign(jt.array(np.ascontiguousarray(state[k], dtype=np.float32)))
    model.eval()
    return model


def load_convnextv2(path) -> ConvNeXtV2:
    """Load a ConvNeXt-V2 converted by ``python -m cascade.convert`` (our safe .npz + JSON format)."""
    state, meta = load_weights(path)
    arch = (meta or {}).get("arch")
    if arch not in (None, "convnextv2"):
        raise ValueError(f"{path}: holds a {arch!r} model, not ConvNeXt-V2")
    try:
        model = model_from_state(state, (meta or {}).get("config"))
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    model.cache_key = f"convnextv2:{(meta or {}).get('sha256') or (meta or {}).get('source_sha256') or path}"
    return model
