"""The local MME end to end: moto S3 over HTTP, the endpoint, tritonserver in SageMaker mode, boto3."""

import base64
import io
import json
import logging
import os
import shutil
import signal
import socket
import socketserver
import subprocess
import tarfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import boto3
import brought
import numpy as np
import pytest
from botocore.exceptions import ClientError
from helpers import (
    RECOVERY_TARGET_S,
    Traffic,
    b64,
    copy_repository,
    picture,
    point_aws_at,
    remove_bucket,
    sample_payload,
    wait_for,
)
from PIL import Image

from client import EndpointClient
from client.base import binary_request, request_body
from client.cli import main as cli
from deploy.aws import package, tarball, upload
from deploy.local.mme import frontend
from deploy.local.mme.endpoint import transfer_config
from deploy.local.mme.service import LocalEndpoint
from deploy.ops import stats
from sdmme.adapters import __main__ as make_adapter
from sdmme.serving import recovery
from sdmme.tools import repository, tiny

BUCKET, PREFIX, NAME = "mme-models", "sd/v1", "sd-mme"
FAST = json.dumps({"num_inference_steps": 2, "seed": 1})


def make(folder):
    folder.mkdir()
    return folder


def bad_archives(folder):
    corrupt = folder / "corrupt.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b definitely not gzip")
    traversal = folder / "traversal.tar.gz"
    with tarfile.open(traversal, "w:gz") as tar:
        for name in ("evil/config.pbtxt", "evil/../../../escaped.txt"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"boom"))
    return [corrupt, traversal]


OOM_CONFIG = """name: "oom_model"
backend: "python"
max_batch_size: 8
input [ { name: "prompt" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "generated_image" data_type: TYPE_STRING dims: [ -1 ] } ]
parameters: { key: "EXECUTION_ENV_PATH" value: { string_value: "ENV_DIR" } }
"""
# Runs out of memory on its first load only, as a model does when the GPU is full of other models.
OOM_MODEL = """import os
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        marker = os.path.join(args["model_repository"], "tried")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise MemoryError("CUDA out of memory (the test model's first load)")

    def execute(self, requests):
        out = np.array([[b"loaded"]], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("generated_image", out)]) for _ in requests]
"""


def oom_archive(folder, env_dir):
    model = folder / "oom_model"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(OOM_CONFIG.replace("ENV_DIR", str(env_dir)))
    (model / "1" / "model.py").write_text(OOM_MODEL)
    return tarball.write(folder / "oom_model.tar.gz", [(model, "oom_model")], "oom_model", compresslevel=1)


def own_models(folder, env_dir):
    """Two sd_base models as a user makes them: one from a single-file checkpoint, one with a LoRA."""
    files = brought.write_all(folder / "brought")
    repo = copy_repository(folder / "own" / "model_repository")
    style = files / "style_sd2.safetensors"
    repository.add(repo, "my_style", "sd_base", str(style), config=str(files / "config"))
    repository.add(
        repo, "my_lora", "sd_base", str(files / "base"), lora=str(files / "lora" / "lora.safetensors")
    )
    return package.package(repo, ["my_lora", "my_style"], folder / "own_dist", env_dir, str(env_dir))


@pytest.fixture(scope="module")
def mme(packed_env, tiny_repository, moto_url, tmp_path_factory):
    """The local MME over moto's S3, serving sd_base self-contained (`make package`'s default) and every
    other archive slim, its environment at env/sd_env/ as an image of `make image` has it at its path.
    One environment per archive would be GBs each in moto, the endpoint's cache and here (CI's disk ran
    out); everything goes when the module ends."""
    env = packed_env[0]
    work = tmp_path_factory.mktemp("mme_module")
    with pytest.MonkeyPatch.context() as patch:
        point_aws_at(moto_url, patch)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        extra = bad_archives(make(work / "bad"))
        s3.upload_file(str(extra[0]), BUCKET, f"{PREFIX}/corrupt.tar.gz")
        s3.upload_file(str(extra[1]), BUCKET, f"{PREFIX}/traversal.tar.gz")
        oom = oom_archive(make(work / "oom"), env)
        s3.upload_file(str(oom), BUCKET, f"{PREFIX}/oom_model.tar.gz")
        archives = package.package(tiny_repository, ["sd_base"], work / "bundled", env)
        archives += package.package(
            tiny_repository, ["sd_depth", "sd_inpaint", "sd_upscale"], work / "slim", env, str(env)
        )
        archives += own_models(work, env)
        upload.upload(s3, archives, BUCKET, PREFIX)
        root = make(work / "mme")
        faults = make(work / "faults")  # sdmme.serving.recovery's test hook, given to the container
        env = {recovery.FAULTS_ENV: str(faults), frontend.ALLOW_METRICS: "true"}  # as make mme METRICS=1
        with LocalEndpoint(BUCKET, PREFIX, root, endpoint_name=NAME, max_models=2, env=env) as endpoint:
            endpoint.serve_in_background()
            # One GET per archive from a local S3, as make mme does (endpoint.transfer_config)
            assert endpoint.manager.transfer_config.multipart_threshold == 1 << 40
            endpoint.runtime = boto3.client("sagemaker-runtime", endpoint_url=endpoint.url)
            endpoint.archives = {path.name: path for path in archives}
            endpoint.tiny_repository, endpoint.work, endpoint.faults = tiny_repository, work, faults
            yield endpoint
        remove_bucket(s3, BUCKET)
    shutil.rmtree(work)


