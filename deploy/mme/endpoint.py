"""The local multi-model endpoint: SageMaker Runtime's InvokeEndpoint API in front, the platform's side
of the MME protocol behind (download from S3, extract, load, invoke, evict), tritonserver doing the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Optional, Tuple

from botocore.exceptions import ClientError

from deploy.mme import archive, frontend

log = logging.getLogger("mme")
MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # SageMaker's real-time response limit


class EndpointError(Exception):
    """An error in SageMaker Runtime's shape: boto3 raises it as `code` with these fields."""

    def __init__(self, status: int, code: str, message: str, **fields):
        super().__init__(message)
        self.status, self.code, self.message, self.fields = status, code, message, fields

    @classmethod
    def model_error(cls, original_status: int, original_message: str, message: str) -> EndpointError:
        return cls(
            424,
            "ModelError",
            message,
            OriginalStatusCode=original_status,
            OriginalMessage=original_message,
            LogStreamArn="local",
        )


@dataclass
class Model:
    target: str
    name: str  # what the platform calls it in the container: a hash of the target
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded: bool = False


class ModelManager:
    """Loads each TargetModel once, keeps at most `max_models` loaded, unloads the least recently used."""

    def __init__(
        self,
        s3,
        bucket: str,
        prefix: str,
        root: Path,
        front: frontend.FrontEnd,
        max_models: int,
        load_timeout: float = 900.0,
    ):
        self.s3, self.bucket, self.prefix = s3, bucket, prefix.strip("/")
        self.root, self.front, self.max_models, self.load_timeout = root, front, max_models, load_timeout
        self.models: Dict[str, Model] = {}
        self.lru: OrderedDict[str, Model] = OrderedDict()  # loaded models, least recently used first
        self.lock = threading.Lock()

    def loaded(self) -> list:
        with self.lock:
            return list(self.lru)

    def invoke(self, target: str, body: bytes, content_type: str) -> Tuple[bytes, str, Dict[str, float]]:
        timings: Dict[str, float] = {}
        model = self._ensure_loaded(target, timings)
        start = time.monotonic()
        try:
            status, data, headers = self.front.invoke(model.name, target, body, content_type)
        except TimeoutError:
            raise EndpointError.model_error(
                408,
                "timed out",
                f"Your invocation timed out while waiting for a response from container "
                f"primary ({self.front.timeout:.0f}s)",
            ) from None
        timings["invoke"] = time.monotonic() - start
        if status == 404:  # unloaded between our check and the call (evicted by a concurrent load): once more
            model = self._ensure_loaded(target, timings)
            status, data, headers = self.front.invoke(model.name, target, body, content_type)
        if status != 200:
            message = _error_text(data)
            raise EndpointError.model_error(
                status, message, f'Received client error ({status}) from primary with message "{message}"'
            )
        if len(data) > MAX_RESPONSE_BYTES:
            raise EndpointError.model_error(
                413,
                "response too large",
                f"Response of {len(data)} bytes exceeds SageMaker's 6 MB limit; "
                "use output_format jpeg or fewer images",
            )
        return data, headers.get("Content-Type", "application/json"), timings

    def _model(self, target: str) -> Model:
        with self.lock:
            if target not in self.models:
                self.models[target] = Model(target, hashlib.sha256(target.encode()).hexdigest()[:32])
            return self.models[target]

    def _ensure_loaded(self, target: str, timings: Dict[str, float]) -> Model:
        model = self._model(target)
        with model.lock:  # concurrent first requests wait here: one download, one load
            if model.loaded:
                with self.lock:
                    if target in self.lru:
                        self.lru.move_to_end(target)
                return model
            folder = self.root / model.name
            if not (folder / "model").is_dir():
                self._fetch(model, folder, timings)
            self._load(model, folder / "model", timings)
            return model

    def _fetch(self, model: Model, folder: Path, timings: Dict[str, float]) -> None:
        key = f"{self.prefix}/{model.target}" if self.prefix else model.target
        local = folder / model.target
        folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        try:
            self.s3.download_file(self.bucket, key, str(local))
        except ClientError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise EndpointError(
                400,
                "ValidationError",
                f"Failed to download model data(bucket: {self.bucket}, key: {key}). Please ensure that "
                f"there is an object located at the URL ({e.response['Error'].get('Code')})",
            ) from None
        timings["download"] = time.monotonic() - start
        start = time.monotonic()
        try:
            archive.extract(local, folder / "model")
        except archive.ArchiveError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise EndpointError(
                400, "ValidationError", f"Failed to extract model data for {model.target}: {e}"
            ) from None
        finally:
            local.unlink(missing_ok=True)
        timings["extract"] = time.monotonic() - start

    def _load(self, model: Model, url: Path, timings: Dict[str, float]) -> None:
        start = time.monotonic()
        while True:
            self._make_room(keep=self.max_models - 1)
            status, data = self.front.load(model.name, url, model.target, self.load_timeout)
            if status in (200, 409):
                break
            if status == 507 and self._evict_one():
                log.info("%s: load answered 507 (out of memory); evicted a model, retrying", model.target)
                continue
            message = _error_text(data)
            raise EndpointError.model_error(
                status, message, f"Failed to load model {model.target}: {message}"
            )
        timings["load"] = time.monotonic() - start
        model.loaded = True
        with self.lock:
            self.lru[model.target] = model

    def _make_room(self, keep: int) -> None:
        while len(self.lru) > max(keep, 0) and self._evict_one():
            pass

    def _evict_one(self) -> bool:
        with self.lock:
            if not self.lru:
                return False
            target, victim = self.lru.popitem(last=False)
        start = time.monotonic()
        with victim.lock:  # requests for it wait, then load it again
            victim.loaded = False
            status = self.front.unload(victim.name, victim.target)
        # The extracted model stays on disk, as SageMaker keeps it: a reload skips download and extraction.
        log.info(
            "evicted %s (least recently used): DELETE %s in %.1fs", target, status, time.monotonic() - start
        )
        return True

    def unload_all(self) -> None:
        while self._evict_one():
            pass


