"""`augsvc preview`: the original image and N augmented variants in one grid picture, so a user
sees what a spec does before training with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .engine import augment_batch
from .samples import sample_photo
from .spec import load_spec


def load_image(path: str | None) -> np.ndarray:
    """An (H,W,C) uint8 image from a file, or the built-in sample photo when path is None."""
    if path is None:
        return sample_photo()
    with Image.open(path) as opened:
        im = opened.convert("L") if opened.mode in ("L", "I;16", "1") else opened.convert("RGB")
        arr = np.asarray(im)
    return arr[..., None] if arr.ndim == 2 else arr


def preview_grid(image: np.ndarray, spec: Any, *, count: int = 11, cols: int = 4, seed: int = 0,
                 sample_id: int = 0, cell: int = 160) -> Image.Image:
    """Original + `count` variants of one sample (epochs 0..count-1), each cell `cell` px wide."""
    spec = load_spec(spec)
    variants = [augment_batch(image[None], spec, seed=seed, epoch=e, sample_ids=[sample_id])[0]
                for e in range(count)]
    tiles = [("original", image)] + [(f"epoch {e}", v) for e, v in enumerate(variants)]
    rows = -(-len(tiles) // cols)
    label_h = 16
    grid = Image.new("RGB", (cols * (cell + 4) + 4, rows * (cell + label_h + 4) + 4), "white")
    draw = ImageDraw.Draw(grid)
    for k, (label, tile) in enumerate(tiles):
        pic = Image.fromarray(tile[..., 0] if tile.shape[2] == 1 else tile).convert("RGB")
        scale = cell / max(pic.size)
        size = (max(1, round(pic.width * scale)), max(1, round(pic.height * scale)))
        # Small images (digits) are enlarged without smoothing so their pixels stay visible.
        pic = pic.resize(size, Image.Resampling.NEAREST if scale > 2 else Image.Resampling.BILINEAR)
        x = 4 + (k % cols) * (cell + 4)
        y = 4 + (k // cols) * (cell + label_h + 4)
        grid.paste(pic, (x, y + label_h))
        draw.text((x + 2, y + 2), label, fill="black")
    return grid


def write_preview(spec: Any, image_path: str | None, out: str | Path, **kwargs: Any) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    preview_grid(load_image(image_path), spec, **kwargs).save(out)
    return out