def invoke(endpoint, target, **values):
    """The AWS sample notebook's call, unchanged apart from endpoint_url."""
    response = endpoint.runtime.invoke_endpoint(
        EndpointName=NAME,
        ContentType="application/octet-stream",
        Body=json.dumps(sample_payload(**values)),
        TargetModel=target,
    )
    output = json.loads(response["Body"].read().decode("utf8"))["outputs"]
    return Image.open(io.BytesIO(base64.b64decode(output[0]["data"][0])))


def loads_in_log(endpoint, target):
    """Loads that tritonserver itself reports (the SageMaker front end namespaces names by path)."""
    lines = (endpoint.root / "tritonserver.log").read_text().splitlines()
    return sum(1 for line in lines if "successfully loaded" in line and line.endswith(f"::{target}'\""))


def test_the_local_mme_starts_tritonserver_as_sagemakers_launcher_does(tmp_path):
    """Auto-complete on, as SageMaker's launcher leaves it (make serve turns it off): every MME test loads
    the configs make weights writes that way."""
    command = frontend.server(tmp_path / "empty", 9999, tmp_path / "log").cmd
    assert "--disable-auto-complete-config" not in command
    assert set(frontend.SAGEMAKER_FLAGS) <= set(command) and "--sagemaker-port=9999" in command


def test_the_local_mme_downloads_with_one_get_from_a_local_s3_and_boto3_defaults_from_aws(monkeypatch):
    """moto (any S3 but AWS's) reads a whole object again for every ranged GET of boto3's multipart
    download: against it the local MME takes one GET; against AWS, boto3's own parallel ranged GETs."""
    for variable in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(variable, raising=False)
    local = boto3.client("s3", endpoint_url="http://127.0.0.1:5000", region_name="us-east-1")
    assert transfer_config(local).multipart_threshold == 1 << 40
    for region in ("us-east-1", "eu-west-1"):
        assert transfer_config(boto3.client("s3", region_name=region)) is None


def test_aws_sample_calls_each_model(mme):
    image = b64(picture(64, 64, fmt="JPEG"))
    assert invoke(
        mme,
        "sd_base.tar.gz",
        prompt="a",
        negative_prompt="b",
        gen_args=json.dumps({"num_inference_steps": 2, "height": 64, "width": 64}),
    ).size == (64, 64)
    assert invoke(mme, "sd_depth.tar.gz", prompt="a", image=image, gen_args=FAST).size == (64, 64)
    assert invoke(
        mme, "sd_inpaint.tar.gz", prompt="a", image=image, mask_image=b64(picture(64, 64)), gen_args=FAST
    ).size == (64, 64)
    assert invoke(mme, "sd_upscale.tar.gz", prompt="a", image=b64(picture(32, 32)), gen_args=FAST).size == (
        128,
        128,
    )
    # a limit of 2: the first two were unloaded on the way
    assert mme.manager.loaded() == ["sd_inpaint.tar.gz", "sd_upscale.tar.gz"]


def test_limit_unloads_lru_and_reloads_transparently(mme):
    before = loads_in_log(mme, "sd_base.tar.gz")
    assert invoke(
        mme,
        "sd_base.tar.gz",
        prompt="again",
        gen_args=json.dumps({"num_inference_steps": 2, "height": 64, "width": 64}),
    )
    assert mme.manager.loaded() == ["sd_upscale.tar.gz", "sd_base.tar.gz"]
    assert loads_in_log(mme, "sd_base.tar.gz") == before + 1
    # switching between loaded models loads nothing
    invoke(mme, "sd_upscale.tar.gz", prompt="a", image=b64(picture(32, 32)), gen_args=FAST)
    assert mme.manager.loaded() == ["sd_base.tar.gz", "sd_upscale.tar.gz"]


