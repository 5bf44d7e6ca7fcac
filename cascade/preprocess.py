"""Image preprocessing for every backbone: one type, :class:`Preprocess`, for CLIP and ConvNeXt-V2.

A :class:`Preprocess` is plain, frozen data. Its test view resizes the shorter side (aspect kept, never a
square resize) and centre-crops; its train view (:meth:`Preprocess.train_view`) is a random resized crop plus
a horizontal flip. Both are pure functions of a PIL image (and, for the train view, a numpy ``Generator``),
so the feature pipeline, the specialist's cached views and fine-tuning all read the same definition.

The named presets (:data:`PRESETS`) are the specialist's checkpoint families; CLIP's transform comes from
:meth:`Preprocess.clip` at the model's input resolution.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from .data import load_image

__all__ = ["CLIP_MEAN", "CLIP_STD", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocess", "PRESETS", "DEFAULT_PRESET",
           "preprocess_for"]

# OpenAI CLIP's normalisation (clip/clip.py, _transform) and ImageNet's (timm / torchvision defaults)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": "BICUBIC", "bilinear": "BILINEAR", "nearest": "NEAREST", "lanczos": "LANCZOS",
             "box": "BOX", "hamming": "HAMMING"}


@dataclass(frozen=True)
class Preprocess:
    """Test view: resize the shorter side to ``resize`` (bicubic by default, the long side
    ``int(resize * long / short)`` as torchvision's ``Resize`` computes it), centre-crop ``size`` x ``size``
    (offsets rounded as torchvision's ``CenterCrop``), scale to [0, 1], normalise with ``mean``/``std``;
    output float32 [3, size, size].

    Train view (:meth:`train_view`): a random crop covering a fraction ``crop_scale`` of the area with an
    aspect ratio drawn log-uniformly from ``crop_ratio``, resized to ``train_size`` (``size`` when None), then
    flipped with probability ``hflip``.

    :meth:`clip` is CLIP's transform (224, no extra margin); :meth:`imagenet` the usual 256 -> 224 evaluation
    transform of ImageNet-trained models such as ConvNeXt-V2 (crop ratio 0.875)."""

    size: int = 224
    resize: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"
    train_size: int | None = None
    crop_scale: tuple[float, float] = (0.25, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    @classmethod
    def clip(cls, resolution: int = 224) -> "Preprocess":
        return cls(resolution, resolution, CLIP_MEAN, CLIP_STD, "bicubic")

    @classmethod
    def imagenet(cls, size: int = 224, crop_pct: float = 0.875) -> "Preprocess":
        return cls(size, int(size / crop_pct), IMAGENET_MEAN, IMAGENET_STD, "bicubic")

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        known = {"size", "resize", "mean", "std", "interpolation", "train_size", "crop_scale", "crop_ratio",
                 "hflip"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"preprocess: unknown key(s) {sorted(unknown)} (known: {sorted(known)})")
        size = int(d.get("size", 224))
        train = d.get("train_size")
        return cls(size, int(d.get("resize", size)), tuple(float(v) for v in d.get("mean", CLIP_MEAN)),
                   tuple(float(v) for v in d.get("std", CLIP_STD)), str(d.get("interpolation", "bicubic")),
                   None if train is None else int(train),
                   tuple(float(v) for v in d.get("crop_scale", (0.25, 1.0))),
                   tuple(float(v) for v in d.get("crop_ratio", (3 / 4, 4 / 3))), float(d.get("hflip", 0.5)))

    def __post_init__(self):
        if self.resize < self.size:
            raise ValueError(f"preprocess: resize ({self.resize}) must be >= size ({self.size})")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("preprocess: mean and std need 3 values each, std > 0")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"preprocess: interpolation must be one of {sorted(_RESAMPLE)}")
        if not (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1) or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"preprocess: crop_scale {self.crop_scale} must lie in (0, 1] and crop_ratio "
                             f"{self.crop_ratio} be positive, each (low, high)")
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"preprocess: hflip must be a probability, got {self.hflip}")

    def as_dict(self) -> dict:
        """The fields as JSON-able data (tuples become lists); :meth:`from_dict` reads it back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def cache_key(self) -> str:
        """Identity of the test view (what cached query features depend on)."""
        f = lambda v: ",".join(f"{x:.8g}" for x in v)  # noqa: E731
        return (f"resize={self.resize}:{self.interpolation};crop={self.size};mean={f(self.mean)};"
                f"std={f(self.std)};rgb8")

    @property
    def views_key(self) -> str:
        """Identity of both views (what cached augmented views depend on)."""
        return json.dumps({
            "train_resolution": self.train_size or self.size, "test_resolution": self.size,
            "test_resize": self.resize, "crop_scale": list(self.crop_scale), "crop_ratio": list(self.crop_ratio),
            "hflip": self.hflip, "mean": list(self.mean), "std": list(self.std),
            "interpolation": self.interpolation}, sort_keys=True)

    # ---------------------------------------------------------------------------------------- test view
    def _geometry(self, w: int, h: int):
        if w <= h:
            nw, nh = self.resize, int(self.resize * h / w)
        else:
            nw, nh = int(self.resize * w / h), self.resize
        top = int(round((nh - self.size) / 2.0))
        left = int(round((nw - self.size) / 2.0))
        return nw, nh, left, top

    def image(self, im):
        """An RGB PIL image -> the resized and cropped PIL image (the test view)."""
        resample = self._resample()
        w, h = im.size
        nw, nh, left, top = self._geometry(w, h)
        if max(nw, nh) <= 8 * self.resize:
            im = im.resize((nw, nh), resample)
            return im.crop((left, top, left + self.size, top + self.size))
        # extreme aspect ratio: resample only the region that survives the crop (bounded memory)
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, (left + self.size) * sx, (top + self.size) * sy)
        return im.resize((self.size, self.size), resample, box=box)

    def crop(self, im) -> np.ndarray:
        """An RGB PIL image -> uint8 [size, size, 3] (resized and cropped, not yet normalised)."""
        return np.asarray(self.image(im), dtype=np.uint8)

    def normalize(self, crops: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, 3] crops -> float32 [..., 3, H, W] normalised with mean/std."""
        a = np.asarray(crops, dtype=np.float32) * np.float32(1 / 255.0)
        a = (a - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(np.moveaxis(a, -1, -3))

    def __call__(self, im) -> np.ndarray:
        return self.normalize(self.crop(im))

    def load_crop(self, path) -> np.ndarray:
        """Decode one file robustly (see :func:`cascade.data.load_image`) and resize/crop it: uint8 [S, S, 3]."""
        return self.crop(load_image(path, draft_size=2 * self.resize))

    def load(self, path) -> np.ndarray:
        """Decode and preprocess one file: float32 [3, size, size]."""
        return self.normalize(self.load_crop(path))

    def to_array(self, im) -> np.ndarray:
        """Any view (a PIL image of any size) -> float32 [3, H, W] normalised with mean/std."""
        return self.normalize(np.asarray(im.convert("RGB"), dtype=np.uint8))

    # --------------------------------------------------------------------------------------- train view
    def train_view(self, im, rng: np.random.Generator):
        """A training view (PIL image, ``train_size`` square): see the class docstring. Depends only on the
        image and the generator's state."""
        im = im.convert("RGB")
        w, h = im.size
        area = w * h
        box = None
        log_r = np.log(self.crop_ratio)
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            ratio = float(np.exp(rng.uniform(*log_r)))
            cw = int(round(np.sqrt(target * ratio)))
            ch = int(round(np.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = int(rng.integers(0, w - cw + 1))
                y0 = int(rng.integers(0, h - ch + 1))
                box = (x0, y0, x0 + cw, y0 + ch)
                break
        if box is None:  # fall back to the largest centred crop inside the ratio range
            r = w / h
            if r < self.crop_ratio[0]:
                cw, ch = w, int(round(w / self.crop_ratio[0]))
            elif r > self.crop_ratio[1]:
                ch, cw = h, int(round(h * self.crop_ratio[1]))
            else:
                cw, ch = w, h
            x0, y0 = (w - cw) // 2, (h - ch) // 2
            box = (x0, y0, x0 + cw, y0 + ch)
        s = self.train_size or self.size
        out = im.resize((s, s), self._resample(), box=box)
        if rng.uniform() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out

    def _resample(self):
        return getattr(Image.Resampling, _RESAMPLE[self.interpolation])


# The specialist's checkpoint families: ImageNet statistics, train crops at the checkpoint's resolution; the
# 224 px checkpoints are evaluated 256 -> 224 (crop ratio 0.875, as in the official evaluation).
PRESETS: dict[str, Preprocess] = {
    "convnextv2_1k_224": Preprocess.imagenet(224),
    "convnextv2_22k_224": Preprocess.imagenet(224),
    "convnextv2_22k_384": Preprocess(384, 384, IMAGENET_MEAN, IMAGENET_STD, "bicubic"),
}
DEFAULT_PRESET = "convnextv2_1k_224"


def preprocess_for(preset) -> Preprocess:
    """A :class:`Preprocess` from itself, a preset name (:data:`PRESETS`) or a dict of its fields."""
    if isinstance(preset, Preprocess):
        return preset
    if isinstance(preset, dict):
        return Preprocess.from_dict(preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preprocessing preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]
