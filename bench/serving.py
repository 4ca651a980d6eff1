"""`make bench`: what the serving path costs and what it buys, in one run against a real tritonserver.

1. Overhead: the same text-to-image request called in-process through the runtime (decode, pipeline,
   encode) and through tritonserver over HTTP (JSON, as the AWS sample sends it); medians and the ratio.
2. Batching: N requests one after another, then all at once; wall times, their ratio and Triton's
   execute() counts (its statistics show the concurrent ones shared calls).
3. Transport: bytes on the wire for one upscaler result as JSON (base64) and as binary tensors.
4. Load: mixed requests (all four models, varied arguments) from many concurrent clients; failures
   (expected: none) and latency percentiles.
5. Telemetry: the same request to two copies of sd_base on one server, with the request log and metrics
   on (the default) and off, alternating: medians, their difference and ratio; and telemetry's own
   time as the model clocks it (sdmme_telemetry_seconds_total), per request and as a share.

Tiny weights on this machine measure the serving path; the GPU's numbers come from `make bench-gpu`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

import sdmme
from client.base import binary_request, encode_image, request_body
from deploy.local.tritonserver import TritonServer
from deploy.ops import stats
from sdmme import loader, model_folder
from sdmme.serving import batching, images, telemetry
from sdmme.tools import weights

ROOT = Path(__file__).resolve().parent.parent


def body(i: int, steps: int, size: int) -> dict:
    gen_args = {"num_inference_steps": steps, "height": size, "width": size, "seed": i}
    return request_body(f"a lighthouse, variation {i}", None, {}, gen_args)


def post(url: str, model: str, data: bytes, headers: dict = None) -> bytes:
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer", data=data, headers=headers or {}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return response.read()


def model_stats(url: str, model: str = "sd_base") -> dict:
    with urllib.request.urlopen(f"http://{url}/v2/models/{model}/stats") as response:
        return json.loads(response.read())["model_stats"][0]


def counted(url: str, model: str, before: dict, requests: int, timeout: float = 30.0) -> dict:
    """Triton's statistics once they count `requests` inferences more than `before`: Triton counts an
    execute() when it returns, which can be after that call's answers reached their callers."""
    deadline = time.monotonic() + timeout
    while True:
        now = model_stats(url, model)
        if now["inference_count"] - before["inference_count"] >= requests or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def in_process(
    repository: Path, request: dict, repeats: int, kind: str = "CPU", parameters: Optional[dict] = None
) -> float:
    """The runtime without Triton: parse, one pipeline call, encode, as execute() does them, on the
    device and with the settings a Triton instance of `kind` (CPU, GPU) with these config.pbtxt
    `parameters` gets."""
    parameters = {**(parameters or {}), model_folder.KIND_PARAMETER: "sd_base"}
    spec, device, settings = loader.prepare(parameters, kind)
    runner = loader.load(spec, repository / "sd_base", device, settings).runner
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


def in_process_like_a_model(
    repository: Path, request: dict, repeats: int, kind: str, parameters: dict
) -> float:
    """`in_process` in a child process set up as a model process is (its OpenMP policy)."""
    code = "import json, sys; from pathlib import Path; from bench.serving import in_process; " + (
        "print(in_process(Path(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], "
        "json.loads(sys.argv[5])))"
    )
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", sdmme.OMP_WAIT_POLICY))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(repository),
            json.dumps(request),
            str(repeats),
            kind,
            json.dumps(parameters),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def overhead(
    server: TritonServer,
    repository: Path,
    steps: int,
    size: int,
    repeats: int,
    kind: str = "CPU",
    parameters: Optional[dict] = None,
) -> list:
    """The same request in-process and through the server, whose sd_base is a `kind` instance (CPU,
    GPU) with these config.pbtxt `parameters`."""
    request = body(0, steps, size)
    local = in_process_like_a_model(repository, request, repeats, kind, parameters or {})
    data = json.dumps(request).encode()
    before = model_stats(server.url)
    post(server.url, "sd_base", data)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        post(server.url, "sd_base", data)
        times.append(time.perf_counter() - start)
    served = statistics.median(times)
    counted(server.url, "sd_base", before, repeats + 1)  # a next section's statistics start from here
    return [
        f"Serving overhead, sd_base {size}x{size}, {steps} steps, median of {repeats}:",
        f"  in-process (runtime without Triton): {local:.3f}s",
        f"  through tritonserver (HTTP, JSON):   {served:.3f}s",
        f"  overhead: {100 * (served / local - 1):+.1f}%",
    ]