def test_concurrent_first_requests_load_once_while_others_serve(mme):
    target = "sd_depth.tar.gz"
    assert target not in mme.manager.loaded() and "sd_upscale.tar.gz" in mme.manager.loaded()
    before = loads_in_log(mme, target)
    image = b64(picture(64, 64))
    with ThreadPoolExecutor(4) as pool:
        cold = [
            pool.submit(invoke, mme, target, prompt=f"p{i}", image=image, gen_args=FAST) for i in range(4)
        ]
        wait_for(lambda: mme.manager.loading > 0, 60, "the cold model loading")
        # a loaded model answers while the cold one is still loading (its load takes seconds: stub, torch)
        assert invoke(mme, "sd_upscale.tar.gz", prompt="a", image=b64(picture(32, 32)), gen_args=FAST)
        assert not all(future.done() for future in cold)
        sizes = [future.result().size for future in cold]
    assert sizes == [(64, 64)] * 4
    assert loads_in_log(mme, target) == before + 1


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("missing.tar.gz", "Failed to download model data(bucket: mme-models, key: sd/v1/missing.tar.gz)"),
        ("corrupt.tar.gz", "Failed to extract model data for corrupt.tar.gz: cannot extract"),
        ("traversal.tar.gz", "is outside the destination"),
    ],
)
def test_bad_archives_are_refused_and_others_still_served(mme, target, message):
    with pytest.raises(ClientError) as e:
        invoke(mme, target, prompt="a")
    assert e.value.response["Error"]["Code"] == "ValidationError"
    assert message in e.value.response["Error"]["Message"]
    assert not (mme.root / "escaped.txt").exists() and not (mme.root.parent / "escaped.txt").exists()
    assert invoke(mme, "sd_upscale.tar.gz", prompt="a", image=b64(picture(32, 32)), gen_args=FAST).size == (
        128,
        128,
    )


def test_out_of_memory_load_evicts_and_retries(mme, caplog):
    assert len(mme.manager.loaded()) == 2
    with caplog.at_level(logging.INFO, logger="mme"):
        response = mme.runtime.invoke_endpoint(
            EndpointName=NAME, TargetModel="oom_model.tar.gz", Body=json.dumps(sample_payload(prompt="a"))
        )
    assert json.loads(response["Body"].read())["outputs"][0]["data"] == ["loaded"]
    # the 507 made room beyond the limit's own eviction: only the retried model is left
    assert mme.manager.loaded() == ["oom_model.tar.gz"]
    assert "oom_model.tar.gz: load answered 507 (out of memory); evicted a model, retrying" in caplog.text
    assert loads_in_log(mme, "oom_model.tar.gz") == 1


def test_model_error_carries_the_original_status(mme):
    with pytest.raises(ClientError) as e:
        invoke(
            mme, "sd_upscale.tar.gz", prompt="a", image=b64(picture(32, 32)), gen_args='{"noise_level": 999}'
        )
    error = e.value.response
    assert error["Error"]["Code"] == "ModelError" and error["ResponseMetadata"]["HTTPStatusCode"] == 424
    assert error["OriginalStatusCode"] == 400 and "gen_args.noise_level=999" in error["OriginalMessage"]


def test_wrong_endpoint_name_and_ping(mme):
    with pytest.raises(ClientError) as e:
        mme.runtime.invoke_endpoint(EndpointName="other", TargetModel="sd_base.tar.gz", Body=b"{}")
    assert e.value.response["Error"]["Code"] == "ValidationError" and "other" in str(e.value)
    with urllib.request.urlopen(mme.url + "/ping") as r:
        assert r.status == 200


