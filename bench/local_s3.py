"""moto's S3 as a real HTTP server on loopback, for the benchmarks that go through the local MME: the
bytes really cross a socket, and nothing reaches AWS."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator, Tuple

from deploy.aws import upload
from deploy.local.tritonserver import free_port


@contextmanager
def local_s3(bucket: str) -> Iterator[Tuple[str, object, object]]:
    """(its URL, a client, a transfer config of one GET and one PUT per object: moto re-reads a whole
    object for every ranged GET), with `bucket` created."""
    from boto3.s3.transfer import TransferConfig
    from moto.server import ThreadedMotoServer

    saved = dict(os.environ)
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ[key] = value
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    url = f"http://127.0.0.1:{port}"
    s3 = upload.s3_client(url)
    s3.create_bucket(Bucket=bucket)
    try:
        yield url, s3, TransferConfig(multipart_threshold=1 << 40, use_threads=False)
    finally:
        moto.stop()
        os.environ.clear()
        os.environ.update(saved)  # the caller's settings again (a test process goes on)
