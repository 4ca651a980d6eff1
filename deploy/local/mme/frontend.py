"""Talking to tritonserver's SageMaker front end the way the SageMaker platform does (shared/FACTS.md)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Optional, Tuple

from deploy.local.tritonserver import TritonServer, free_port

TARGET_HEADER = "X-Amzn-SageMaker-Target-Model"
# The container settings that turn Triton's metrics port on (make deploy METRICS=1, make mme METRICS=1).
ALLOW_METRICS, METRICS_PORT = "SAGEMAKER_TRITON_ALLOW_METRICS", "SAGEMAKER_TRITON_METRICS_PORT"

# What SageMaker's Triton container passes for a multi-model endpoint.
SAGEMAKER_FLAGS = [
    "--allow-sagemaker=true",
    "--allow-http=false",
    "--allow-grpc=false",
    "--allow-metrics=false",
    "--model-control-mode=explicit",
    "--model-namespacing=true",
    "--backend-config=python,shm-default-byte-size=16777216",
    "--backend-config=python,shm-growth-byte-size=1048576",
]


def server(
    empty_repository: Path,
    port: int,
    log_file: Path,
    python_version: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
) -> TritonServer:
    """tritonserver in SageMaker mode; models run only from the environments their archives carry, with
    the backend stub of `python_version` (theirs; default this Python's), and `env` as the platform gives
    a container its settings."""
    empty_repository.mkdir(parents=True, exist_ok=True)
    env = {"SAGEMAKER_TRITON_PING_MODE": "live", "SAGEMAKER_MULTI_MODEL": "true", **(env or {})}
    flags, ports = list(SAGEMAKER_FLAGS), None
    if env.get(ALLOW_METRICS, "").lower() == "true":  # as SageMaker's launcher reads it: the port on
        flags.remove("--allow-metrics=false")  # (loopback here), at SAGEMAKER_TRITON_METRICS_PORT if set
        if env.get(METRICS_PORT):
            ports = (free_port(), free_port(), int(env[METRICS_PORT]))
    return TritonServer(
        empty_repository,
        extra=flags + [f"--sagemaker-port={port}"],
        ports=ports,
        log_file=log_file,
        isolated=True,
        ready_port=port,
        ready_path="/ping",
        env=env,
        python_version=python_version,
        auto_complete=True,  # SageMaker's launcher leaves it on: the models' configs are checked as there
    )


class FrontEnd:
    def __init__(self, port: int, timeout: float = 60.0):
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = timeout

    def _call(
        self,
        method: str,
        path: str,
        target: str,
        body: bytes = b"",
        headers: Dict[str, str] = None,
        timeout: float = None,
    ) -> Tuple[int, bytes, Dict[str, str]]:
        request = urllib.request.Request(
            self.base + path,
            data=body or None,
            method=method,
            headers={TARGET_HEADER: target, **(headers or {})},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def load(self, name: str, url: Path, target: str, timeout: float) -> Tuple[int, bytes]:
        body = json.dumps({"model_name": name, "url": str(url)}).encode()
        status, data, _ = self._call(
            "POST", "/models", target, body, {"Content-Type": "application/json"}, timeout
        )
        return status, data

    def invoke(
        self, name: str, target: str, body: bytes, content_type: str
    ) -> Tuple[int, bytes, Dict[str, str]]:
        return self._call("POST", f"/models/{name}/invoke", target, body, {"Content-Type": content_type})

    def unload(self, name: str, target: str) -> int:
        # Always with the target header: without it DELETE blocks for minutes and orphans the stub.
        return self._call("DELETE", f"/models/{name}", target, timeout=300)[0]

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.base + "/ping", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False
