"""Decoding, EXIF rotation, RGB, resizing (vlmflow.stages.ingest.resize) and re-encoding."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from vlmflow.core.io import jpeg_bytes
from vlmflow.stages.ingest.settings import ENCODE_FORMATS, Failure, IngestSettings

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class StoredImage:
    data: bytes  # encoded as settings.encode_format
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited on white (JPEG has no alpha)."""
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")


def process_image(data: bytes, settings: IngestSettings) -> StoredImage:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise Failure("too_large", str(exc)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise Failure("not_image", str(exc)) from None
    with image:
        # Image.open only parsed the header: check the size before decoding any pixels.
        width, height = image.size
        if width * height > settings.max_pixels:
            raise Failure("too_large", f"{width}x{height} pixels > max_pixels")
        if min(width, height) < settings.min_side:
            raise Failure("too_small", f"{width}x{height}, min_side {settings.min_side}")
        try:
            # JPEG only: decode at the smallest DCT scale (1/2 .. 1/8) that still leaves
            # at least the pixels of the resized image: far less work for large photos.
            # (EXIF rotation swaps the axes; the bound is symmetric.)
            image.draft("RGB", settings.resize.decode_size(width, height))
            image.load()
            upright = ImageOps.exif_transpose(image)
            # Orientations 5-8 swap the axes; report the original size as displayed so
            # that it has the same aspect as width/height.
            swapped = upright.size != image.size
            rgb = _to_rgb(upright)
        except Image.DecompressionBombError as exc:
            raise Failure("too_large", str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise Failure("decode_error", str(exc)) from None
    original_width, original_height = (height, width) if swapped else (width, height)
    rgb = settings.resize(rgb)
    return StoredImage(
        data=_encode(rgb, settings),
        ext=settings.encode_format,
        width=rgb.width,
        height=rgb.height,
        original_width=original_width,
        original_height=original_height,
    )


def _encode(image: Image.Image, settings: IngestSettings) -> bytes:
    if settings.encode_format == "jpg":
        return jpeg_bytes(image, quality=settings.jpeg_quality)
    buffer = io.BytesIO()
    image.save(buffer, format=ENCODE_FORMATS[settings.encode_format], quality=settings.webp_quality)
    return buffer.getvalue()
