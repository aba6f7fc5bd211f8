"""A batch of images as the backends pass it along: one (N, H, W, C) array when every image has
one shape, else a list of (H, W, C) arrays; and the border modes of geometric steps."""

from __future__ import annotations

import cv2
import numpy as np

Images = np.ndarray | list[np.ndarray]

#: The spec's `border` names as OpenCV border modes.
BORDERS = {"reflect_101": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT,
           "replicate": cv2.BORDER_REPLICATE}


def as_list(work: Images) -> list[np.ndarray]:
    return list(work) if isinstance(work, np.ndarray) else work


def stack_if_uniform(images: list[np.ndarray]) -> Images:
    if images and all(im.shape == images[0].shape for im in images):
        return np.stack(images)
    return images
