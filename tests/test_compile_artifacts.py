"""Compile artifacts (sdmme.pipeline.compile_artifacts), on CPU: inductor compiles there too.
`make compile-cache` builds them for the tiny sd_base; a tritonserver with an empty compile cache of its
own then loads the model from them and compiles nothing (inductor's counters, in the model's log), and a
reload on the same instance without them compiles nothing either. A key for another machine and a
corrupt file are a log line and a normal compile. Timings are not asserted; the GPU's are for `make
bench-gpu`.
"""

import base64
import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_pipeline, post, sample_payload, with_parameters
from PIL import Image

from deploy.aws import package
from deploy.local.tritonserver import TritonServer
from sdmme.pipeline import compile_artifacts
from sdmme.pipeline.runner import Runner
from sdmme.serving import batching
from sdmme.settings import Settings
from sdmme.spec import MODELS
from sdmme.tools import compile_cache

CPU = torch.device("cpu")


def fake_artifact(folder, key, data=b"not a cache", bytes_=None):
    """An artifact with its record as make compile-cache writes them (of any content)."""
    target = folder / "1" / compile_artifacts.FOLDER
    target.mkdir(parents=True, exist_ok=True)
    (target / "x.torchcache").write_bytes(data)
    record = {
        "key": key,
        "shapes": ["64:1"],
        "bytes": bytes_ or len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    (target / "x.json").write_text(json.dumps(record))
    return target


def test_no_artifact_another_machine_and_a_corrupt_one_each_fall_back_with_a_reason(tmp_path, caplog):
    folder = tmp_path / "sd_base"
    with caplog.at_level(logging.INFO, logger="sdmme"):
        assert not compile_artifacts.load(folder, CPU, "default", "m")
        assert "m: no compile artifacts in" in caplog.text and "make compile-cache builds them" in caplog.text
        other = {**compile_artifacts.key(CPU, "default"), "device": "NVIDIA A10G (sm_86)"}
        target = fake_artifact(folder, other)
        assert not compile_artifacts.load(folder, CPU, "default", "m")
        found = "m: no compile artifact for this machine: x.torchcache has device 'NVIDIA A10G (sm_86)'"
        assert found + " (here 'cpu" in caplog.text
        fake_artifact(folder, compile_artifacts.key(CPU, "reduce-overhead"))
        assert not compile_artifacts.load(folder, CPU, "default", "m")
        assert "has mode 'reduce-overhead' (here 'default')" in caplog.text
        fake_artifact(folder, compile_artifacts.key(CPU, "default"), bytes_=999)
        assert not compile_artifacts.load(folder, CPU, "default", "m")
        assert (
            "compile artifact x.torchcache cannot be used (ValueError: 11 bytes that do not match its record"
            in (caplog.text)
        )
        fake_artifact(folder, compile_artifacts.key(CPU, "default"))  # matching record, bytes not a cache
        assert not compile_artifacts.load(folder, CPU, "default", "m")
        assert caplog.text.count("cannot be used") == 2
        (target / "x.json").write_text("{not json")
        assert not compile_artifacts.load(folder, CPU, "default", "m")
        assert "is unreadable" in caplog.text


def test_packages_ship_the_artifacts_and_their_manifest_says_which(tiny_repository, tmp_path):
    folder = tmp_path / "sd_base"
    shutil.copytree(tiny_repository / "sd_base", folder)
    fake_artifact(folder, compile_artifacts.key(CPU, "default"))
    staging = tmp_path / "staging"
    staging.mkdir()
    names = [name for _, name in package.members(folder, staging, tmp_path, env_path="/opt/env")]
    assert "sd_base/1/compile/x.torchcache" in names and "sd_base/1/compile/x.json" in names
    [listed] = package.check_model(folder)[
        "compile_artifacts"
    ]  # the archive's manifest; make models shows it
    assert (
        listed["mode"] == "default"
        and listed["device"].startswith("cpu ")
        and listed["torch"] == torch.__version__
    )


def test_parse_shapes():
    assert compile_cache.parse_shapes("512:1,512:8,256") == [(512, 1), (512, 8), (256, 1)]
    with pytest.raises(SystemExit, match="'big:1' is not SIDE:BATCH"):
        compile_cache.parse_shapes("big:1")


def graphs_line(log: str) -> list:
    found = re.findall(
        r"compiled and warmed up in [\d.]+s \((\d+) graph\(s\) from the compile cache, (\d+) compiled\)", log
    )
    return [(int(cached), int(compiled)) for cached, compiled in found]


@pytest.mark.server
def test_a_cold_load_with_artifacts_compiles_nothing(tiny_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository / "sd_base", repository / "sd_base")
    with_parameters(repository / "sd_base", {"compile": "default", "adapters": "none"})
    built = subprocess.run(  # make compile-cache
        [
            sys.executable,
            "-m",
            "sdmme.tools.compile_cache",
            "--model",
            "sd_base",
            "--repository",
            str(repository),
            "--shapes",
            "512:1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    [(artifact, record)] = compile_artifacts.records(repository / "sd_base")
    assert record["key"] == compile_artifacts.key(CPU, "default") and record["graphs"]["compiled"] > 0
    log_file = tmp_path / "tritonserver.log"
    cache = tmp_path / "instance-cache"  # this instance's own compile cache: empty at first
    with TritonServer(
        repository,
        extra=["--model-control-mode=explicit"],
        log_file=log_file,
        env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
    ) as server:
        status, body = post(server, "/v2/repository/models/sd_base/load", {})
        assert status == 200, body
        payload = sample_payload(
            prompt="a lighthouse",
            gen_args=json.dumps(
                {"num_inference_steps": 2, "seed": 3, "height": 64, "width": 64, "output_format": "png"}
            ),
        )
        status, body = post(server, "/v2/models/sd_base/infer", payload)
        assert status == 200, body
        [output] = [o for o in body["outputs"] if o["name"] == "generated_image"]
        served = Image.open(io.BytesIO(base64.b64decode(output["data"][0])))
        # unloaded and loaded again on this instance (SageMaker evicts idle models), the artifacts gone
        assert post(server, "/v2/repository/models/sd_base/unload", {})[0] == 200
        shutil.rmtree(artifact.parent)
        status, body = post(server, "/v2/repository/models/sd_base/load", {})
        assert status == 200, body
    log = log_file.read_text()
    assert "sd_base: compile artifact" in log and "loaded in" in log
    assert "sd_base: no compile artifacts in" in log  # the second load had none
    # the request's 64x64 was not among the artifacts' shapes: compiled once, and the log says so
    assert "sd_base: compiled 1 new graph(s) for a call of 1 image(s) at 64x64; later calls" in log
    first, second = graphs_line(log)
    assert first[0] > 0 and first[1] == 0, first  # everything from the artifacts
    assert second[0] > 0 and second[1] == 0, second  # everything from the instance's own cache
    eager = Runner(
        load_pipeline(MODELS["sd_base"], repository / "sd_base" / "1" / "weights", CPU, Settings("CPU"))
    )
    job = batching.parse(
        MODELS["sd_base"],
        0,
        {i["name"]: np.array([[i["data"][0].encode()]], dtype=object) for i in payload["inputs"]},
        8,
    )
    [[expected]] = batching.run(eager, [job])
    difference = np.abs(np.asarray(expected, dtype=np.int16) - np.asarray(served, dtype=np.int16))
    assert difference.max() <= 2  # compiled code against eager: rounding
