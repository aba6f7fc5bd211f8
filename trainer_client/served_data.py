"""Training data from a served dataset: the train/validation split, the validation pipeline, and
streams whose batches fit the server's limits.

Validation is streamed like training — in batches sized from the server's `max_batch_bytes`
(asked with `server_info()`, never assumed), never held whole in memory — through a
deterministic pipeline derived from the training spec (`eval_spec`): a spec that crops (a random
or centre crop) is validated the standard way, shorter side resized to 8/7 of the crop's larger
side then the centre crop (256 then 224 for 224x224); a spec that only resizes, with that
resize; a spec that leaves the size alone, on the images as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from augsvc.spec import Spec, load_spec

from .client import AugmentClient
from .client import batch_size_within as batch_size_within  # re-exported where they lived (their home: client)
from .client import check_batch_fits as check_batch_fits
from .client import image_bytes as image_bytes
from .stream import AugmentedStream

#: Steps that crop: a spec with one is validated with resize_shorter + center_crop.
CROPPING_STEPS = frozenset({"random_resized_crop", "center_crop"})
#: Validation batches hold at most this many images, however small (augsvc-train asks for twice
#: the training batch, within this and the server's limit).
MAX_VAL_BATCH = 256


def eval_spec(spec: Any) -> Spec:
    """The deterministic validation pipeline for training spec `spec` (see the module docstring)."""
    train = load_spec(spec)
    size = train.output_size
    if size is None:
        return load_spec({"transforms": []})
    height, width = size
    if any(name in CROPPING_STEPS for name, _ in train.steps):
        side = round(max(height, width) * 8 / 7)
        return load_spec({"transforms": [{"resize_shorter": {"side": side}},
                                         {"center_crop": {"height": height, "width": width}}]})
    return load_spec({"transforms": [{"resize": {"height": height, "width": width}}]})


def random_split(n: int, n_val: int, seed: int, n_train: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids), disjoint and sorted, from a permutation of 0..n-1 drawn from `seed`."""
    perm = np.random.default_rng(seed).permutation(n)
    val = np.sort(perm[:n_val])
    train = np.sort(perm[n_val:] if n_train is None else perm[n_val:n_val + n_train])
    return train, val


@dataclass(frozen=True)
class ImageFormat:
    """Channels and (height, width) of the images a pipeline delivers."""

    channels: int
    height: int
    width: int


def probe_format(client: AugmentClient, dataset: str, spec: Spec, sample_id: int) -> ImageFormat:
    """What `spec` makes of one sample: the channels and size the model will see (one image fetched)."""
    with AugmentedStream(client, dataset, spec, batch_size=1, seed=0, shuffle=False, sample_ids=[sample_id],
                         rank=0, world_size=1, prefetch=1) as probe:
        images = next(iter(probe))[0]
    return ImageFormat(int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))


def validation_stream(client: AugmentClient, dataset: str, spec: Spec, val_ids: np.ndarray, *,
                      wanted_batch: int = MAX_VAL_BATCH) -> AugmentedStream:
    """The validation set through `spec`, in id order, batched within the server's limits, each
    rank its shard (padding marked: with_mask)."""
    info = client.dataset_info(dataset)
    batch = batch_size_within(client.server_info(), spec, info, wanted_batch)
    return AugmentedStream(client, dataset, spec, batch_size=batch, seed=0, shuffle=False, sample_ids=val_ids,
                           with_mask=True)
