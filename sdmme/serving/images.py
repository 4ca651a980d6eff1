"""Base64 image decoding as a person expects, with limits checked before pixels are decoded; encoding.

Decoding applies the EXIF orientation (the picture as displayed), scales 16-bit images to 8 bits,
and composites transparency on white: for `image` a transparent area is white, for `mask_image` it
is repainted (as in other image-editing APIs). Any failure is an InvalidInput naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from sdmme.spec import InvalidInput

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# Largest side each output format can encode (Pillow's WebP encoder refuses more; JPEG's header is 16-bit).
MAX_SIDE = {"webp": 16383, "jpeg": 65535, "png": 2**31 - 1}
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,")


def _raw(field: str, data: Union[bytes, str]) -> bytes:
    """Standard base64, also MIME-style (line breaks) or as a data: URL."""
    if isinstance(data, bytes):
        data = data.decode("ascii", errors="replace")
    text = "".join(_DATA_URL.sub("", data.strip()).split())
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"{field} is not valid base64 ({e})") from None
    if not raw:
        raise InvalidInput(f"{field} is empty; send a base64-encoded PNG, JPEG or WebP image")
    return raw


def _open(field: str, raw: bytes, max_pixels: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise InvalidInput(
            f"{field} is too large ({e}); this model accepts at most {max_pixels} pixels"
        ) from None
    except Exception as e:  # Pillow raises many kinds for malformed headers
        raise InvalidInput(f"{field} is not a PNG, JPEG or WebP image ({type(e).__name__}: {e})") from None


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grey to 8 bits by scaling (a plain convert clips everything above 255 to white)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8), "L")
    return image


def _flatten(image: Image.Image) -> Image.Image:
    """Transparency composited on white; palette, grey and CMYK images to RGB."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def decode(
    field: str, data: Union[bytes, str], max_pixels: int, min_side: int, mode: str = "RGB"
) -> Image.Image:
    """Decode a base64 PNG/JPEG/WebP into a PIL image of `mode`, sized down to a multiple of 8."""
    image = _open(field, _raw(field, data), max_pixels)
    width, height = image.size  # from the header: nothing decoded yet (a rotation changes neither check)
    if width * height > max_pixels:
        raise InvalidInput(
            f"{field} is {width}x{height} ({width * height} pixels); this model accepts at most "
            f"{max_pixels} pixels (e.g. {int(max_pixels**0.5)}x{int(max_pixels**0.5)})"
        )
    if min(width, height) < min_side:
        raise InvalidInput(f"{field} is {width}x{height}; both sides must be at least {min_side} pixels")
    try:
        image.load()  # truncated or corrupt data shows only now
        image = _eight_bit(ImageOps.exif_transpose(image))
        image = _flatten(image).convert(mode)
    except Exception as e:
        raise InvalidInput(f"{field} could not be decoded ({type(e).__name__}: {e})") from None
    width, height = image.size  # as displayed
    size = (max(8, width // 8 * 8), max(8, height // 8 * 8))
    return image if size == image.size else image.resize(size, Image.LANCZOS)


def encode(image: Image.Image, output_format: str, quality: int) -> bytes:
    """The image file in the requested format (the AWS sample decodes with PIL, any format)."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=output_format.upper(), quality=quality)
    return buffer.getvalue()
