"""Session fixtures (the default models with tiny weights, a real tritonserver serving them, the packed
environment, moto), and the two lanes: `make test-fast` runs what needs none of a server, moto, a
browser or a packed environment; `make test` runs everything. Helpers tests import are in helpers.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import ROOT, copy_repository, point_aws_at

from client.triton import TritonClient
from deploy.aws import package
from deploy.local.tritonserver import TritonServer, free_port
from env import build
from sdmme.spec import MODELS
from sdmme.tools import weights

# What puts a test in the slow lane (`server`): a fixture that starts a tritonserver, moto, a browser or
# builds the packed environment. A test that starts one itself is marked `server`; one that needs none
# but compiles with inductor for a minute or more on 2 cores is marked `slow`.
SLOW_FIXTURES = {"server", "client", "packed_env", "dist", "moto_url", "aws", "served", "observed", "limited"}
FAST_LANE = os.environ.get("SDMME_TEST_LANE") == "fast"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.server)


@pytest.fixture(autouse=True, scope="session")
def _fast_lane_starts_no_server():
    """In the fast lane, a test that starts tritonserver fails naming the marker it lacks: the lane
    stays what it says."""
    if not FAST_LANE:
        yield
        return
    original = TritonServer.__enter__

    def refuse(self):
        raise AssertionError("this test starts tritonserver: mark it `server` (pytestmark or a marker)")

    TritonServer.__enter__ = refuse
    yield
    TritonServer.__enter__ = original


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Marks a test whose body failed (item.failed_call), for fixtures that keep evidence of it."""
    outcome = yield
    if call.when == "call" and outcome.get_result().failed:
        item.failed_call = True


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
        server.repository = tiny_repository
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


@pytest.fixture()
def aws(moto_url, monkeypatch):
    point_aws_at(moto_url, monkeypatch)
    return moto_url


@pytest.fixture(scope="session")
def client(server) -> TritonClient:
    return TritonClient(server.url)
