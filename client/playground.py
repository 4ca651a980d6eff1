"""`make playground`: a page on 127.0.0.1 to try the models of a server or an endpoint in a browser.

    python -m client.playground --url HOST:PORT [--model-repository DIR]     # a tritonserver
    python -m client.playground --endpoint-name NAME [--endpoint-url URL] [--region R]   # an MME

The page calls the models through this project's clients (client.TritonClient, client.EndpointClient),
so what works in the page works from Python. Its form is generated from sdmme/spec.py's schema, the
same declarations the server validates with. With --model-repository and nothing answering at --url,
it starts tritonserver on that repository itself (what `make playground` does after `make demo`).

No framework: the page is one file (playground.html, no assets fetched from anywhere) served by the
standard library, because inpainting needs a mask of exactly the uploaded image's size, which a
canvas of that size gives directly; the rest is a form.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional

from client.base import Client, ModelError
from sdmme import model_folder, spec

log = logging.getLogger("playground")
PAGE = Path(__file__).with_name("playground.html")
MAX_BODY = 32 * 2**20  # a request's images as data URLs
BUSY_RETRIES = (1.0, 2.0, 4.0)  # a tritonserver answering 503 (full queue, model reloading)
INPUTS = ("prompt", "negative_prompt", *{name for kind in spec.MODELS.values() for name in kind.image_inputs})


class TargetError(Exception):
    """The server or endpoint could not be asked (down, unknown, no permission)."""


class TritonTarget:
    """A tritonserver's models (its repository index and each model's kind from its config); adapters
    from the model repository's folders when it is given (Triton's API does not list them)."""

    def __init__(self, url: str, repository: Optional[Path] = None):
        self.url, self.repository = url, repository
        self.description = f"tritonserver at {url}"

    def _get(self, path: str, data: Optional[bytes] = None) -> Any:
        try:
            with urllib.request.urlopen(f"http://{self.url}{path}", data=data, timeout=10) as response:
                return json.loads(response.read() or b"null")
        except (OSError, ValueError) as e:
            raise TargetError(f"tritonserver at {self.url} did not answer {path} ({e})") from None

    def models(self) -> List[Dict[str, Any]]:
        found = []
        for item in self._get("/v2/repository/index", b"{}"):
            if item.get("state") != "READY":
                continue
            config = self._get(f"/v2/models/{item['name']}/config")
            kind = config.get("parameters", {}).get(model_folder.KIND_PARAMETER, {}).get("string_value")
            if kind in spec.MODELS:
                found.append({"name": item["name"], "kind": kind, "adapters": self._adapters(item["name"])})
        return sorted(found, key=lambda m: m["name"])

    def _adapters(self, model: str) -> List[str]:
        folder = self.repository / model / "adapters" if self.repository else None
        return sorted(p.stem for p in folder.glob("*.json")) if folder and folder.is_dir() else []

    def client(self) -> Client:
        from client.triton import TritonClient

        return TritonClient(self.url)  # one per request: tritonclient's HTTP client is not thread-safe


class EndpointTarget:
    """A SageMaker MME: the local one lists its models (GET /models); a real one's come from its
    ModelDataUrl prefix in S3, with their kinds and adapters (deploy.aws.upload.catalog)."""

    def __init__(self, name: str, endpoint_url: Optional[str] = None, region: Optional[str] = None):
        self.name, self.endpoint_url, self.region = name, endpoint_url, region
        self.description = f"endpoint {name}" + (f" at {endpoint_url}" if endpoint_url else "")

    def models(self) -> List[Dict[str, Any]]:
        try:
            if self.endpoint_url:
                with urllib.request.urlopen(f"{self.endpoint_url.rstrip('/')}/models", timeout=10) as r:
                    listed = json.loads(r.read())["models"]
            else:
                listed = self._catalog()
        except TargetError:
            raise
        except Exception as e:  # unreachable, no permission, not an MME
            raise TargetError(f"the models of {self.description} could not be listed ({e})") from None
        return sorted(
            (
                {
                    "name": item["target_model"].removesuffix(".tar.gz"),
                    "kind": item["kind"],
                    "adapters": item.get("adapters", []),
                }
                for item in listed
                if item.get("kind") in spec.MODELS
            ),
            key=lambda m: m["name"],
        )

    def _catalog(self) -> List[Dict[str, Any]]:
        import boto3

        from deploy.aws import upload

        sm = boto3.client("sagemaker", region_name=self.region)
        config = sm.describe_endpoint(EndpointName=self.name)["EndpointConfigName"]
        model = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"][0]["ModelName"]
        url = sm.describe_model(ModelName=model)["PrimaryContainer"]["ModelDataUrl"]
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return upload.catalog(boto3.client("s3", region_name=self.region), bucket, prefix)

    def client(self) -> Client:
        from client.endpoint import EndpointClient

        return EndpointClient(self.name, self.endpoint_url, self.region)


def field_of(message: str) -> Optional[str]:
    """The input or gen_args key a model's 400 names, for the page to show the message beside it."""
    match = re.search(r"gen_args\.(\w+)", message)
    if match:
        return match.group(1)
    if "adapter" in message:
        return "lora"
    match = re.match(r"(?:input )?(\w+)\b", message)
    if match and match.group(1) in INPUTS:
        return match.group(1)
    return None


