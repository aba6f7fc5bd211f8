"""Natural photos to try a spec on when the user brings none: crops of scikit-learn's two sample
photos (china.jpg and flower.jpg, 427x640 RGB), for `augsvc preview` and `augsvc bench`."""

from __future__ import annotations

import numpy as np


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_image

    return [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]


def sample_photo() -> np.ndarray:
    """One 320x320 RGB crop of china.jpg (the temple), (H, W, 3) uint8."""
    return np.ascontiguousarray(_photos()[0][60:380, 150:470])


def sample_images(count: int, side: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """`count` distinct crops of the sample photos, taken at random places and sizes (from `seed`)
    and resized to side x side: (count, side, side, channels) uint8, channels 3 (RGB) or 1 (gray)."""
    import cv2

    photos = _photos()
    rng = np.random.default_rng(seed)
    out = np.empty((count, side, side, channels), np.uint8)
    for i in range(count):
        photo = photos[i % 2]
        crop = int(rng.integers(160, 400))
        y = int(rng.integers(0, photo.shape[0] - crop))
        x = int(rng.integers(0, photo.shape[1] - crop))
        img = cv2.resize(photo[y:y + crop, x:x + crop], (side, side), interpolation=cv2.INTER_AREA)
        out[i] = img if channels == 3 else cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None]
    return out
