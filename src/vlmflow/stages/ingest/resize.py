"""How ingest resizes images: img2dataset's vocabulary, and the names vlmflow used before.

Users bring img2dataset commands along (``--resize_mode keep_ratio --image_size 512
--resize_only_if_bigger``), so the words mean what they mean there:

* ``keep_ratio``: scale so the *shorter* side is ``image_size``;
* ``keep_ratio_largest``: scale so the *longer* side is ``image_size``;
* ``center_crop``: as keep_ratio, then the middle ``image_size`` square;
* ``border``: as keep_ratio_largest, then pad to an ``image_size`` square with white;
* ``no``: keep the size.

``resize_only_if_bigger`` leaves an image alone (no scaling, no crop, no border) when the
side that would be scaled is already at most ``image_size``.

The earlier vocabulary (``max_side`` with ``keep_ratio`` = longer side, never enlarged;
``pad`` = black border; ``none``) still works for one release, with a warning naming
the new words (:func:`legacy_resize`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from PIL import Image, ImageOps


class ResizeMode(StrEnum):
    keep_ratio = "keep_ratio"
    keep_ratio_largest = "keep_ratio_largest"
    center_crop = "center_crop"
    border = "border"
    no = "no"


# Earlier name -> (the mode, resize_only_if_bigger) it meant with max_side.
LEGACY_MODES = {
    "keep_ratio": (ResizeMode.keep_ratio_largest, True),
    "center_crop": (ResizeMode.center_crop, False),
    "pad": (ResizeMode.border, False),
    "none": (ResizeMode.no, False),
}
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


@dataclass(frozen=True)
class Resize:
    mode: ResizeMode
    size: int
    only_if_bigger: bool = False
    border_color: tuple[int, int, int] = WHITE

    def scaled_side(self, width: int, height: int) -> int | None:
        """The side that is scaled to ``size`` (None: the image is left as it is)."""
        if self.mode is ResizeMode.no:
            return None
        shorter = self.mode in (ResizeMode.keep_ratio, ResizeMode.center_crop)
        side = min(width, height) if shorter else max(width, height)
        if self.only_if_bigger and side <= self.size:
            return None
        return side

    def decode_size(self, width: int, height: int) -> tuple[int, int]:
        """The least size a decoder may reduce the image to (JPEG draft) before resizing."""
        side = self.scaled_side(width, height)
        scale = 1.0 if side is None else min(1.0, self.size / side)
        return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))

    def __call__(self, image: Image.Image) -> Image.Image:
        side = self.scaled_side(image.width, image.height)
        if side is None:
            return image
        square = (self.size, self.size)
        if self.mode is ResizeMode.center_crop:
            return ImageOps.fit(image, square, Image.Resampling.LANCZOS)
        if self.mode is ResizeMode.border:
            return ImageOps.pad(image, square, Image.Resampling.LANCZOS, color=self.border_color)
        scale = self.size / side
        new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if new_size == image.size:
            return image
        # reducing_gap: shrink by an integer factor first (cheap box filter) while the
        # image is still >= 2x the target, then Lanczos; indistinguishable in practice.
        return image.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=2.0)


DEFAULT_IMAGE_SIZE = 512


def resize_from_settings(
    mode: str, image_size: int | None, max_side: int | None, only_if_bigger: bool
) -> tuple[Resize, list[str]]:
    """The resize a config asks for, and a warning for each earlier name it still uses.

    With ``max_side`` (the earlier size key) ``keep_ratio`` keeps its earlier meaning (the
    longer side, never enlarged); with ``image_size`` it is img2dataset's (the shorter
    side). ``pad`` and ``none`` keep theirs either way. Raises ValueError naming the field.
    """
    warnings = []
    if max_side is not None:
        if image_size is not None:
            raise ValueError(
                "ingest.max_side and ingest.image_size are the same setting; keep image_size"
            )
        size = max_side
        if mode not in LEGACY_MODES:
            warnings.append(
                "ingest.max_side is now ingest.image_size (img2dataset's name); max_side "
                "will be removed in the next release"
            )
    else:
        size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if mode in LEGACY_MODES and (max_side is not None or mode in ("pad", "none")):
        return _legacy(mode, size, warnings)
    if mode not in ResizeMode.__members__:
        raise ValueError(
            f"ingest.resize_mode: {mode!r} is not one of {', '.join(ResizeMode.__members__)}"
        )
    return Resize(ResizeMode(mode), size, only_if_bigger), warnings


def _legacy(mode: str, size: int, warnings: list[str]) -> tuple[Resize, list[str]]:
    new_mode, only_if_bigger = LEGACY_MODES[mode]
    color = BLACK if mode == "pad" else WHITE
    new = f"resize_mode: {new_mode.value}, image_size: {size}, resize_only_if_bigger: " + (
        "true" if only_if_bigger else "false"
    )
    notes = {
        "keep_ratio": "; keep_ratio now sets the shorter side",
        "pad": "; border pads with white, pad padded with black",
    }
    warning = (
        f"ingest: resize_mode {mode!r} with max_side is the earlier vocabulary and will be "
        f"removed in the next release; write `{new}` (img2dataset's names"
        f"{notes.get(mode, '')})"
    )
    return Resize(new_mode, size, only_if_bigger, color), [*warnings, warning]