def test_cli_needs_no_aws_setup_for_a_local_endpoint(mme, tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no credential lookups off this machine
    args = ["--endpoint-name", NAME, "--endpoint-url", mme.url, "--out", str(tmp_path), "upscale", "--image"]
    (tmp_path / "in.png").write_bytes(picture(32, 32))
    assert cli(args + [str(tmp_path / "in.png"), "--num-inference-steps", "2"]) == 0
    assert Image.open(tmp_path / "upscale-0.jpg").size == (128, 128)


def test_response_over_six_megabytes_is_refused(mme):
    with pytest.raises(ClientError) as e:
        invoke(
            mme,
            "sd_base.tar.gz",
            prompt="a",
            gen_args=json.dumps(
                {
                    "num_inference_steps": 1,
                    "height": 1024,
                    "width": 1024,
                    "num_images_per_prompt": 4,
                    "output_format": "png",
                }
            ),
        )
    error = e.value.response
    assert (
        error["Error"]["Code"] == "ModelError"
        and "exceeds SageMaker's 6 MB limit" in error["Error"]["Message"]
    )
    assert "use output_format jpeg" in error["Error"]["Message"]


def test_endpoint_client_and_cli(mme, tmp_path):
    client = EndpointClient(NAME, endpoint_url=mme.url, region="us-east-1")
    [image] = client.upscale(picture(32, 32), "sharp", num_inference_steps=2)
    assert image.size == (128, 128)
    with pytest.raises(Exception) as e:
        client.upscale(picture(32, 32), noise_level=400)
    assert getattr(e.value, "status", None) == 400
    code = cli(
        [
            "--endpoint-name",
            NAME,
            "--endpoint-url",
            mme.url,
            "--region",
            "us-east-1",
            "--out",
            str(tmp_path),
            "txt2img",
            "a",
            "--height",
            "64",
            "--width",
            "64",
            "--num-inference-steps",
            "2",
        ]
    )
    assert code == 0 and Image.open(tmp_path / "txt2img-0.jpg").size == (64, 64)


def test_binary_transport_through_sagemaker(mme):
    """`application/vnd.sagemaker-triton.binary+json`: the image files, not base64 inside JSON."""
    args = {"num_inference_steps": 2, "seed": 5, "output_format": "png"}
    json_client = EndpointClient(NAME, endpoint_url=mme.url, region="us-east-1")
    binary_client = EndpointClient(NAME, endpoint_url=mme.url, region="us-east-1", binary=True)
    expected = json_client.generate("sd_upscale", "a", images={"image": picture(32, 32)}, **args)
    assert binary_client.generate("sd_upscale", "a", images={"image": picture(32, 32)}, **args) == expected
    data, header_size = binary_request(request_body("a", None, {"image": picture(32, 32)}, args))
    response = mme.runtime.invoke_endpoint(
        EndpointName=NAME,
        TargetModel="sd_upscale.tar.gz",
        ContentType=f"application/vnd.sagemaker-triton.binary+json;json-header-size={header_size}",
        Body=data,
    )
    assert response["ContentType"].startswith(
        "application/vnd.sagemaker-triton.binary+json;json-header-size="
    )
    body = response["Body"].read()
    assert body.endswith(expected[0]) and len(body) < len(expected[0]) * 4 / 3


def test_a_callers_text_cannot_turn_a_400_into_a_507(mme):
    """Triton's SageMaker front end answers 507 to messages with out-of-memory words; echoes are cut."""
    for value in ("out of memory", "OOM", "MemoryError"):
        with pytest.raises(ClientError) as e:
            invoke(mme, "sd_base.tar.gz", prompt="a", gen_args=json.dumps({"scheduler": value}))
        error = e.value.response
        assert error["OriginalStatusCode"] == 400, error
        assert (
            "gen_args.scheduler=" in error["OriginalMessage"] and "is not one of" in error["OriginalMessage"]
        )


def test_target_model_is_validated_and_never_a_local_path(mme, aws):
    before = sorted(p.name for p in mme.root.parent.iterdir())
    with pytest.raises(ClientError) as e:
        invoke(mme, "../../escape.tar.gz", prompt="a")
    assert "Failed to download model data" in e.value.response["Error"]["Message"]
    assert sorted(p.name for p in mme.root.parent.iterdir()) == before  # nothing written outside the root
    with pytest.raises(ClientError) as e:
        invoke(mme, "x" * 1025, prompt="a")
    assert "failed to satisfy constraint" in e.value.response["Error"]["Message"]
    # nested names are keys under ModelDataUrl, as on SageMaker
    up = str(mme.archives["sd_upscale.tar.gz"])
    boto3.client("s3").upload_file(up, BUCKET, f"{PREFIX}/nested/up.tar.gz")
    assert invoke(mme, "nested/up.tar.gz", prompt="a", image=b64(picture(32, 32)), gen_args=FAST).size == (
        128,
        128,
    )


def test_request_over_six_megabytes_is_refused_unread(mme):
    with pytest.raises(ClientError) as e:
        mme.runtime.invoke_endpoint(
            EndpointName=NAME,
            TargetModel="sd_base.tar.gz",
            ContentType="application/json",
            Body=b"x" * (7 << 20),
        )
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert "exceeds SageMaker's limit of 6291456 bytes" in e.value.response["Error"]["Message"]
    assert invoke(mme, "sd_depth.tar.gz", prompt="a", image=b64(picture(64, 64)), gen_args=FAST).size == (
        64,
        64,
    )


def test_own_models_are_served_side_by_side_and_listed_with_their_kinds(mme, tmp_path):
    gen_args = json.dumps({"num_inference_steps": 2, "height": 64, "width": 64, "seed": 5})
    targets = ("sd_base.tar.gz", "my_style.tar.gz", "my_lora.tar.gz")
    images = {
        t: np.asarray(invoke(mme, t, prompt="a cat", gen_args=gen_args), dtype=np.int16) for t in targets
    }
    assert all(image.shape == (64, 64, 3) for image in images.values())
    for i, a in enumerate(targets):  # the same seed and prompt: each model's own weights show
        for b in targets[i + 1 :]:
            assert np.abs(images[a] - images[b]).mean() > 1, (a, b)
    with urllib.request.urlopen(f"{mme.url}/models", timeout=30) as response:
        listed = json.loads(response.read())
    kinds = {m["target_model"]: m["kind"] for m in listed["models"]}
    assert {t: kinds[t] for t in targets} == dict.fromkeys(targets, "sd_base")
    assert kinds["sd_depth.tar.gz"] == "sd_depth" and kinds["corrupt.tar.gz"] == "unknown"
    assert {m["target_model"] for m in listed["models"] if m["loaded"]} == set(listed["loaded"])
    # The client reaches any of them by name.
    out = tmp_path / "out"
    argv = ["--endpoint-name", NAME, "--endpoint-url", mme.url, "--out", str(out), "txt2img", "a cat"]
    assert (
        cli([*argv, "--model", "my_lora", "--height", "64", "--width", "64", "--num-inference-steps", "2"])
        == 0
    )
    assert Image.open(next(out.iterdir())).size == (64, 64)


def test_self_contained_and_slim_archives_serve_side_by_side(mme):
    """sd_base brings its environment; sd_upscale runs in the one at its fixed path (env/sd_env/ here)."""

    def environment_inside(target):
        with tarfile.open(mme.archives[target]) as tar:
            return any(name.startswith(f"{target.split('.')[0]}/sd_env/") for name in tar.getnames())

    assert environment_inside("sd_base.tar.gz") and not environment_inside("sd_upscale.tar.gz")
    args = json.dumps({"height": 64, "width": 64, **json.loads(FAST)})
    assert invoke(mme, "sd_base.tar.gz", prompt="a", gen_args=args).size == (64, 64)
    image = b64(picture(32, 32))
    assert invoke(mme, "sd_upscale.tar.gz", prompt="a", image=image, gen_args=FAST).size == (128, 128)


def test_concurrent_cold_loads_stay_within_the_limit(mme):
    mme.manager.unload_all()
    mme.manager.peak = 0
    image = b64(picture(32, 32))
    calls = [
        ("sd_base.tar.gz", {"gen_args": json.dumps({"height": 64, "width": 64, **json.loads(FAST)})}),
        ("sd_depth.tar.gz", {"image": image, "gen_args": FAST}),
        ("sd_upscale.tar.gz", {"image": image, "gen_args": FAST}),
    ]
    before = {target: loads_in_log(mme, target) for target, _ in calls}
    with ThreadPoolExecutor(3) as pool:
        sizes = list(pool.map(lambda call: invoke(mme, call[0], prompt="a", **call[1]).size, calls))
    assert sizes == [(64, 64), (32, 32), (128, 128)]
    assert mme.manager.peak <= 2 and len(mme.manager.loaded()) == 2  # the limit of 2, never 3
    # The third waited for a model to finish its request: none was evicted before serving and loaded twice.
    assert {target: loads_in_log(mme, target) - before[target] for target, _ in calls} == {
        target: 1 for target, _ in calls
    }


def adapter_repository(mme, folder):
    """sd_base's folder as make adapter reads it (config and weights), its adapters made from the LoRA
    that my_lora.tar.gz has fused in, and another."""
    source = mme.tiny_repository / "sd_base"
    shutil.copytree(source, folder / "sd_base", ignore=shutil.ignore_patterns("adapters"))
    lora = mme.work / "brought" / "lora" / "lora.safetensors"
    make_adapter.add(folder, "sd_base", "ink", str(lora))
    brought.write_lora(tiny.sd_base(), folder / "sun_lora", seed=11)
    return folder, folder / "sun_lora" / "lora.safetensors"


def test_adapters_uploaded_while_the_endpoint_runs_are_served_from_s3(mme, tmp_path):
    """make adapter, make upload, and invoke_endpoint with gen_args.lora: no new archive, no restart."""
    s3 = boto3.client("s3")
    repo, sun = adapter_repository(mme, tmp_path)
    assert upload.upload(s3, [], BUCKET, PREFIX, adapters=upload.adapter_files(repo)) == {
        f"{PREFIX}/adapters/sd_base/ink.safetensors": "uploaded",
        f"{PREFIX}/adapters/sd_base/ink.json": "uploaded",
    }
    args = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 5, "output_format": "png"}

    def pixels(target, **extra):
        image = invoke(mme, target, prompt="a cat", gen_args=json.dumps({**args, **extra}))
        return np.asarray(image, dtype=np.int16)

    alone, adapted = pixels("sd_base.tar.gz"), pixels("sd_base.tar.gz", lora="ink")
    fused = pixels("my_lora.tar.gz")  # the same LoRA fused into an fp16 copy of the model by make model
    assert np.abs(adapted - fused).max() < np.abs(alone - fused).max()
    assert np.abs(adapted - fused).mean() < 1, np.abs(adapted - fused).mean()
    assert np.array_equal(pixels("sd_base.tar.gz"), alone)

    # A second adapter, uploaded now: its first requests, together, fetch it once.
    make_adapter.add(repo, "sd_base", "sun", str(sun))
    assert (
        upload.upload(s3, [], BUCKET, PREFIX, adapters=upload.adapter_files(repo))[
            f"{PREFIX}/adapters/sd_base/sun.json"
        ]
        == "uploaded"
    )
    log = mme.root / "tritonserver.log"
    metrics = f"127.0.0.1:{mme.triton.metrics_port}"
    before = stats.by_label(
        stats.scrape(metrics), "sdmme_adapter_uses_total", "source", model="sd_base.tar.gz"
    )
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: pixels("sd_base.tar.gz", lora="sun"), range(4)))
    # the same seed, in one call or several: within one level of 255 (shared/FACTS.md: batching)
    assert all(np.abs(result - results[0]).max() <= 1 for result in results)
    assert not np.array_equal(results[0], alone) and not np.array_equal(results[0], adapted)
    assert log.read_text().count("adapter sun: fetched from s3://mme-models/sd/v1/adapters/sd_base/") == 1
    # Behind the MME too, the metrics name the model by its TargetModel: one fetch from S3, and every
    # other call of the four found sun loaded on the device.
    samples = stats.scrape(metrics)
    after = stats.by_label(samples, "sdmme_adapter_uses_total", "source", model="sd_base.tar.gz")
    assert after.get("s3", 0) - before.get("s3", 0) == 1, (before, after)
    calls = after.get("device", 0) - before.get("device", 0) + 1
    assert 1 <= calls <= 4
    assert stats.total(samples, "sdmme_requests_total", model="sd_base.tar.gz", outcome="ok") >= 7

    with urllib.request.urlopen(f"{mme.url}/models", timeout=30) as response:
        listed = {m["target_model"]: m for m in json.loads(response.read())["models"]}
    assert (
        listed["sd_base.tar.gz"]["adapters"] == ["ink", "sun"] and listed["my_lora.tar.gz"]["adapters"] == []
    )

    # A record without its file and an unknown name fail alone, with the model's 400 and the name.
    s3.put_object(
        Bucket=BUCKET,
        Key=f"{PREFIX}/adapters/sd_base/ghost.json",
        Body=(repo / "sd_base" / "adapters" / "ink.json").read_bytes(),
    )
    for name, message in (
        ("ghost", "has a record but no ghost.safetensors"),
        ("nope", "unknown adapter nope"),
    ):
        with pytest.raises(ClientError) as e:
            pixels("sd_base.tar.gz", lora=name)
        error = e.value.response
        assert error["OriginalStatusCode"] == 400 and message in error["OriginalMessage"], error
        assert "s3://mme-models/sd/v1/adapters/sd_base/" in error["OriginalMessage"]
    assert np.array_equal(pixels("sd_base.tar.gz", lora="ink"), adapted)


