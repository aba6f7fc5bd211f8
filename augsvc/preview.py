"""`augsvc preview`: the original image and N augmented variants in one grid picture, so a user
sees what a spec does before training with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .engine import augment_batch
from .errors import InvalidInputError
from .samples import sample_photo
from .spec import load_spec


def load_image(path: str | None) -> np.ndarray:
    """An (H,W,C) uint8 image from a PNG/JPEG file, decoded as a server decodes a dataset's files
    (`augsvc.datasets.decode`: 16-bit samples keep their high byte, alpha is dropped, gray stays one
    channel), or the built-in sample photo when path is None."""
    if path is None:
        return sample_photo()
    from .datasets.decode import DecodeFailed, decode, probe  # the server's own decoding: what training gets

    data = Path(path).read_bytes()
    try:
        header = probe(data)
        return decode(data, header, 1 if header.gray else 3, 1)
    except DecodeFailed as exc:
        raise InvalidInputError(f"{path}: {exc}") from None


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
