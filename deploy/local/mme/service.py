"""The local MME as one object: tritonserver in SageMaker mode plus the endpoint in front of it."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Optional

from deploy.aws.upload import adapters_root, s3_client
from deploy.local.mme import endpoint, frontend
from deploy.local.tritonserver import free_port
from sdmme import adapters

log = logging.getLogger("mme")
AWS_SETTINGS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)


class LocalEndpoint:
    def __init__(
        self,
        bucket: str,
        prefix: str,
        root: Path,
        port: int = 0,
        endpoint_name: str = "sd-mme",
        max_models: int = 4,
        s3_endpoint_url: Optional[str] = None,
        python_version: Optional[str] = None,
        env: Optional[dict] = None,
    ):
        self.root = root
        self.python_version = python_version  # the archives' environment Python (the image's)
        # What make deploy gives the container: the adapter stores; and, as the execution role is there,
        # this machine's AWS settings, so that models reach the same S3 (a local one too).
        self.container_env = {
            adapters.STORES_ENV: adapters_root(bucket, prefix),
            adapters.CACHE_ENV: str(root / "adapter-cache"),  # on the instance's disk, as the models are
            **{key: value for key, value in os.environ.items() if key in AWS_SETTINGS},
        }
        if s3_endpoint_url:
            self.container_env["AWS_ENDPOINT_URL_S3"] = s3_endpoint_url
        self.container_env.update(env or {})  # more settings, as a model's Environment gives them
        self.triton_port = free_port()
        self.triton = self._server()
        manager = endpoint.ModelManager(
            s3_client(s3_endpoint_url),
            bucket,
            prefix,
            root / "models",
            frontend.FrontEnd(self.triton_port),
            max_models,
            restart=self.restart_triton,
        )
        self.http = endpoint.EndpointServer(("127.0.0.1", port), manager, endpoint_name)
        self.serving = False
        self.manager = manager

    def _server(self):
        return frontend.server(
            self.root / "empty-repository",
            self.triton_port,
            self.root / "tritonserver.log",
            self.python_version,
            self.container_env,
        )

    def restart_triton(self) -> None:
        """A new tritonserver on the same port, after the old one died (its log says why)."""
        code = self.triton.process.poll() if self.triton.process else None
        log.error("tritonserver exited with %s; starting a new one (log: %s)", code, self.triton.log_file)
        self.triton.stop()
        self.triton = self._server()
        self.triton.start()

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalEndpoint:
        log.info("starting tritonserver in SageMaker mode (log: %s)", self.triton.log_file)
        self.triton.start()
        return self

    def serve_forever(self) -> None:
        self.serving = True
        self.http.serve_forever()

    def serve_in_background(self) -> LocalEndpoint:
        self.serving = True
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.serving:  # shutdown() waits for a serve loop: one must have started
            self.http.shutdown()
        self.http.server_close()
        self.manager.unload_all()
        self.triton.stop()

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