def traffic_through(mme):
    """Traffic's send: the AWS sample's call, (200, "") or the status and message SageMaker gives."""
    runtime = boto3.client("sagemaker-runtime", endpoint_url=mme.url)
    bodies = {
        "sd_base.tar.gz": json.dumps(sample_payload(prompt="a", gen_args=FAST)),
        "sd_upscale.tar.gz": json.dumps(
            sample_payload(prompt="a", image=b64(picture(32, 32)), gen_args=FAST)
        ),
    }

    def send(target):
        try:
            runtime.invoke_endpoint(EndpointName=NAME, TargetModel=target, Body=bodies[target])["Body"].read()
            return 200, ""
        except ClientError as e:
            error = e.response
            return error.get("OriginalStatusCode", error["ResponseMetadata"]["HTTPStatusCode"]), str(e)

    return send


def record_of(mme, target):
    for path in recovery.registry_folder(mme.triton.process.pid).glob("*.json"):
        record = json.loads(path.read_text())
        if record["name"] == target:
            return record
    raise AssertionError(
        f"{target} is not registered: {list(recovery.registry_folder(mme.triton.process.pid).iterdir())}"
    )


@pytest.mark.parametrize("fault", ["killed process", "sticky device error"])
def test_a_broken_model_is_reloaded_inside_the_container_while_the_other_serves(mme, fault):
    """The SageMaker platform reloads nothing: the container brings the model back by itself, and the
    platform's view (loaded, same name) stays true."""
    send = traffic_through(mme)
    for target in ("sd_base.tar.gz", "sd_upscale.tar.gz"):
        assert send(target) == (200, "")
    before = record_of(mme, "sd_base.tar.gz")["pid"]
    with Traffic(send, ["sd_base.tar.gz", "sd_upscale.tar.gz"]) as traffic:
        if fault == "killed process":
            os.kill(before, signal.SIGKILL)
        else:
            (mme.faults / "sd_base.tar.gz").touch()
        since = time.monotonic()
        seconds = traffic.served_again("sd_base.tar.gz", since, RECOVERY_TARGET_S + 30)
        traffic.answered_more()
    print(f"local MME, {fault}: sd_base.tar.gz served again {seconds:.1f}s after the fault")
    assert {status for *_, status, _ in traffic.answers["sd_upscale.tar.gz"]} == {200}
    # Behind SageMaker's front end every model error is a 400 (ModelError, OriginalStatusCode 400),
    # ours too; the model-control API's unload and load leave a moment where the model is unknown.
    faults = {
        (status, message.split("with message ")[-1])
        for *_, status, message in traffic.answers["sd_base.tar.gz"]
        if status != 200
    }
    print(f"  answers while it was broken: {sorted(faults)}")
    expected = (
        "Stub process 'sd_base.tar.gz_0' is not healthy.",
        "sd_base.tar.gz is being reloaded after a device fault",
        "has no available versions",
        "Identifier of model 'sd_base.tar.gz' is not found in global map",
    )
    assert faults and all(any(e in m for e in expected) for _, m in faults), faults
    assert record_of(mme, "sd_base.tar.gz")["pid"] != before
    assert sorted(mme.manager.loaded()) == ["sd_base.tar.gz", "sd_upscale.tar.gz"]


