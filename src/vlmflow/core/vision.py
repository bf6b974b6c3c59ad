"""Images as the vision tower sees them, and the tower itself: shared by training (its
data loader) and the h5 stage (precomputed vision features), so both decode alike."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from vlmflow.core.models import pretrained


def load_image(path: Path, side: int) -> np.ndarray:
    """An RGB image (H, W, 3 uint8) for a processor that resizes to ``side``.

    JPEG decodes at 1/2, 1/4 or 1/8 scale when that still leaves ``side`` pixels (DCT
    scaling: no detail is lost that the resize would keep), with simplejpeg: the pixels
    of Pillow's draft mode at less than half the cost per image. Other formats, and
    CMYK JPEGs (Pillow converts them to RGB its own way), go through Pillow."""
    data = path.read_bytes()
    if simplejpeg.is_jpeg(data):
        try:
            colorspace = simplejpeg.decode_jpeg_header(data)[2]
            if colorspace not in ("CMYK", "YCCK"):
                return simplejpeg.decode_jpeg(
                    data, colorspace="RGB", min_height=side, min_width=side
                )
        except ValueError:  # a JPEG libjpeg-turbo rejects: Pillow says what is wrong
            pass
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (side, side))
        return np.asarray(img.convert("RGB"))


def black_image(side: int) -> np.ndarray:
    """What a text-only sample (img_path ``None``) is fed: its rows keep the patch slots."""
    side = min(side, 1024)  # processor_side's "unknown" is huge; the processor resizes anyway
    return np.zeros((side, side, 3), dtype=np.uint8)


def processor_side(image_processor: Any) -> int:
    """The side an image processor resizes images to (for JPEG draft decoding)."""
    sides = [
        getattr(getattr(image_processor, name, None), key, None)
        for name in ("size", "crop_size")
        for key in ("shortest_edge", "height", "width", "longest_edge")
    ]
    known = [int(side) for side in sides if isinstance(side, int)]
    return max(known) if known else 1 << 16


def vision_model(vision_tower: str) -> Any:
    """The vision tower of a CLIP-style checkpoint (the vision half of a full CLIP)."""
    from transformers import AutoConfig, AutoModel, CLIPVisionModel

    config = AutoConfig.from_pretrained(**pretrained(vision_tower))
    if hasattr(config, "vision_config"):  # a full CLIP checkpoint: keep its vision half
        return CLIPVisionModel.from_pretrained(**pretrained(vision_tower))
    return AutoModel.from_pretrained(**pretrained(vision_tower))
