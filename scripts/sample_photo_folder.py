"""Write a small image-folder dataset of real photos in mixed sizes, for trying `augsvc serve
--dataset NAME=FOLDER` and `augsvc-train` on photos without downloading any.

Classes are the three vertical thirds (left, centre, right) of scikit-learn's two sample photos
(china.jpg, flower.jpg): six classes. Each image is a random crop of its third (side 100-200 px,
aspect 3:4 to 4:3) scaled by a random factor in [0.8, 1.6], saved as a JPEG (quality 90), so no
two images need be the same size. Deterministic for a seed.

    python scripts/sample_photo_folder.py --out data/photos --per-class 60
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from sklearn.datasets import load_sample_image


def write_folder(out: Path, per_class: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    count = 0
    for photo_name in ("china", "flower"):
        photo = load_sample_image(f"{photo_name}.jpg")  # 427x640 RGB
        height, width = photo.shape[:2]
        for third, where in enumerate(("left", "centre", "right")):
            folder = out / f"{photo_name}_{where}"
            folder.mkdir(parents=True, exist_ok=True)
            x0, x1 = third * width // 3, (third + 1) * width // 3
            for i in range(per_class):
                side = int(rng.integers(100, 201))
                aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
                w, h = min(int(side * aspect), x1 - x0), min(side, height)
                x = int(rng.integers(x0, x1 - w + 1))
                y = int(rng.integers(0, height - h + 1))
                scale = float(rng.uniform(0.8, 1.6))
                crop = cv2.resize(photo[y:y + h, x:x + w], (round(w * scale), round(h * scale)),
                                  interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
                cv2.imwrite(str(folder / f"{i:04d}.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
                count += 1
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"wrote {write_folder(args.out, args.per_class, args.seed)} JPEGs in 6 class folders under {args.out}")


if __name__ == "__main__":
    main()