class CuttingProxy(socketserver.ThreadingTCPServer):
    """A TCP proxy to S3 that, while `cutting`, closes every connection once `limit` bytes of the
    answer passed: S3 failing in the middle of a download."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, upstream: str, limit: int = 256 * 1024):
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self.upstream, self.limit, self.cutting = (host, int(port)), limit, True
        super().__init__(("127.0.0.1", 0), CuttingProxy.Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            upstream = socket.create_connection(self.server.upstream)
            threading.Thread(target=self.pump, args=(self.request, upstream, None), daemon=True).start()
            self.pump(upstream, self.request, self.server.limit if self.server.cutting else None)

        @staticmethod
        def pump(source, sink, limit):
            passed = 0
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
                    passed += len(data)
                    if limit is not None and passed >= limit:
                        break
            except OSError:
                pass
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                end.close()


def test_s3_failing_during_a_download_is_a_503_and_the_next_request_serves(mme, moto_url, caplog):
    caplog.set_level(logging.INFO, logger="mme")
    boto3.client("s3").upload_file(
        str(mme.archives["sd_inpaint.tar.gz"]), BUCKET, f"{PREFIX}/cut/sd_inpaint.tar.gz"
    )
    send = traffic_through(mme)
    assert send("sd_upscale.tar.gz") == (200, "")  # loaded before S3 fails
    proxy, s3 = CuttingProxy(moto_url), mme.manager.s3
    mme.manager.s3 = boto3.client("s3", endpoint_url=proxy.url)  # the endpoint's S3, through the proxy
    body = json.dumps(
        sample_payload(
            prompt="a", image=b64(picture(64, 64)), mask_image=b64(picture(64, 64, 1)), gen_args=FAST
        )
    )
    try:
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(lambda: [send("sd_upscale.tar.gz") for _ in range(3)])
            with pytest.raises(ClientError) as e:
                mme.runtime.invoke_endpoint(EndpointName=NAME, TargetModel="cut/sd_inpaint.tar.gz", Body=body)
            assert other.result() == [(200, "")] * 3  # served meanwhile
        error = e.value.response
        assert (
            error["ResponseMetadata"]["HTTPStatusCode"] == 503
            and error["Error"]["Code"] == "ServiceUnavailable"
        )
        assert "Downloading model data for cut/sd_inpaint.tar.gz failed" in error["Error"]["Message"]
        assert "nothing was kept, retry" in error["Error"]["Message"]
        assert not any(mme.manager.root.glob("*/model.tar.gz")), "a partial download stayed"
        proxy.cutting = False  # S3 is back
        response = mme.runtime.invoke_endpoint(
            EndpointName=NAME, TargetModel="cut/sd_inpaint.tar.gz", Body=body
        )
        assert json.loads(response["Body"].read())["outputs"][0]["data"]
    finally:
        mme.manager.s3 = s3
        proxy.shutdown()
    assert "cut/sd_inpaint.tar.gz: download of s3://" in caplog.text


def test_a_disk_that_fills_up_during_extraction_is_a_503_and_keeps_nothing(mme, tmp_path):
    """The instance's model disk as a 24 MiB tmpfs with 8 MiB left: sd_depth's archive (5.8 MB) downloads
    there, its files (more than the rest) cannot be extracted; once space is back they are."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True
    ).returncode:
        pytest.skip(
            "mounting a small tmpfs as the full disk needs root (the dev and CI machines run as root)"
        )
    boto3.client("s3").upload_file(
        str(mme.archives["sd_depth.tar.gz"]), BUCKET, f"{PREFIX}/disk/sd_depth.tar.gz"
    )
    assert traffic_through(mme)("sd_upscale.tar.gz") == (200, "")  # loaded from the real disk
    root = mme.manager.root
    mme.manager.root = disk / "models"
    body = json.dumps(sample_payload(prompt="a", image=b64(picture(64, 64)), gen_args=FAST))
    try:
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - 8 * 2**20))
        with pytest.raises(ClientError) as e:
            mme.runtime.invoke_endpoint(EndpointName=NAME, TargetModel="disk/sd_depth.tar.gz", Body=body)
        error = e.value.response
        assert error["ResponseMetadata"]["HTTPStatusCode"] == 503, error
        assert "Cannot extract disk/sd_depth.tar.gz: the disk at" in error["Error"]["Message"]
        assert "filled up during extraction" in error["Error"]["Message"]
        assert list((disk / "models").iterdir()) == [], "the partial extraction stayed"
        assert traffic_through(mme)("sd_upscale.tar.gz") == (200, "")
        filler.unlink()
        response = mme.runtime.invoke_endpoint(
            EndpointName=NAME, TargetModel="disk/sd_depth.tar.gz", Body=body
        )
        assert json.loads(response["Body"].read())["outputs"][0]["data"]
    finally:
        mme.manager.unload_all()  # its files leave the tmpfs with it
        mme.manager.root = root
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_dead_tritonserver_is_restarted_and_models_reload(mme, caplog):
    """Last in this module: it replaces the endpoint's tritonserver."""
    caplog.set_level(logging.INFO, logger="mme")
    os.killpg(mme.triton.process.pid, signal.SIGKILL)
    mme.triton.process.wait()
    image = b64(picture(32, 32))
    assert invoke(mme, "sd_upscale.tar.gz", prompt="a", image=image, gen_args=FAST).size == (128, 128)
    assert mme.manager.restarts == 1 and "restarting it" in caplog.text
    assert invoke(mme, "sd_depth.tar.gz", prompt="a", image=image, gen_args=FAST).size == (32, 32)
