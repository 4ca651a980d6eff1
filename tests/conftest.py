"""Session fixtures: a copy of model_repository/ with tiny weights, served by a real tritonserver."""

from __future__ import annotations

import base64
import io
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.triton import TritonClient
from deploy.tritonserver import TritonServer
from sdmme import weights
from sdmme.spec import MODELS

ROOT = Path(__file__).resolve().parent.parent


def copy_repository(dest: Path) -> Path:
    """model_repository/ without its weights (a user's real weights never reach the tests)."""
    shutil.copytree(ROOT / "model_repository", dest, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    return dest


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory) -> Path:
    repository = copy_repository(tmp_path_factory.mktemp("repo") / "model_repository")
    for model in MODELS:
        weights.fill(repository, model, "tiny")
    return repository


@pytest.fixture(scope="session")
def server(tiny_repository, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("logs") / "tritonserver.log"
    with TritonServer(tiny_repository, log_file=log_file) as server:
        yield server


@pytest.fixture(scope="session")
def client(server) -> TritonClient:
    return TritonClient(server.url)


def picture(width: int, height: int, seed: int = 0, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    """Encoded image file of random pixels."""
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sample_payload(**values: str) -> dict:
    """The AWS sample's body: every input a BYTES tensor of shape [1, 1]."""
    return {
        "inputs": [{"name": k, "shape": [1, 1], "datatype": "BYTES", "data": [v]} for k, v in values.items()]
    }


def post(server, path: str, body: dict) -> tuple:
    """Raw HTTP POST; returns (status, decoded JSON body)."""
    request = urllib.request.Request(
        f"http://{server.url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(server, path: str) -> dict:
    with urllib.request.urlopen(f"http://{server.url}{path}", timeout=30) as response:
        return json.loads(response.read())
