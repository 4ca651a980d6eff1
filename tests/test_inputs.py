"""Hostile and unusual input: each problem fails its own request alone with a 400 naming it, images are
decoded as a person sees them, and a caller's text never changes the status behind SageMaker."""

import base64
import io
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from helpers import b64, picture, post, sample_payload
from PIL import Image

from sdmme.serving import images
from sdmme.spec import MAX_PROMPT_CHARS, InvalidInput, caller_safe

FAST = {"num_inference_steps": 2}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb(width: int = 60000, height: int = 60000) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def corrupt_png() -> bytes:
    """A valid header with pixel data that does not inflate: it fails only when the pixels are read."""
    data = bytearray(picture(64, 64))
    start = data.index(b"IDAT") + 4
    data[start + 10 : start + 40] = b"\xff" * 30
    return bytes(data)


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def decode(data: bytes, mode: str = "RGB", min_side: int = 8, max_pixels: int = 2**20) -> Image.Image:
    return images.decode("image", b64(data), max_pixels, min_side, mode)


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (64, 32), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 32, 32))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    image = decode(encoded(stored, "JPEG", exif=exif, quality=95))
    assert image.size == (32, 64)  # as displayed
    top, bottom = image.getpixel((16, 8)), image.getpixel((16, 56))
    assert top[2] > 200 and bottom[0] > 200  # the stored left half is now on top


def test_sixteen_bit_grey_is_scaled_not_saturated():
    values = np.full((32, 32), 30000, dtype=np.uint16)
    image = decode(encoded(Image.fromarray(values)))
    assert image.mode == "RGB" and abs(image.getpixel((0, 0))[0] - 30000 / 257) <= 1


def test_transparency_is_composited_on_white_and_a_mask_alpha_is_honoured():
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert decode(encoded(clear)).getpixel((0, 0)) == (255, 255, 255)
    mask = Image.new("LA", (32, 32), (0, 255))  # black, opaque: keep
    mask.paste((0, 0), (0, 0, 16, 32))  # left half transparent: repaint
    decoded = decode(encoded(mask), mode="L")
    assert decoded.getpixel((4, 4)) == 255 and decoded.getpixel((28, 4)) == 0
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert decode(encoded(palette)).getpixel((0, 0)) == (10, 20, 30)


def test_mime_base64_and_data_urls_are_accepted():
    data = picture(32, 32)
    mime = base64.encodebytes(data).decode()  # line breaks every 76 characters, as `base64` writes
    assert "\n" in mime and images.decode("image", mime, 2**20, 8).size == (32, 32)
    url = "data:image/png;base64," + b64(data)
    assert images.decode("image", url, 2**20, 8).size == (32, 32)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bomb(), "image is too large"),
        (corrupt_png(), "image could not be decoded"),
        (b"GIF89a" + b"\x00" * 20, "image is not a PNG, JPEG or WebP image"),
    ],
)
def test_undecodable_images_are_invalid_input(data, message):
    with pytest.raises(InvalidInput, match=message):
        decode(data)


def test_minimum_side_comes_from_the_model():
    assert decode(picture(16, 16), min_side=8).size == (16, 16)
    with pytest.raises(InvalidInput, match="both sides must be at least 64"):
        decode(picture(32, 80), min_side=64)


def payload(model: str, **values) -> dict:
    values.setdefault("prompt", "a")
    values.setdefault("gen_args", json.dumps(FAST))
    if model != "sd_base":
        values.setdefault("image", b64(picture(64, 64)))
    if model == "sd_inpaint":
        values.setdefault("mask_image", b64(picture(64, 64, mode="L")))
    return sample_payload(**values)


HOSTILE = [
    ("sd_depth", {"image": b64(bomb())}, "image is too large"),
    ("sd_depth", {"image": b64(corrupt_png())}, "image could not be decoded"),
    ("sd_base", {"gen_args": "[" * 100000}, "gen_args has 100000 characters"),
    ("sd_base", {"gen_args": "[" * 4000}, "gen_args is not valid JSON (nested too deeply)"),
    ("sd_base", {"gen_args": '{"seed": ' + "9" * 4000 + "}"}, "gen_args.seed=99999999999999999999999999"),
    ("sd_base", {"gen_args": '{"seed": 1, "seed": 2}'}, "gen_args names 'seed' more than once"),
    ("sd_base", {"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, f"at most {MAX_PROMPT_CHARS} are accepted"),
    ("sd_base", {"negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt has"),
    (
        "sd_depth",
        {"image": b64(picture(16400, 32)), "gen_args": json.dumps({"output_format": "webp", **FAST})},
        "output_format webp encodes at most 16383 pixels a side",
    ),
    ("sd_depth", {"image": b64(picture(8, 64))}, "both sides must be at least 16"),
]


@pytest.mark.parametrize(("model", "values", "message"), HOSTILE, ids=[m for _, _, m in HOSTILE])
def test_hostile_input_fails_alone_with_a_400(server, model, values, message):
    """Sent together with good requests: only the bad one fails, with a 400 that names the problem."""
    good = payload("sd_base", gen_args=json.dumps({"height": 64, "width": 64, **FAST}))
    bodies = [good, payload(model, **values), good]
    paths = ["/v2/models/sd_base/infer", f"/v2/models/{model}/infer", "/v2/models/sd_base/infer"]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda item: post(server, *item), zip(paths, bodies)))
    assert results[1][0] == 400 and message in results[1][1]["error"], results[1]
    assert len(results[1][1]["error"]) < 400  # nothing a caller sent is echoed at length
    assert [results[0][0], results[2][0]] == [200, 200]


def test_small_image_to_the_upscaler_and_mime_base64(server):
    mime = base64.encodebytes(picture(16, 16)).decode()
    status, body = post(server, "/v2/models/sd_upscale/infer", payload("sd_upscale", image=mime))
    assert status == 200, body
    assert Image.open(io.BytesIO(base64.b64decode(body["outputs"][0]["data"][0]))).size == (64, 64)


def test_long_prompt_is_served_and_its_truncation_reported(server, client):
    prompt = "a lighthouse on a cliff at dawn, " * 20  # far over 77 tokens
    [image] = client.txt2img(prompt, height=64, width=64, **FAST)
    assert image.size == (64, 64)
    assert len(client.warnings) == 1 and "the text encoder reads the first 77" in client.warnings[0]
    status, body = post(server, "/v2/models/sd_base/infer", payload("sd_base", prompt=prompt))
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["generated_image"]  # the AWS format
    client.txt2img("short", height=64, width=64, **FAST)
    assert client.warnings == []


def test_caller_text_loses_the_words_that_make_sagemaker_answer_507():
    # the markers measured on tritonserver 2.51 (sdmme/spec.py); test_mme shows it end to end
    markers = ["OOM", "MemoryError", "OutOfMemory", "out of memory", "Out of memory", "Out Of Memory"]
    markers += ["CUBLAS_STATUS_ALLOC_FAILED", "No space left on device"]
    for marker in markers:
        assert marker not in caller_safe(f"gen_args.scheduler='{marker}' is not one of default, ddim")
