"""Session fixtures: a copy of model_repository/ with tiny weights, served by a real tritonserver."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.triton import TritonClient
from deploy.aws import package
from deploy.local.tritonserver import TritonServer, free_port
from env import build
from sdmme.spec import MODELS
from sdmme.tools import weights

ROOT = Path(__file__).resolve().parent.parent


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Marks a test whose body failed (item.failed_call), for fixtures that keep evidence of it."""
    outcome = yield
    if call.when == "call" and outcome.get_result().failed:
        item.failed_call = True


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
def packed_env():
    """env/sd_env/ (cpu flavor) as `make env` leaves it: built when missing, rebuilt when its inputs
    changed (sdmme's code among them), else as it is. A stale one packed an older sdmme into the tests'
    archives, and failed the rebuild test with nothing but two hashes."""
    subprocess.run(["make", "--no-print-directory", "env", "ENV_FLAVOR=cpu"], cwd=ROOT, check=True)
    return build.OUTPUT, build.verified_manifest(build.OUTPUT)


@pytest.fixture(scope="session")
def dist(tiny_repository, packed_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    package.package(tiny_repository, sorted(MODELS), out, packed_env[0])
    return out


@pytest.fixture(scope="session")
def moto_url():
    """moto's S3 and SageMaker APIs as a real HTTP server on loopback."""
    import moto_sagemaker
    from moto.server import ThreadedMotoServer

    moto_sagemaker.install()
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def point_aws_at(moto_url: str, patch: pytest.MonkeyPatch) -> None:
    """AWS settings pointing boto3 at moto (AWS_ENDPOINT_URL, as a user would for a local S3)."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_url,
    }.items():
        patch.setenv(key, value)


def remove_bucket(s3, bucket: str) -> None:
    """Delete a bucket and its objects: moto keeps every object's bytes on disk until then."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


@pytest.fixture()
def aws(moto_url, monkeypatch):
    point_aws_at(moto_url, monkeypatch)
    return moto_url


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
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def get(server, path: str) -> dict:
    with urllib.request.urlopen(f"http://{server.url}{path}", timeout=30) as response:
        return json.loads(response.read())