def telemetry_overhead(
    repository: Path, steps: int, size: int, rounds: int, work: Optional[Path] = None
) -> list:
    """sd_base as `observed` (request log and metrics on, the default) and `unobserved` (both off) in one
    tritonserver, the same weights; one request to each per round, the order alternating. The server's
    repository and log go in `work` (default: a temporary folder)."""
    settings = {"observed": {}, "unobserved": {"request_log": "false", "metrics": "false"}}
    with tempfile.TemporaryDirectory(prefix="bench-telemetry-") as folder:
        repo = work or Path(folder)
        for name, parameters in settings.items():
            model_folder.write(repo / name, "sd_base", parameters)
            (repo / name / "1" / "weights").symlink_to(weights.weights_dir(repository, "sd_base"))
        data = json.dumps(body(0, steps, size)).encode()
        times = {name: [] for name in settings}
        with TritonServer(repo, log_file=repo / "tritonserver.log") as server:
            metrics = f"127.0.0.1:{server.metrics_port}"
            for name in settings:
                post(server.url, name, data)  # warm-up
            before = stats.scrape(metrics)
            for i in range(rounds):
                for name in list(settings)[:: 1 if i % 2 == 0 else -1]:
                    start = time.perf_counter()
                    post(server.url, name, data)
                    times[name].append(time.perf_counter() - start)
            time.sleep(telemetry.PUBLISH_EVERY_S)
            post(server.url, "observed", data)  # its execute() publishes the time the rounds spent
            after = stats.scrape(metrics)

    def spent(samples, name):
        return stats.total(samples, name, model="observed")

    own = spent(after, "sdmme_telemetry_seconds_total") - spent(before, "sdmme_telemetry_seconds_total")
    in_model = spent(after, "sdmme_request_seconds_sum") - spent(before, "sdmme_request_seconds_sum")
    requests = spent(after, "sdmme_request_seconds_count") - spent(before, "sdmme_request_seconds_count")
    on, off = statistics.median(times["observed"]), statistics.median(times["unobserved"])
    return [
        f"Telemetry, sd_base {size}x{size}, {steps} steps, median of {rounds} alternating rounds:",
        f"  request log and metrics off: {off:.4f}s",
        f"  request log and metrics on:  {on:.4f}s",
        f"  difference: {1000 * (on - off):+.2f} ms per request ({100 * (on / off - 1):+.2f}%): two model "
        "processes, so this includes their difference",
        f"  telemetry's own time, measured inside the model: {1000 * own / requests:.3f} ms per request, "
        f"{100 * own / in_model:.3f}% of the request's time in the model, {100 * own / requests / on:.3f}% "
        "of the time its caller waited",
    ]


def batching_gain(server: TritonServer, count: int, steps: int, size: int) -> list:
    bodies = [json.dumps(body(i, steps, size)).encode() for i in range(count)]
    start, before = time.monotonic(), model_stats(server.url)
    for data in bodies:
        post(server.url, "sd_base", data)
    sequential = time.monotonic() - start
    after = counted(server.url, "sd_base", before, count)
    sequential_calls = after["execution_count"] - before["execution_count"]
    start, before = time.monotonic(), after
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda data: post(server.url, "sd_base", data), bodies))
    concurrent = time.monotonic() - start
    after = counted(server.url, "sd_base", before, count)
    concurrent_calls = after["execution_count"] - before["execution_count"]
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


