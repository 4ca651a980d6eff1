"""The four models on a real tritonserver, through the client and through raw HTTP."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import ROOT, b64, picture, post, sample_payload
from PIL import Image

from bench import serving
from client import ModelError
from client.base import request_body
from client.triton import TritonClient
from deploy.local.tritonserver import free_port
from sdmme.spec import MODELS, SCHEDULERS

FAST = {"num_inference_steps": 2}


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def sizes(images):
    return [im.size for im in images]


def test_each_model_through_the_client(client):
    assert sizes(client.txt2img("a cat", height=64, width=96, **FAST)) == [(96, 64)]
    assert sizes(client.depth(picture(80, 64), "a cat", **FAST)) == [(80, 64)]
    assert sizes(client.inpaint(picture(64, 64), picture(64, 64, mode="L"), "a cat", **FAST)) == [(64, 64)]
    assert sizes(client.upscale(picture(32, 40), "a cat", **FAST)) == [(128, 160)]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_aws_sample_payload(server, model):
    values = {"prompt": "a photo of an astronaut", "negative_prompt": "blurry"}
    if "image" in MODELS[model].image_inputs:
        values["image"] = b64(picture(64, 64, fmt="JPEG"))
    if "mask_image" in MODELS[model].image_inputs:
        values["mask_image"] = b64(picture(64, 64))
    values["gen_args"] = json.dumps(
        {"num_inference_steps": 2, "guidance_scale": 7, "seed": 1, "height": 64, "width": 64}
        if model == "sd_base"
        else {"num_inference_steps": 2, "seed": 1}
    )
    status, body = post(server, f"/v2/models/{model}/infer", sample_payload(**values))
    assert status == 200, body
    output = body["outputs"][0]
    assert output["name"] == "generated_image" and output["datatype"] == "BYTES" and output["shape"] == [1, 1]
    image = Image.open(io.BytesIO(base64.b64decode(output["data"][0])))
    assert image.format == "JPEG" and image.size[0] >= 64


def test_seed_determinism(client):
    first = client.generate("sd_base", "a cat", seed=11, height=64, width=64, output_format="png", **FAST)
    again = client.generate("sd_base", "a cat", seed=11, height=64, width=64, output_format="png", **FAST)
    other = client.generate("sd_base", "a cat", seed=12, height=64, width=64, output_format="png", **FAST)
    assert first == again and first != other


def test_num_images_per_prompt_uses_consecutive_seeds(client):
    many = client.generate(
        "sd_depth",
        "a",
        images={"image": picture(64, 64)},
        seed=3,
        num_images_per_prompt=3,
        output_format="png",
        **FAST,
    )
    assert len(many) == 3 and len(set(many)) == 3
    second = client.generate(
        "sd_depth", "a", images={"image": picture(64, 64)}, seed=4, output_format="png", **FAST
    )
    # image i uses seed + i; batched and single runs may differ by one level of 255 (FACTS.md)
    difference = np.abs(pixels(second[0]) - pixels(many[1]))
    assert difference.max() <= 2 and np.abs(pixels(second[0]) - pixels(many[0])).max() > 2


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler(client, model, scheduler):
    images = {
        name: picture(32, 32, mode="L" if name == "mask_image" else "RGB")
        for name in MODELS[model].image_inputs
    }
    size = {"height": 64, "width": 64} if model == "sd_base" else {}
    out = client.generate(model, "x", images=images, scheduler=scheduler, num_inference_steps=3, **size)
    assert len(out) == 1 and Image.open(io.BytesIO(out[0])).size[0] in (32, 64, 128)


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_formats(client, fmt, pil_format):
    [data] = client.generate("sd_base", "a", height=64, width=64, output_format=fmt, quality=50, **FAST)
    assert Image.open(io.BytesIO(data)).format == pil_format


def test_concurrent_requests_are_batched(server):
    bodies = [
        sample_payload(
            prompt=f"prompt {i}", gen_args=json.dumps({"seed": i, "height": 64, "width": 64, **FAST})
        )
        for i in range(6)
    ]
    before = serving.model_stats(server.url)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda body: post(server, "/v2/models/sd_base/infer", body), bodies))
    after = serving.counted(server.url, "sd_base", before, 6)
    assert [status for status, _ in results] == [200] * 6
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == 6 and executions < inferences, (inferences, executions)


BAD_INPUTS = [
    ("sd_base", {"gen_args": json.dumps({"steps": 2})}, "unknown gen_args key(s) steps"),
    (
        "sd_base",
        {"gen_args": json.dumps({"num_inference_steps": "2"})},
        "gen_args.num_inference_steps must be int",
    ),
    (
        "sd_base",
        {"gen_args": json.dumps({"num_images_per_prompt": 5})},
        "gen_args.num_images_per_prompt=5 is out of range",
    ),
    ("sd_base", {"gen_args": json.dumps({"height": 100})}, "multiple of 8"),
    ("sd_base", {"gen_args": json.dumps({"scheduler": "lms"})}, "gen_args.scheduler='lms' is not one of"),
    ("sd_base", {"gen_args": "{not json"}, "gen_args is not valid JSON"),
    ("sd_base", {"gen_args": "[1, 2]"}, "gen_args must be a JSON object"),
    ("sd_depth", {"image": "not base64!"}, "image is not valid base64"),
    ("sd_depth", {"image": b64(b"plain text, not an image")}, "image is not a PNG, JPEG or WebP image"),
    (
        "sd_upscale",
        {"image": b64(picture(520, 520))},
        "image is 520x520 (270400 pixels); this model accepts at most 262144",
    ),
    ("sd_depth", {"image": b64(picture(8, 64))}, "both sides must be at least 16"),  # tiny UNet: 2 levels
    (
        "sd_inpaint",
        {"image": b64(picture(64, 64)), "mask_image": b64(picture(72, 64))},
        "mask_image must have the size of image: got mask 72x64 for image 64x64",
    ),
    (
        "sd_depth",
        {"image": b64(picture(64, 64)), "gen_args": json.dumps({"strength": 0.2, "num_inference_steps": 2})},
        "num_inference_steps * gen_args.strength must be at least 1",
    ),
    ("sd_base", {"image": b64(picture(64, 64))}, "unexpected inference input 'image'"),
    ("sd_depth", {}, "missing required input(s) ['image']"),
]


@pytest.mark.parametrize(("model", "values", "message"), BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_input_is_a_400_naming_the_problem(server, client, model, values, message):
    status, body = post(server, f"/v2/models/{model}/infer", sample_payload(prompt="a", **values))
    assert status == 400 and message in body["error"], body
    assert sizes(client.txt2img("still serving", height=64, width=64, **FAST)) == [(64, 64)]


def test_batched_request_shape_is_refused(server):
    body = sample_payload(prompt="a")
    body["inputs"][0].update(shape=[2, 1], data=["a", "b"])
    status, answer = post(server, "/v2/models/sd_base/infer", body)
    assert status == 400 and "one prompt per request" in answer["error"]


def test_mixed_batch_returns_the_good_requests(server):
    good = sample_payload(
        prompt="good", gen_args=json.dumps({"num_inference_steps": 2, "height": 64, "width": 64})
    )
    bad = sample_payload(prompt="bad", gen_args=json.dumps({"guidance_scale": 99}))
    before = serving.model_stats(server.url)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda body: post(server, "/v2/models/sd_base/infer", body), [good, bad] * 3))
    after = serving.counted(server.url, "sd_base", before, 3)  # the good ones, with their execute() calls
    assert [status for status, _ in results] == [200, 400] * 3
    assert all("gen_args.guidance_scale=99" in body["error"] for _, body in results[1::2])
    assert after["execution_count"] - before["execution_count"] < 3  # good and bad shared execute() calls


def test_client_raises_model_error(client):
    with pytest.raises(ModelError) as e:
        client.upscale(picture(64, 64), noise_level=351)
    assert e.value.status == 400 and "gen_args.noise_level=351" in e.value.message


@pytest.mark.server
def test_make_serve_command_serves_the_aws_payload(tiny_repository):
    """`make serve` runs `python -m deploy.local.tritonserver`: the same server, in the foreground."""
    ports = [free_port() for _ in range(3)]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deploy.local.tritonserver",
            "--model-repository",
            str(tiny_repository),
            "--http-port",
            str(ports[0]),
            "--grpc-port",
            str(ports[1]),
            "--metrics-port",
            str(ports[2]),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = SimpleNamespace(url=f"127.0.0.1:{ports[0]}")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://{server.url}/v2/models/sd_upscale/ready", timeout=5
                ) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        payload = sample_payload(prompt="a", image=b64(picture(32, 32)), gen_args=json.dumps(FAST))
        status, body = post(server, "/v2/models/sd_upscale/infer", payload)
        assert status == 200 and body["outputs"][0]["shape"] == [1, 1]
    finally:
        os.killpg(process.pid, signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
    assert f"on http://127.0.0.1:{ports[0]}" in output


def test_binary_transport_gives_the_same_image_files(server, client):
    """Opt-in binary tensors: the files themselves; a request naming no output still gets base64."""
    args = {"seed": 3, "height": 64, "width": 64, "output_format": "png", **FAST}
    expected = client.generate("sd_base", "a", **args)
    binary = TritonClient(server.url, binary=True)
    assert binary.generate("sd_base", "a", **args) == expected
    status, body = post(server, "/v2/models/sd_base/infer", request_body("a", None, {}, args))
    assert status == 200 and [o["name"] for o in body["outputs"]] == ["generated_image"]
