"""make upload against moto's S3 running as a real HTTP server."""

import io
import json
import os
import subprocess
import sys
import tarfile

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from helpers import ROOT, remove_bucket

from deploy.aws import tarball, upload

BUCKET, PREFIX = "models", "sd-mme/v1"


@pytest.fixture()
def s3(aws):
    client = upload.s3_client()  # picks AWS_ENDPOINT_URL up, as boto3 does
    client.create_bucket(Bucket=BUCKET)
    yield client
    remove_bucket(client, BUCKET)


def archive(path, model, payload: bytes):
    """A small archive with the layout and manifest `make package` writes."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (
            (f"{model}/sdmme-archive.json", json.dumps({"model": model, "python": "3.11"}).encode()),
            (f"{model}/payload", payload),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_upload_skips_the_same_and_never_silently_replaces(s3, tmp_path):
    files = [archive(tmp_path / f"{m}.tar.gz", m, m.encode() * 1000) for m in ("sd_base", "sd_depth")]
    assert upload.upload(s3, files, BUCKET, PREFIX) == {
        f"{PREFIX}/sd_base.tar.gz": "uploaded",
        f"{PREFIX}/sd_depth.tar.gz": "uploaded",
    }
    head = s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/sd_base.tar.gz")
    assert head["Metadata"] == {"sha256": tarball.sha256(files[0]), "python": "3.11", "env": "bundled"}
    assert set(upload.upload(s3, files, BUCKET, PREFIX).values()) == {"unchanged"}

    original = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/sd_depth.tar.gz")["Body"].read()
    archive(files[1], "sd_depth", b"changed" * 1000)
    with pytest.raises(upload.Refused, match=f"s3://{BUCKET}/{PREFIX}/sd_depth.tar.gz.*new name"):
        upload.upload(s3, files, BUCKET, PREFIX)
    assert s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/sd_depth.tar.gz")["Body"].read() == original
    assert upload.upload(s3, files, BUCKET, PREFIX, version="2") == {
        f"{PREFIX}/sd_base-2.tar.gz": "uploaded",
        f"{PREFIX}/sd_depth-2.tar.gz": "uploaded",
    }
    assert upload.upload(s3, files, BUCKET, PREFIX, replace=True)[f"{PREFIX}/sd_depth.tar.gz"] == "replaced"
    body = s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/sd_depth.tar.gz")["Body"].read()
    assert body == files[1].read_bytes()


def test_failed_multipart_upload_leaves_nothing_and_reruns(s3, tmp_path):
    big = archive(tmp_path / "sd_upscale.tar.gz", "sd_upscale", os.urandom(12 * 1024 * 1024))
    config = TransferConfig(
        multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024, max_concurrency=1
    )
    sent = []

    def fail_midway(n):
        sent.append(n)
        if sum(sent) > 6 * 1024 * 1024:
            raise ConnectionError("network dropped")

    with pytest.raises(ConnectionError):
        upload.upload(s3, [big], BUCKET, PREFIX, config=config, callback=fail_midway)
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)
    assert not s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads")
    assert upload.upload(s3, [big], BUCKET, PREFIX, config=config) == {
        f"{PREFIX}/sd_upscale.tar.gz": "uploaded"
    }


def test_make_upload_command_line(s3, tmp_path):
    archive(tmp_path / "sd_base.tar.gz", "sd_base", b"x")
    cmd = [
        sys.executable,
        "-m",
        "deploy.aws.upload",
        "--bucket",
        BUCKET,
        "--prefix",
        PREFIX,
        "--dist",
        str(tmp_path),
    ]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    assert "uploaded" in first.stderr and "unchanged" in second.stderr
    assert f"ModelDataUrl: s3://{BUCKET}/{PREFIX}/" in second.stdout
    assert boto3.client("s3").head_object(Bucket=BUCKET, Key=f"{PREFIX}/sd_base.tar.gz")
    archive(tmp_path / "sd_base.tar.gz", "sd_base", b"y")
    refused = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert (
        refused.returncode != 0 and "make upload: refused" in refused.stderr and "--replace" in refused.stderr
    )


def adapters_in(repository, model, **files):
    """An adapter as make adapter leaves it: <name>.safetensors and its record."""
    folder = repository / model / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    (repository / model / "config.pbtxt").write_text(f'name: "{model}"\n')
    for name, payload in files.items():
        (folder / f"{name}.safetensors").write_bytes(payload)
        (folder / f"{name}.json").write_text(json.dumps({"name": name, "bytes": len(payload)}))
    return repository


def test_adapters_go_under_the_prefix_file_first_and_are_never_replaced_silently(s3, tmp_path):
    repo = adapters_in(tmp_path / "repo", "sd_base", ink=b"i" * 100, sun=b"s" * 100)
    adapters_in(repo, "my_style", ink=b"other" * 10)
    listed = upload.adapter_files(repo)
    keys = [key for _, key in listed]
    assert keys == [
        "adapters/my_style/ink.safetensors",
        "adapters/my_style/ink.json",
        "adapters/sd_base/ink.safetensors",
        "adapters/sd_base/ink.json",
        "adapters/sd_base/sun.safetensors",
        "adapters/sd_base/sun.json",
    ]  # each file before the record that says it is whole
    archives = [archive(tmp_path / "sd_base.tar.gz", "sd_base", b"x")]
    outcome = upload.upload(s3, archives, BUCKET, PREFIX, adapters=listed)
    assert list(outcome) == [f"{PREFIX}/sd_base.tar.gz"] + [f"{PREFIX}/{key}" for key in keys]
    assert set(outcome.values()) == {"uploaded"}
    assert set(upload.upload(s3, archives, BUCKET, PREFIX, adapters=listed).values()) == {"unchanged"}
    catalog = {item["target_model"]: item for item in upload.catalog(s3, BUCKET, PREFIX)}
    assert catalog == {
        "sd_base.tar.gz": {
            "target_model": "sd_base.tar.gz",
            "kind": "unknown",
            "bytes": archives[0].stat().st_size,
            "model": "sd_base",
            "adapters": ["ink", "sun"],
            "compile_artifacts": [],
        }
    }
    (repo / "sd_base" / "adapters" / "sun.safetensors").write_bytes(b"changed")
    with pytest.raises(
        upload.Refused, match="adapters/sd_base/sun.safetensors.*make adapter NAME=<new name>"
    ):
        upload.upload(s3, [], BUCKET, PREFIX, adapters=upload.adapter_files(repo))
    (repo / "sd_base" / "adapters" / "sun.safetensors").unlink()
    with pytest.raises(ValueError, match="sun.safetensors is missing beside its record"):
        upload.adapter_files(repo)
