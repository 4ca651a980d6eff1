"""The local multi-model endpoint: SageMaker Runtime's InvokeEndpoint API in front, the platform's side
of the MME protocol behind (download from S3, extract, load, invoke, evict), tritonserver doing the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from boto3.exceptions import Boto3Error
from botocore.exceptions import BotoCoreError, ClientError

from deploy.aws import upload
from deploy.local.mme import archive, frontend

log = logging.getLogger("mme")
MAX_RESPONSE_BYTES = 6 * 1024 * 1024  # SageMaker's real-time response limit
MAX_REQUEST_BYTES = 6 * 1024 * 1024  # and its request body limit (InvokeEndpoint's Body, 6291456 bytes)
# InvokeEndpoint's constraint on TargetModel: 1 to 1024 printable characters, the first not a space. It is
# a key under ModelDataUrl (nested names such as a/b.tar.gz are fine); it never names a local path here.
TARGET_MODEL = re.compile(r"\A\S[\x20-\x7e\u00a0-\U0010ffff]*\Z")


def check_target(target: Optional[str]) -> str:
    if not target:
        raise EndpointError(
            400,
            "ValidationError",
            "TargetModel is required for a multi-model endpoint (X-Amzn-SageMaker-Target-Model)",
        )
    if len(target) > 1024 or not TARGET_MODEL.match(target):
        raise EndpointError(
            400,
            "ValidationError",
            f"1 validation error detected: Value '{target[:100]}' at 'targetModel' failed to satisfy "
            "constraint: Member must satisfy regular expression pattern: \\A\\S[\\p{Print}]*\\z and have "
            "length less than or equal to 1024",
        )
    return target


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
    users: int = 0  # requests being served by it now


def transfer_config(s3):
    """How archives are downloaded: boto3's defaults (parallel ranged GETs) from AWS; one GET from any
    other S3 (moto, MinIO, a proxy), which may serve each ranged GET by reading the whole object again:
    moto took 117 s for a 1.2 GB archive that way, where one GET takes seconds."""
    from urllib.parse import urlparse

    from boto3.s3.transfer import TransferConfig

    host = urlparse(s3.meta.endpoint_url).hostname or ""
    if host.endswith((".amazonaws.com", ".amazonaws.com.cn")):
        return None
    return TransferConfig(multipart_threshold=1 << 40, use_threads=False)


class ModelManager:
    """Loads each TargetModel once, keeps at most `max_models` loaded, unloads the least recently used
    of those not serving a request (a model loaded for a waiting request is not evicted before it serves it).
    """

    def __init__(
        self,
        s3,
        bucket: str,
        prefix: str,
        root: Path,
        front: frontend.FrontEnd,
        max_models: int,
        load_timeout: float = 900.0,
        restart: Optional[Callable[[], None]] = None,
    ):
        self.s3, self.bucket, self.prefix = s3, bucket, prefix.strip("/")
        self.root, self.front, self.max_models, self.load_timeout = root, front, max_models, load_timeout
        self.restart = restart  # starts a new tritonserver when the old one died
        self.models: Dict[str, Model] = {}
        self.lru: OrderedDict[str, Model] = OrderedDict()  # loaded models, least recently used first
        self.loading = 0  # loads under way: each holds a slot, so loaded + loading <= max_models
        self.peak = 0  # the most models loaded or loading at once (the limit holds: tests read it)
        self.lock = threading.Lock()
        self.restart_lock = threading.Lock()
        self.restarts = 0
        self.transfer_config = transfer_config(s3)

    def loaded(self) -> list:
        with self.lock:
            return list(self.lru)

    def invoke(self, target: str, body: bytes, content_type: str) -> Tuple[bytes, str, Dict[str, float]]:
        timings: Dict[str, float] = {}
        for attempt in (1, 2):
            model = self._acquire(target, timings)
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
            except OSError as e:  # connection refused or reset: tritonserver is gone
                if attempt == 2 or not self.recover(e):
                    raise
                continue
            finally:
                self._release(model)
            if status == 404 and attempt == 1:  # unloaded between our check and the call: load it again
                continue
            break
        timings["invoke"] = time.monotonic() - start
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

    def _acquire(self, target: str, timings: Dict[str, float]) -> Model:
        """The model, loaded and marked in use: a model serving a request is never the one evicted."""
        model = self._model(target)
        with model.lock:  # concurrent first requests wait here: one download, one load
            if not model.loaded:
                folder = self.root / model.name
                if not (folder / "model").is_dir():
                    self._fetch(model, folder, timings)
                self._reserve_slot()
                try:
                    self._load(model, folder / "model", timings)
                finally:
                    with self.lock:
                        self.loading -= 1
            with self.lock:
                if target in self.lru:
                    self.lru.move_to_end(target)
                model.users += 1
            return model

    def _release(self, model: Model) -> None:
        with self.lock:
            model.users -= 1

    def _reserve_slot(self) -> None:
        """Wait until a load fits under the limit, evicting the least recently used models."""
        while True:
            with self.lock:
                if len(self.lru) + self.loading < self.max_models:
                    self.loading += 1
                    self.peak = max(self.peak, len(self.lru) + self.loading)
                    return
            if not self._evict_one():  # every slot is busy loading or serving: wait for one to free
                time.sleep(0.2)

    def recover(self, error: BaseException) -> bool:
        """After a failed call: if tritonserver died, start a new one (models reload on demand)."""
        if self.restart is None:
            return False
        with self.restart_lock:
            if self.front.ping():
                return True  # alive (another request restarted it already)
            log.error("tritonserver is not answering (%s: %s): restarting it", type(error).__name__, error)
            with self.lock:
                for model in self.models.values():
                    model.loaded = False
                self.lru.clear()
            self.restart()
            self.restarts += 1
            log.error(
                "tritonserver restarted (%d so far); models load again on their next request", self.restarts
            )
            return True

    def _fetch(self, model: Model, folder: Path, timings: Dict[str, float]) -> None:
        key = f"{self.prefix}/{model.target}" if self.prefix else model.target
        local = folder / "model.tar.gz"  # never the target itself: it may hold `/` or `..`
        folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        try:
            self.s3.download_file(self.bucket, key, str(local), Config=self.transfer_config)
        except ClientError as e:
            shutil.rmtree(folder, ignore_errors=True)
            raise EndpointError(
                400,
                "ValidationError",
                f"Failed to download model data(bucket: {self.bucket}, key: {key}). Please ensure that "
                f"there is an object located at the URL ({e.response['Error'].get('Code')})",
            ) from None
        except (
            BotoCoreError,
            Boto3Error,
            OSError,
        ) as e:  # S3 failed mid-way (after boto3's own retries): not theirs
            shutil.rmtree(folder, ignore_errors=True)
            log.error(
                "%s: download of s3://%s/%s failed: %s: %s",
                model.target,
                self.bucket,
                key,
                type(e).__name__,
                e,
            )
            raise EndpointError(
                503,
                "ServiceUnavailable",
                f"Downloading model data for {model.target} failed ({type(e).__name__}: {str(e)[:200]}); "
                "nothing was kept, retry",
            ) from None
        timings["download"] = time.monotonic() - start
        start = time.monotonic()
        try:
            archive.extract(local, folder / "model")
        except archive.NoSpace as e:  # the instance's disk, not the archive: nothing half-written stays
            shutil.rmtree(folder, ignore_errors=True)
            log.error("%s: %s", model.target, e)
            raise EndpointError(
                503, "ServiceUnavailable", f"Cannot extract {model.target}: {e}; retry"
            ) from None
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
            try:
                status, data = self.front.load(model.name, url, model.target, self.load_timeout)
            except OSError as e:
                if isinstance(e, TimeoutError) or not self.recover(e):
                    raise
                continue
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

    def _evict_one(self) -> bool:
        with self.lock:
            target = next((t for t, model in self.lru.items() if model.users == 0), None)
            if target is None:
                return False
            victim = self.lru.pop(target)
        start = time.monotonic()
        with victim.lock:  # requests for it wait, then load it again
            victim.loaded = False
            try:
                status = self.front.unload(victim.name, victim.target)
            except OSError as e:  # a dead server has unloaded everything already
                status = f"failed ({type(e).__name__})"
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
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the caller gave up (a client timeout): theirs
            log.info("%s %s: the caller went away before its %d answer", self.command, self.path, status)

    def _error(self, error: EndpointError) -> None:
        body = json.dumps({"message": error.message, **error.fields}).encode()
        self._send(error.status, body, "application/json", {"x-amzn-ErrorType": error.code})

    def do_GET(self):
        if self.path == "/ping":
            healthy = self.server.manager.front.ping()
            self._send(
                200 if healthy else 503, b"" if healthy else b"tritonserver is not healthy", "text/plain"
            )
        elif self.path == "/models":  # what this endpoint can serve (its S3 prefix) and what is loaded
            manager = self.server.manager
            loaded = manager.loaded()
            models = [
                {**item, "loaded": item["target_model"] in loaded}
                for item in upload.catalog(manager.s3, manager.bucket, manager.prefix)
            ]
            self._send(200, json.dumps({"models": models, "loaded": loaded}).encode(), "application/json")
        else:
            self._error(EndpointError(404, "UnknownOperationException", f"no route for GET {self.path}"))

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_REQUEST_BYTES:  # refused unread, as SageMaker does; the connection cannot be reused
            self.close_connection = True
            return self._error(
                EndpointError(
                    413,
                    "ValidationError",
                    f"Request body of {length} bytes exceeds SageMaker's limit of {MAX_REQUEST_BYTES} bytes "
                    "(6 MB); send smaller images",
                )
            )
        body = self.rfile.read(length)
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
            check_target(target)
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
