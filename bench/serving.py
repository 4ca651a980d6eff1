"""`make bench`: what the serving path costs and what it buys, in one run against a real tritonserver.

1. Overhead: the same text-to-image request called in-process through the runtime (decode, pipeline,
   encode) and through tritonserver over HTTP (JSON, as the AWS sample sends it); medians and the ratio.
2. Batching: N requests one after another, then all at once; wall times, their ratio and Triton's
   execute() counts (its statistics show the concurrent ones shared calls).
3. Transport: bytes on the wire for one upscaler result as JSON (base64) and as binary tensors.

Tiny weights on this machine measure the serving path; the GPU's numbers come from `make bench-gpu`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from client.base import binary_request, encode_image, request_body
from deploy.tritonserver import TritonServer
from sdmme import batching, images, pipelines, weights
from sdmme.spec import MODELS


def body(i: int, steps: int, size: int) -> dict:
    gen_args = {"num_inference_steps": steps, "height": size, "width": size, "seed": i}
    return request_body(f"a lighthouse, variation {i}", None, {}, gen_args)


def post(url: str, model: str, data: bytes, headers: dict = None) -> bytes:
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer", data=data, headers=headers or {}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.read()


def executions(url: str, model: str = "sd_base") -> int:
    with urllib.request.urlopen(f"http://{url}/v2/models/{model}/stats") as response:
        return json.loads(response.read())["model_stats"][0]["execution_count"]


def in_process(repository: Path, request: dict, repeats: int) -> float:
    """The runtime without Triton: parse, one pipeline call, encode, as execute() does them."""
    spec = MODELS["sd_base"]
    device, settings = pipelines.device_for("CPU", "0")
    runner = pipelines.Runner(
        pipelines.load(spec, weights.weights_dir(repository, "sd_base"), device, settings)
    )
    inputs = {
        item["name"]: np.array([[item["data"][0].encode()]], dtype=np.object_) for item in request["inputs"]
    }

    def once() -> float:
        start = time.perf_counter()
        job = batching.parse(spec, 0, inputs, runner.min_image_side)
        [generated] = batching.run(runner, [job])
        [images.encode(im, job.args["output_format"], job.args["quality"]) for im in generated]
        return time.perf_counter() - start

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def overhead(server: TritonServer, repository: Path, steps: int, size: int, repeats: int) -> list:
    request = body(0, steps, size)
    local = in_process(repository, request, repeats)
    data = json.dumps(request).encode()
    post(server.url, "sd_base", data)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        post(server.url, "sd_base", data)
        times.append(time.perf_counter() - start)
    served = statistics.median(times)
    return [
        f"Serving overhead, sd_base {size}x{size}, {steps} steps, median of {repeats}:",
        f"  in-process (runtime without Triton): {local:.3f}s",
        f"  through tritonserver (HTTP, JSON):   {served:.3f}s",
        f"  overhead: {100 * (served / local - 1):+.1f}%",
    ]


def batching_gain(server: TritonServer, count: int, steps: int, size: int) -> list:
    bodies = [json.dumps(body(i, steps, size)).encode() for i in range(count)]
    start, calls = time.monotonic(), executions(server.url)
    for data in bodies:
        post(server.url, "sd_base", data)
    sequential, sequential_calls = time.monotonic() - start, executions(server.url) - calls
    start, calls = time.monotonic(), executions(server.url)
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda data: post(server.url, "sd_base", data), bodies))
    concurrent, concurrent_calls = time.monotonic() - start, executions(server.url) - calls
    return [
        f"Batching, sd_base, {count} requests, {steps} steps, {size}x{size}:",
        f"  one at a time: {sequential:.2f}s in {sequential_calls} execute() calls",
        f"  all at once:   {concurrent:.2f}s in {concurrent_calls} execute() calls",
        f"  speed-up from batching: {sequential / concurrent:.2f}x",
    ]


def transport(server: TritonServer, side: int) -> list:
    """One upscaler result (side -> 4 x side, PNG) as JSON with base64, and as binary tensors."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    request = request_body(
        "sharp", None, {"image": picture}, {"num_inference_steps": 2, "seed": 0, "output_format": "png"}
    )
    json_out = post(server.url, "sd_upscale", json.dumps(request).encode())
    data, header_size = binary_request(request)
    binary_out = post(server.url, "sd_upscale", data, {"Inference-Header-Content-Length": str(header_size)})
    file_size = len(json.loads(json_out)["outputs"][0]["data"][0]) * 3 // 4
    return [
        f"Transport, sd_upscale {side}x{side} -> {4 * side}x{4 * side} PNG ({file_size} bytes as a file; "
        f"request image {len(encode_image(picture))} base64 characters):",
        f"  JSON (AWS sample):  request {len(json.dumps(request))} bytes, response {len(json_out)} bytes",
        f"  binary tensors:     request {len(data)} bytes, response {len(binary_out)} bytes "
        f"({100 * (1 - len(binary_out) / len(json_out)):.0f}% less)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--overhead-steps", type=int, default=20, help="about 1 s in-process here")
    parser.add_argument("--overhead-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--upscale-side", type=int, default=256)
    args = parser.parse_args()
    repository = args.model_repository.resolve()
    with TritonServer(repository) as server:
        report = overhead(server, repository, args.overhead_steps, args.overhead_size, args.repeats)
        report += batching_gain(server, args.requests, args.steps, args.size)
        report += transport(server, args.upscale_side)
    print("\n".join(report))


if __name__ == "__main__":
    main()
