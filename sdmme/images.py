"""Base64 image decoding with limits checked before pixels are decoded, and output encoding."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Union

from PIL import Image, UnidentifiedImageError

from sdmme.spec import InvalidInput

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE = 32


def decode(field: str, data: Union[bytes, str], max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode a base64 PNG/JPEG/WebP into a PIL image of `mode`, sized down to a multiple of 8."""
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"{field} is not valid base64 ({e})") from None
    if not raw:
        raise InvalidInput(f"{field} is empty; send a base64-encoded PNG, JPEG or WebP image")
    try:
        image = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, OSError) as e:
        raise InvalidInput(f"{field} is not a PNG, JPEG or WebP image ({e})") from None
    width, height = image.size  # read from the header: nothing decoded yet
    if width * height > max_pixels:
        raise InvalidInput(
            f"{field} is {width}x{height} ({width * height} pixels); this model accepts at most "
            f"{max_pixels} pixels (e.g. {int(max_pixels**0.5)}x{int(max_pixels**0.5)})"
        )
    if min(width, height) < MIN_SIDE:
        raise InvalidInput(f"{field} is {width}x{height}; both sides must be at least {MIN_SIDE} pixels")
    try:
        image = image.convert(mode)
    except (OSError, ValueError) as e:
        raise InvalidInput(f"{field} could not be decoded ({e})") from None
    size = (width // 8 * 8, height // 8 * 8)
    return image if size == image.size else image.resize(size, Image.LANCZOS)


def encode(image: Image.Image, output_format: str, quality: int) -> bytes:
    """The image file in the requested format (the AWS sample decodes with PIL, any format)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()
