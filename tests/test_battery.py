"""A property-based battery against the real server, all four models: whatever a caller sends gets a
4xx naming the problem or valid images, never a 5xx, and a good request succeeds right after.

Random and adversarial gen_args (types, NaN/inf, huge numbers, nesting, unknown and duplicate keys),
random and truncated bytes as images, extreme sizes and aspect ratios, odd image modes, empty, huge and
non-UTF-8 prompts, missing and extra inputs, batch dimensions above 1. Bounded: a valid request runs
at most 3 steps at a small size, so the battery takes a few minutes on 2 cores.
"""

import base64
import io
import json

import numpy as np
import pytest
from helpers import b64, post
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdmme.spec import MAX_PROMPT_CHARS, MODELS

EXAMPLES = 30  # per model

huge_ints = st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), st.just(10**400))
odd_floats = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e308, -0.0, 0.5, 1e-300])
json_leaves = st.one_of(st.none(), st.booleans(), st.text(max_size=20), huge_ints, odd_floats)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def param_value(name: str):
    """A valid-but-cheap value, or an adversarial one, for a known gen_args key."""
    cheap = {
        "num_inference_steps": st.integers(1, 3),
        "height": st.sampled_from([64, 72]),
        "width": st.sampled_from([64, 72]),
        "num_images_per_prompt": st.integers(1, 2),
        "seed": st.one_of(st.none(), st.integers(0, 2**32 - 1)),
        "guidance_scale": st.floats(0, 30),
        "strength": st.floats(0.5, 1.0),
        "noise_level": st.integers(0, 350),
        "quality": st.integers(1, 100),
        "scheduler": st.sampled_from(
            ["default", "ddim", "euler", "euler_a", "dpm++", "unipc", "pndm", "plms"]
        ),
        "output_format": st.sampled_from(["jpeg", "png", "webp", "gif"]),
    }
    return st.one_of(cheap.get(name, st.nothing()), json_values) if name in cheap else json_values


@st.composite
def gen_args_text(draw, model: str):
    kind = draw(st.sampled_from(["object", "object", "object", "raw", "duplicate", "nested"]))
    if kind == "raw":
        return draw(
            st.one_of(st.text(max_size=50), st.sampled_from(["[" * 3000, "{", "null", "[]", '"x"', "NaN"]))
        )
    if kind == "nested":
        return "[" * draw(st.integers(1, 3000)) + "]" * draw(st.integers(0, 10))
    args = {"num_inference_steps": 2}  # img2img runs steps x strength (0.8): 2 runs one
    if "height" in MODELS[model].params_by_name:
        args.update(height=64, width=64)
    names = list(MODELS[model].params_by_name) + ["steps", "prompt", "output_type", ""]
    for name in draw(st.lists(st.sampled_from(names), max_size=4)):
        args[name] = draw(param_value(name))
    # a strength too small for the steps is valid input to refuse; keep what runs cheap
    text = json.dumps(args, allow_nan=True)
    if kind == "duplicate":
        text = text[:-1] + ', "num_inference_steps": 2}'
    return text


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


FORMATS = {  # image mode -> the formats that can store it
    "RGB": ["PNG", "JPEG", "WEBP"],
    "L": ["PNG", "JPEG", "WEBP"],
    "1": ["PNG"],
    "LA": ["PNG"],
    "RGBA": ["PNG", "WEBP"],
    "P": ["PNG"],
    "I;16": ["PNG"],
    "CMYK": ["JPEG"],
}


@st.composite
def image_text(draw) -> str:
    kind = draw(st.sampled_from(["image", "image", "truncated", "random", "not base64", "empty"]))
    if kind == "random":
        return b64(draw(st.binary(max_size=200)))
    if kind == "not base64":
        return draw(st.text(max_size=30))
    if kind == "empty":
        return ""
    width = draw(st.sampled_from([1, 7, 16, 33, 64, 96, 2000]))
    height = draw(st.sampled_from([1, 8, 31, 64, 80, 1500]))
    mode = draw(st.sampled_from(sorted(FORMATS)))
    fmt = draw(st.sampled_from(FORMATS[mode]))
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    base = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    image = (
        Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
        if mode == "I;16"
        else base.convert(mode)
    )
    data = encoded(image, fmt)
    if kind == "truncated":
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
    return b64(data)


def prompt_value():
    return st.one_of(
        st.text(max_size=100),
        st.just(""),
        st.just("x " * (MAX_PROMPT_CHARS // 2 + 10)),
        st.just("a lighthouse " * 40),
        st.binary(max_size=20).map(lambda b: b + b"\xff\xfe"),  # not UTF-8
    )


@st.composite
def request(draw, model: str) -> dict:
    spec = MODELS[model]
    values = {"prompt": draw(prompt_value())}
    if draw(st.booleans()):
        values["negative_prompt"] = draw(prompt_value())
    for name in spec.image_inputs:
        values[name] = draw(image_text())
    values["gen_args"] = draw(gen_args_text(model))
    if draw(st.integers(0, 9)) == 0:
        del values[draw(st.sampled_from(sorted(values)))]  # a missing input
    if draw(st.integers(0, 9)) == 0:
        values[draw(st.sampled_from(["extra", "image", "mask_image"]))] = "x"  # an extra input
    inputs = []
    for name, value in values.items():
        data = [value.decode("latin-1") if isinstance(value, bytes) else value]
        shape = [1, 1]
        if draw(st.integers(0, 14)) == 0:
            data, shape = data * 2, [2, 1]  # a batch dimension above 1
        inputs.append({"name": name, "shape": shape, "datatype": "BYTES", "data": data})
    return {"inputs": inputs}


def good(model: str) -> dict:
    values = {"prompt": "a lighthouse", "gen_args": json.dumps({"num_inference_steps": 2})}
    picture = b64(encoded(Image.new("RGB", (64, 64), (120, 130, 140)), "PNG"))
    for name in MODELS[model].image_inputs:
        values[name] = picture
    return {
        "inputs": [{"name": k, "shape": [1, 1], "datatype": "BYTES", "data": [v]} for k, v in values.items()]
    }


def check_answer(status: int, body: dict) -> None:
    assert status < 500, (status, body)
    if status == 200:
        output = {o["name"]: o for o in body["outputs"]}["generated_image"]
        for item in output["data"]:
            Image.open(io.BytesIO(base64.b64decode(item))).load()  # a valid image
    else:
        assert 400 <= status < 500 and body.get("error"), (status, body)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_battery(server, model):
    path = f"/v2/models/{model}/infer"

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(body=request(model))
    def property(body):
        check_answer(*post(server, path, body))
        status, answer = post(server, path, good(model))
        assert status == 200, answer

    property()