def _image(data_url: str) -> bytes:
    """An uploaded file or drawn mask as the page sends it: a data URL (or bare base64)."""
    return base64.b64decode(data_url.split(",", 1)[1] if data_url.startswith("data:") else data_url)


def generate(target, request: Dict[str, Any]) -> Dict[str, Any]:
    """One generation for the page; its answer, or {"error", "field", "status"} in words."""
    gen_args = {k: v for k, v in (request.get("gen_args") or {}).items() if v is not None}
    if "seed" not in gen_args:  # the page shows the seed, so it picks one the server would have picked
        gen_args["seed"] = secrets.randbelow(2**32)
    images = {name: _image(value) for name, value in (request.get("images") or {}).items() if value}
    notes = []
    start = time.monotonic()
    for delay in (*BUSY_RETRIES, None):
        client = target.client()
        try:
            files = client.generate(
                request["model"],
                request.get("prompt", ""),
                request.get("negative_prompt") or None,
                images,
                **gen_args,
            )
            break
        except ModelError as e:
            if e.status == 503 and delay is not None:
                notes.append(f"the server was busy ({e.message}); retried after {delay:g}s")
                time.sleep(delay)
                continue
            return {
                "error": e.message,
                "field": field_of(e.message) if e.status == 400 else None,
                "status": e.status,
            }
        except Exception as e:  # the server went away, a timeout: said in words
            return {
                "error": f"{target.description} could not be reached ({type(e).__name__}: {e})",
                "status": 502,
            }
        finally:
            getattr(client, "close", lambda: None)()
    seed = gen_args["seed"]
    return {
        "model": request["model"],
        "images": [
            {
                "data": f"data:image/{_format(data)};base64,{base64.b64encode(data).decode()}",
                "seed": (seed + i) % 2**32,
            }
            for i, data in enumerate(files)
        ],
        "seed": seed,
        "gen_args": gen_args,
        "seconds": round(time.monotonic() - start, 3),
        "warnings": notes + list(client.warnings),
    }


def _format(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "png"
    if data[8:12] == b"WEBP":
        return "webp"
    return "jpeg"


class Handler(BaseHTTPRequestHandler):
    server: Playground

    def log_message(self, format: str, *args) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(value).encode())

    def do_GET(self):
        if self.path == "/":
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif self.path == "/api/schema":
            self._json(200, spec.schema())
        elif self.path == "/api/models":
            try:
                self._json(
                    200, {"target": self.server.target.description, "models": self.server.target.models()}
                )
            except TargetError as e:
                self._json(502, {"target": self.server.target.description, "error": str(e)})
        else:
            self._json(404, {"error": f"no page {self.path}"})

    def do_POST(self):
        if self.path != "/api/generate":
            return self._json(404, {"error": f"no API {self.path}"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            self.close_connection = True
            return self._json(413, {"error": f"the images are {length} bytes; at most {MAX_BODY} are sent"})
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict) or not isinstance(request.get("model"), str):
                raise ValueError("no model named")
        except ValueError as e:
            return self._json(400, {"error": f"the page sent a request that could not be read ({e})"})
        result = generate(self.server.target, request)
        self._json(200 if "error" not in result else result["status"], result)


class Playground(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, target, port: int = 0):
        super().__init__(("127.0.0.1", port), Handler)
        self.target = target

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def serve_in_background(self) -> Playground:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=2):
            return True
    except (OSError, urllib.error.HTTPError):
        return False


def _stop(signum, frame):
    raise SystemExit(f"playground: stopping on signal {signum}")


def main(argv: Optional[List[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a tritonserver's HTTP address, e.g. 127.0.0.1:8000 (make serve's)")
    where.add_argument("--endpoint-name", help="a SageMaker multi-model endpoint (or the local MME's name)")
    parser.add_argument("--endpoint-url", help="the local MME, e.g. http://127.0.0.1:8080 (make mme's)")
    parser.add_argument("--region", help="the endpoint's AWS region (default: boto3's)")
    parser.add_argument(
        "--model-repository",
        type=Path,
        help="with --url: the repository that server serves (lists adapters); started when nothing answers",
    )
    parser.add_argument("--port", type=int, default=7860, help="the page's port on 127.0.0.1 (default 7860)")
    args = parser.parse_args(argv)
    server = None
    if args.url:
        if args.model_repository and not _answers(args.url):
            from deploy.local.tritonserver import TritonServer, free_port

            port = int(args.url.rpartition(":")[2])
            server = TritonServer(args.model_repository.resolve(), ports=(port, free_port(), free_port()))
            print(
                f"nothing answers at {args.url}: starting tritonserver there (log: {server.log_file})",
                flush=True,
            )
            server.start()
        target = TritonTarget(args.url, args.model_repository)
    else:
        target = EndpointTarget(args.endpoint_name, args.endpoint_url, args.region)
    page = Playground(target, args.port)
    print(f"playground for {target.description} on {page.url} (Ctrl-C stops)", flush=True)
    signal.signal(signal.SIGTERM, _stop)  # as Ctrl-C: a server it started goes with it
    try:
        page.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        page.server_close()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
