"""Server-side datasets in shared memory, so every worker reads one copy.

`load_dataset` turns a source into a `Dataset` in the serving process; `Dataset.handle()` is a
small picklable description that worker processes (forkserver children, which inherit nothing)
pass to `attach` to read the same pages. Along its ideas:

- `sources`  — where samples come from: builtin:digits, .npz, image folders, manifests;
- `scan`     — every file's header read once, in parallel, and the bad-file policy;
- `decode`   — encoded bytes to pixels (libjpeg-turbo for JPEG), the decode-size rule;
- `layouts`  — the shared-memory segment (decoded, encoded or files) and a worker's reader;
- `dataset`  — `Dataset` and `load_dataset`, which picks the layout the cache budget allows.
"""

from __future__ import annotations

from .dataset import DEFAULT_CACHE_BUDGET, Dataset, load_dataset, parse_dataset_arg
from .decode import JPEG_DECODER, DecodeSize, dct_scale, decode_images
from .layouts import LAYOUTS, DatasetHandle, DatasetReader, attach
from .scan import BAD_FILE_POLICIES

__all__ = ["BAD_FILE_POLICIES", "DEFAULT_CACHE_BUDGET", "JPEG_DECODER", "LAYOUTS", "Dataset", "DatasetHandle",
           "DatasetReader", "DecodeSize", "attach", "dct_scale", "decode_images", "load_dataset",
           "parse_dataset_arg"]
