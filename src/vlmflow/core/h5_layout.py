"""The LLaVA HDF5 files' layout (Cerebras ModelZoo's), named once: the h5 stage writes
it, h5_shuffle rewrites it, training reads it.

Each file holds ``data`` (n, 4, max_seq_len) int32, whose four rows per sample are
``input_ids``, ``loss_mask``, ``labels`` and ``key_padding_mask`` in that order, and
``img_path`` (n, 1) bytes, relative to the dataset's image folder; phase-1 files may also
hold ``vision_features`` (n, num_patches, hidden) float16 (docs/data.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from vlmflow.core.io import atomic_path

# Row order of dataset ``data``.
INPUT_IDS, LOSS_MASK, LABELS, KEY_PADDING_MASK = range(4)
# The same rows as the "features" of Cerebras' data_params.json.
FEATURES = ("input_ids", "loss_mask", "labels", "key_padding_mask")
VISION_FEATURES = "vision_features"
# The img_path of a sample without an image (Cerebras' convention): readers feed a black
# image in its place, so every row keeps the same patch slots.
TEXT_ONLY = "None"


def write_rows(
    path: str | Path,
    data: np.ndarray,
    img_paths: Sequence[str | bytes | None],
    extra: Callable[[h5py.File], None] | None = None,
) -> None:
    """Write packed rows ``data`` (n, 4, max_seq_len) and their image paths atomically
    (``None`` for a text-only sample is stored as ``b"None"``); ``extra`` adds further
    datasets to the file before it appears."""
    max_seq_len = int(data.shape[2])
    encoded = [
        p if isinstance(p, bytes) else (TEXT_ONLY if p is None else p).encode() for p in img_paths
    ]
    width = max([len(p) for p in encoded], default=1)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(
            "data",
            data=data,
            dtype="int32",
            chunks=(1, 4, max_seq_len),
            compression="gzip",
            maxshape=(None, 4, max_seq_len),
        )
        f.create_dataset(
            "img_path",
            data=np.array([[p] for p in encoded], dtype=f"S{width}").reshape(-1, 1),
            chunks=True if img_paths else None,
            compression="gzip" if img_paths else None,
            maxshape=(None, 1),
        )
        f.attrs["n_examples"] = len(img_paths)
        if extra is not None:
            extra(f)