def _error_text(data: bytes) -> str:
    try:
        return json.loads(data).get("error", "") or data.decode(errors="replace")
    except (ValueError, AttributeError):
        return data.decode(errors="replace")


class Handler(BaseHTTPRequestHandler):
    server: EndpointServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # requests are logged with timings instead
        pass

    def _send(
        self, status: int, body: bytes, content_type: str, headers: Optional[Dict[str, str]] = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, error: EndpointError) -> None:
        body = json.dumps({"message": error.message, **error.fields}).encode()
        self._send(error.status, body, "application/json", {"x-amzn-ErrorType": error.code})

    def do_GET(self):
        if self.path == "/ping":
            healthy = self.server.manager.front.ping()
            self._send(
                200 if healthy else 503, b"" if healthy else b"tritonserver is not healthy", "text/plain"
            )
        elif self.path == "/models":
            self._send(200, json.dumps({"loaded": self.server.manager.loaded()}).encode(), "application/json")
        else:
            self._error(EndpointError(404, "UnknownOperationException", f"no route for GET {self.path}"))

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = self.path.split("/")
        if len(parts) != 4 or parts[1] != "endpoints" or parts[3] != "invocations":
            return self._error(
                EndpointError(404, "UnknownOperationException", f"no route for POST {self.path}")
            )
        name, target = parts[2], self.headers.get(frontend.TARGET_HEADER)
        start = time.monotonic()
        try:
            if name != self.server.endpoint_name:
                raise EndpointError(400, "ValidationError", f"Endpoint {name} of account local not found.")
            if not target:
                raise EndpointError(
                    400,
                    "ValidationError",
                    "TargetModel is required for a multi-model endpoint (X-Amzn-SageMaker-Target-Model)",
                )
            content_type = self.headers.get("Content-Type", "application/json")
            data, out_type, timings = self.server.manager.invoke(target, body, content_type)
        except EndpointError as e:
            log.info("%s: %s %s (%.2fs)", target, e.code, e.message[:300], time.monotonic() - start)
            return self._error(e)
        except Exception as e:  # a fault of the endpoint itself; the endpoint keeps serving
            log.exception("%s: internal failure", target)
            return self._error(EndpointError(500, "InternalFailure", f"{type(e).__name__}: {e}"))
        steps = " ".join(f"{k}={v:.2f}s" for k, v in timings.items())
        log.info("%s: 200 %s total=%.2fs", target, steps, time.monotonic() - start)
        self._send(200, data, out_type, {"x-Amzn-Invoked-Production-Variant": "AllTraffic"})


class EndpointServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, manager: ModelManager, endpoint_name: str):
        super().__init__(address, Handler)
        self.manager, self.endpoint_name = manager, endpoint_name
