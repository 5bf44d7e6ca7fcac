"""A tiny dataset in the challenge layout plus one converted seeded random CLIP (OpenAI's ViT code at a small
size), for tests that drive train/test through the Python API in a few seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

NAMES = ["Animal_Bear", "Animal_Bee", "Animal_Cat", "Food-101_Pizza", "Food-101_Sushi", "Caltech-101_Chair"]
SHOTS = 2


def make_workspace(root: Path) -> Path:
    """``root``/data (6 classes, 4 images each, one test image per class) and ``root``/out/weights/ViT-B-32.npz."""
    torch = pytest.importorskip("torch")
    from _reference import build_reference
    from test_data import make_dataset

    from cascade.convert import convert

    make_dataset(root / "data", NAMES, per_class=SHOTS + 2, test_per_class=1, size=(32, 24))
    weights = root / "out" / "weights"
    weights.mkdir(parents=True)
    torch.save(build_reference("tiny-vit", seed=11).state_dict(), root / "vit.pt")
    convert(root / "vit.pt", weights / "ViT-B-32.npz", quiet=True)
    return root


def overrides(root: Path, *more: str) -> list[str]:
    """--set overrides for a small, quick run in ``root``: one backbone, no specialist, two validation images per
    class."""
    return [f'paths.data="{root / "data"}"', f'paths.out="{root / "out"}"',
            f'models.clip={{"ViT-B/32"="{root / "out/weights/ViT-B-32.npz"}"}}', f"sampling.shots={SHOTS}",
            "sampling.val_per_class=2", "specialist.enabled=false", *more]
