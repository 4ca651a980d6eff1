"""What test modules share: building model folders, payloads and requests, waiting on conditions, steady
traffic. Fixtures live in conftest.py; everything a test imports lives here."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdmme import model_folder
from sdmme.spec import MODELS

ROOT = Path(__file__).resolve().parent.parent
RECOVERY_TARGET_S = 30.0  # a model that died serves again within this


def copy_repository(dest: Path) -> Path:
    """The four default models' folders as make weights writes them, without weights (a user's real
    weights never reach the tests)."""
    for kind in MODELS:
        model_folder.write(dest / kind, kind)
    return dest


def with_parameters(folder: Path, parameters: dict) -> None:
    """Settings added to a model folder's config.pbtxt, as an operator adds them."""
    config = folder / model_folder.CONFIG
    config.write_text(config.read_text() + model_folder.parameters_text(parameters))


def load_pipeline(spec, weights: Path, device, settings):
    """The pipeline of `spec` from a weights folder, with `settings` applied, through the one loader."""
    from sdmme import loader

    return loader.load(spec, weights.parent.parent, device, settings, weights=weights).pipeline


def small_job(model: str, steps: int = 1):
    """The warm-up request at the smallest size, `steps` denoising steps."""
    from sdmme.serving import batching

    return batching.warmup_job(MODELS[model], 32 if model == "sd_upscale" else 64, steps)


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


def wait_for(condition, timeout: float, what: str) -> None:
    """Returns once `condition()` holds; fails saying `what` did not happen within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def stub_pid(model_file: Path) -> int:
    """The process (the Python backend's stub) serving the model whose model.py is `model_file`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"triton_python_backend_stub" in command[0] and str(model_file).encode() in command[1]:
            return int(entry.name)
    raise LookupError(f"no stub process for {model_file}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def wait_until_computing(model_file: Path, timeout: float = 60.0) -> None:
    """Returns once the model's process has computed for 0.3 s of CPU since the call: a request sent
    just before is in its execute() (an idle model uses next to none)."""
    pid = stub_pid(model_file)
    start = cpu_seconds(pid)
    wait_for(lambda: cpu_seconds(pid) - start > 0.3, timeout, f"the model of {model_file} computing")


class Traffic:
    """One client per model sending requests back to back through `send(model) -> (status, error)`;
    every answer recorded with its time. Entered once every model has answered."""

    def __init__(self, send, models):
        self.send, self.answers, self.stop = send, {m: [] for m in models}, threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(m,)) for m in models]

    def _run(self, model):
        while not self.stop.is_set():
            sent = time.monotonic()
            status, error = self.send(model)
            self.answers[model].append((sent, time.monotonic(), status, error))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        wait_for(lambda: all(self.answers.values()), 120, "every model answered the traffic")
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
        assert not any(t.is_alive() for t in self.threads), "a request got no answer"

    def answered_more(self, count: int = 3, timeout: float = 60) -> None:
        """Returns once every model has answered `count` more requests than when called."""
        seen = {model: len(answers) for model, answers in self.answers.items()}
        wait_for(
            lambda: all(len(self.answers[m]) >= seen[m] + count for m in seen),
            timeout,
            f"{count} more answers from every model",
        )

    def served_again(self, model, since, timeout):
        """Seconds from `since` to the end of the first 200 of a request sent after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for sent, done, status, _ in list(self.answers[model]):
                if sent > since and status == 200:
                    return done - since
            time.sleep(0.1)
        raise AssertionError(f"{model} did not serve again within {timeout:.0f}s: {self.answers[model][-3:]}")
