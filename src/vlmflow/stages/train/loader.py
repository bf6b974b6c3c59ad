"""The training data: examples read from the H5 files of the h5 stage (rows in Cerebras'
layout, images or stored vision features)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from vlmflow.core.h5_layout import (
    TEXT_ONLY,
    VISION_FEATURES,
)
from vlmflow.core.vision import black_image, load_image, processor_side


@dataclass(frozen=True)
class H5Source:
    """One HDF5 file and the folder its ``img_path`` entries are relative to."""

    path: Path
    image_root: Path


class H5Examples(Dataset[dict[str, torch.Tensor]]):
    """Rows of Cerebras-layout LLaVA files with their images, opened lazily.

    h5py handles must not be shared across DataLoader worker processes, so each
    process opens the files on first use.
    """

    def __init__(self, sources: list[H5Source], image_processor: Any) -> None:
        self.sources = sources
        self.image_processor = image_processor
        self.index: list[tuple[int, int]] = []
        with_features = []
        for number, source in enumerate(sources):
            with h5py.File(source.path, "r") as f:
                self.index.extend((number, row) for row in range(int(f.attrs["n_examples"])))
                with_features.append(VISION_FEATURES in f)
        # Precomputed vision features (h5.vision_features) replace the images.
        self.features = all(with_features) and bool(with_features)
        if any(with_features) and not self.features:
            missing = [
                str(s.path) for s, has in zip(sources, with_features, strict=True) if not has
            ]
            raise ValueError(
                f"some training files hold precomputed vision features and some do not "
                f"(without: {', '.join(missing)}); rebuild them with the same h5 settings"
            )
        self._files: dict[int, h5py.File] = {}
        self._paths: dict[int, list[str]] = {}
        self._target_side = processor_side(image_processor)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[int]) -> list[dict[str, torch.Tensor]]:
        """A whole batch at once (the DataLoader asks for it so): rows read per file in
        one h5py call, images transformed in one image-processor call."""
        by_file: dict[int, list[tuple[int, int]]] = {}
        for position, item in enumerate(items):
            number, row = self.index[item]
            by_file.setdefault(number, []).append((row, position))
        rows: list[torch.Tensor | None] = [None] * len(items)
        images: list[np.ndarray | None] = [None] * len(items)
        features: list[torch.Tensor | None] = [None] * len(items)
        for number, wanted in by_file.items():
            if number not in self._files:
                self._files[number] = h5py.File(self.sources[number].path, "r")
                # A few bytes per row: read once, not once per batch.
                self._paths[number] = [p.decode() for p in self._files[number]["img_path"][:, 0]]
            f = self._files[number]
            ordered = sorted(set(row for row, _ in wanted))  # h5py reads increasing rows
            data = f["data"][ordered].astype(np.int64)
            at = {row: i for i, row in enumerate(ordered)}
            if self.features:
                stored = f[VISION_FEATURES][ordered]
                for row, position in wanted:
                    rows[position] = torch.from_numpy(data[at[row]])
                    features[position] = torch.from_numpy(stored[at[row]])
                continue
            paths = self._paths[number]
            for row, position in wanted:
                rows[position] = torch.from_numpy(data[at[row]])
                relative = paths[row]
                images[position] = (
                    black_image(self._target_side)
                    if relative == TEXT_ONLY
                    else self._load_image(self.sources[number].image_root / relative)
                )
        if self.features:
            return [
                {"rows": row, "vision_features": feature}
                for row, feature in zip(rows, features, strict=True)
                if row is not None and feature is not None
            ]
        pixels = self.image_processor(
            images=images, return_tensors="pt", input_data_format="channels_last"
        )["pixel_values"]
        return [
            {"rows": row, "pixel_values": pixels[i]}
            for i, row in enumerate(rows)
            if row is not None
        ]

    def _load_image(self, path: Path) -> np.ndarray:
        return load_image(path, self._target_side)
