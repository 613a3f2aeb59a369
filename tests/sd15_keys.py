"""The tensor names and shapes of a real SD1.5 checkpoint and a real kohya LoRA (tests/data/*.tsv, recorded
from real files), for checking our generators, detectors and key maps against reality."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
CHECKPOINT_KEYS = DATA / "sd15-checkpoint-keys.tsv"
KOHYA_KEYS = DATA / "sd15-kohya-lora-keys.tsv"


def read_tsv(path: Path) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape}; a scalar is ()."""
    shapes = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or line.startswith("key\t") or not line.strip():
            continue
        key, shape = line.split("\t")
        shapes[key] = () if shape == "scalar" else tuple(int(n) for n in shape.split("x"))
    return shapes


def sd15_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """{key without prefix: shape (torch layout)} for one component of the SD1.5 checkpoint."""
    return {k[len(prefix):]: s for k, s in read_tsv(CHECKPOINT_KEYS).items() if k.startswith(prefix)}
