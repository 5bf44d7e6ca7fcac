"""``python -m cascade demo DIR``: a small synthetic workspace, to try train, test and eval without any download.

It writes, in DIR:

  data/            the challenge's layout: 4 domains x 3 classes, 8 training images per class, 6 test images per
                   class (TestSetA/) and their labels (test_labels.txt)
  out/weights/     demo-vit.npz, a CLIP ViT at a tiny size with seeded random weights (no released weights are
                   needed, nor torch)
  demo.toml        the configuration of the demo: those paths, that one backbone, no specialist

The images are coloured shapes, one colour and shape per class, with random size, position and noise. A CLIP
with random weights (and so random class-name embeddings) tells most of them apart from the few labelled
images: the demo shows the journey and its outputs, not the accuracy real weights give. Then, from DIR (the
repository's train.sh and test.sh):

  bash train.sh --config demo.toml      # sample 4 shots per class, encode, fit, save out/model/
  bash test.sh --config demo.toml       # write out/result.txt
  python -m cascade eval out/result.txt data/test_labels.txt --classes data/classes.txt

``bash scripts/demo.sh`` does all of it in demo/.
"""
from __future__ import annotations

import argparse
import colorsys
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .io import atomic_write_text
from .models.weights import save_weights

DOMAINS = {"Animal": ["Bear", "Owl", "Zebra"], "Caltech-101": ["chair", "lamp", "watch"],
           "Food-101": ["pizza", "sushi", "waffles"], "Thu-dog": ["beagle", "collie", "pug"]}
N_CLASSES = sum(len(v) for v in DOMAINS.values())
SHAPES = ("ellipse", "rectangle", "triangle")
TRAIN_PER_CLASS, TEST_PER_CLASS, SIZE = 8, 6, 64
# a CLIP ViT of the released family at a tiny size: 64 px, patches of 16, two blocks of width 64
VIT_CONFIG = dict(embed_dim=64, image_resolution=64, vision_layers=2, vision_width=64, vision_patch_size=16,
                  context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                  transformer_layers=1)
# the random weights' scale: at CLIP's own initial 0.02 the random towers keep little of the images' colours and
# shapes (about half of the demo's test images right with the default seed), at 0.1 most of them
WEIGHT_STD = 0.1
CONFIG = """# the demo's configuration (python -m cascade demo): merged over cascade/configs/default.toml
[paths]
data = "data"
out = "out"

[models.clip]
"ViT-B/32" = "{out}/weights/demo-vit.npz"   # a tiny random CLIP ViT, not the released ViT-B/32
RN101 = ""                                   # switched off

[sampling]
val_per_class = 4

[specialist]
enabled = false                              # no ConvNeXt-V2 weights in the demo
"""


def class_image(label: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``label``: its shape in its colour on a background of its domain's tint, at a random
    size and place, with pixel noise."""
    hue = 255 * np.array(colorsys.hsv_to_rgb((5 * label % N_CLASSES) / N_CLASSES, 0.9, 0.95))
    tint = 40 + 25 * np.array([label // 3 % 2, label // 6 % 2, 1])       # one background per domain
    img = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in tint))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.25, 0.4) * SIZE
    cx, cy = rng.uniform(r, SIZE - r, size=2)
    box = [cx - r, cy - r, cx + r, cy + r]
    colour = tuple(int(v) for v in np.clip(hue + rng.normal(0, 8, 3), 0, 255))
    shape = SHAPES[label % len(SHAPES)]
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    pixels = np.asarray(img, dtype=np.float64) + rng.normal(0, 8, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_dataset(data: Path, seed: int = 0) -> int:
    """The dataset in the challenge's layout under ``data``; returns the number of classes."""
    names = [f"{d}_{c}" for d, classes in DOMAINS.items() for c in classes]
    rng = np.random.default_rng(seed)
    train, labels = [], []
    (data / "TestSetA").mkdir(parents=True, exist_ok=True)
    for label, name in enumerate(names):
        domain, cls = name.split("_", 1)
        folder = data / "TrainSet" / domain / cls
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(TRAIN_PER_CLASS):
            class_image(label, rng).save(folder / f"{j}.jpg", quality=92)
            train.append(f"TrainSet/{domain}/{cls}/{j}.jpg {label}\n")
    order = rng.permutation(len(names) * TEST_PER_CLASS)   # test file names do not give the class away
    for k, i in enumerate(order):
        label = int(i) // TEST_PER_CLASS
        name = f"image_{k + 1:04d}.jpg"
        class_image(label, rng).save(data / "TestSetA" / name, quality=92)
        labels.append(f"{name} {label}\n")
    atomic_write_text(data / "classes.txt", "".join(f"{n} {i}\n" for i, n in enumerate(names)))
    atomic_write_text(data / "train.txt", "".join(train))
    atomic_write_text(data / "test_labels.txt", "".join(sorted(labels)))
    return len(names)


def write_random_clip(path: Path, seed: int = 0) -> dict:
    """A CLIP ViT of :data:`VIT_CONFIG` with seeded random weights, in the converted format; returns its meta."""
    from .models.clip import CLIP, convert_state_dict   # Jittor: imported only when the demo is made

    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in CLIP.from_config(VIT_CONFIG).parameter_shapes().items():
        if name.endswith(".bias"):
            state[name] = np.zeros(shape, np.float32)
        elif len(shape) == 1 and name.endswith(".weight"):          # LayerNorm scales
            state[name] = np.ones(shape, np.float32)
        else:
            state[name] = rng.normal(0.0, WEIGHT_STD, shape).astype(np.float32)
    state["logit_scale"] = np.asarray(np.log(100.0), np.float32).reshape(state["logit_scale"].shape)
    state, meta = convert_state_dict(state, "demo")
    meta.update(source=f"random weights (python -m cascade demo, seed {seed})")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(path, state, meta)


def make_demo(root, seed: int = 0) -> Path:
    """Write the demo workspace in ``root`` (see the module docstring); returns ``root``."""
    root = Path(root)
    if (root / "data").exists() and any((root / "data").iterdir()):
        raise FileExistsError(f"{root / 'data'}: already holds a dataset; choose an empty folder for the demo")
    n = write_dataset(root / "data", seed)
    write_random_clip(root / "out" / "weights" / "demo-vit.npz", seed)
    atomic_write_text(root / "demo.toml", CONFIG)
    print(f"[demo] wrote {root}/data ({n} classes, {n * TRAIN_PER_CLASS} training and {n * TEST_PER_CLASS} test "
          f"images), {root}/out/weights/demo-vit.npz and {root}/demo.toml", file=sys.stderr)
    return root


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="the folder to write (its data/ must be absent or empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images and of the random weights")
    p.set_defaults(func=run)


def run(args) -> int:
    make_demo(args.dir, args.seed)
    return 0