def mixed_request(i: int, rng: random.Random) -> tuple:
    """One of the four models with varied arguments (cheap enough for a CPU run)."""
    model = ("sd_base", "sd_depth", "sd_inpaint", "sd_upscale")[i % 4]
    gen_args = {
        "num_inference_steps": rng.randint(2, 3),  # img2img runs steps x strength (0.8): at least one
        "seed": i,
        "num_images_per_prompt": rng.choice([1, 1, 2]),
        "scheduler": rng.choice(["default", "ddim", "euler", "euler_a", "dpm++", "unipc"]),
        "output_format": rng.choice(["jpeg", "png", "webp"]),
    }
    if model == "sd_base":
        gen_args.update(height=rng.choice([64, 72]), width=rng.choice([64, 72]))
    side = rng.choice([16, 32] if model == "sd_upscale" else [32, 48])
    rgb = np.random.default_rng(i).integers(0, 256, (side, side, 3), dtype=np.uint8)
    images = {}
    if model != "sd_base":
        images["image"] = Image.fromarray(rgb)
    if model == "sd_inpaint":
        images["mask_image"] = Image.fromarray(rgb[..., 0] > 127)
    return model, request_body(f"a lighthouse, variation {i}", "blurry", images, gen_args), gen_args


def mixed(server: TritonServer, count: int = 200, clients: int = 16) -> dict:
    """`count` mixed requests from `clients` concurrent clients; every answer checked."""
    rng = random.Random(0)
    calls = [mixed_request(i, rng) for i in range(count)]

    def call(item):
        model, body, gen_args = item
        start = time.perf_counter()
        try:
            answer = json.loads(post(server.url, model, json.dumps(body).encode()))
            data = answer["outputs"][0]["data"]
            assert len(data) == gen_args["num_images_per_prompt"], f"{len(data)} images"
            for item in data:
                Image.open(io.BytesIO(base64.b64decode(item))).load()
            return time.perf_counter() - start, None
        except urllib.error.HTTPError as e:
            return time.perf_counter() - start, f"{model}: HTTP {e.code}: {e.read()[:300]!r}"
        except Exception as e:
            return time.perf_counter() - start, f"{model}: {type(e).__name__}: {e}"

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(call, calls))
    latencies = sorted(seconds for seconds, _ in results)
    failures = [error for _, error in results if error]
    return {
        "ok": count - len(failures),
        "failures": failures,
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "seconds": time.perf_counter() - start,
    }


def load_report(server: TritonServer, count: int, clients: int) -> list:
    result = mixed(server, count, clients)
    failed, seconds = len(result["failures"]), result["seconds"]
    return [
        f"Mixed load, {count} requests (all four models, varied arguments), {clients} concurrent clients:",
        f"  {result['ok']} answered with valid images, {failed} failed, in {seconds:.1f}s",
        f"  latency p50 {result['p50']:.2f}s, p99 {result['p99']:.2f}s",
    ] + [f"  failure: {f}" for f in result["failures"][:5]]


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
    parser.add_argument("--mixed-requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--telemetry-steps", type=int, default=20)
    parser.add_argument("--telemetry-size", type=int, default=256, help="about 0.5 s a request here")
    parser.add_argument("--telemetry-rounds", type=int, default=30)
    args = parser.parse_args()
    repository = args.model_repository.resolve()
    with TritonServer(repository) as server:
        report = overhead(server, repository, args.overhead_steps, args.overhead_size, args.repeats)
        report += batching_gain(server, args.requests, args.steps, args.size)
        report += transport(server, args.upscale_side)
        report += load_report(server, args.mixed_requests, args.clients)
    report += telemetry_overhead(repository, args.telemetry_steps, args.telemetry_size, args.telemetry_rounds)
    print("\n".join(report))


if __name__ == "__main__":
    main()
