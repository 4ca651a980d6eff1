"""Does server-side batching pay? N requests one after another vs the same N sent at once.

`make bench` (tiny weights on this machine; real weights on a GPU box give the number that matters).
Reports both wall times and their ratio from one run, plus how many execute() calls Triton made.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from client.base import request_body
from deploy.tritonserver import TritonServer


def payload(i: int, steps: int, size: int) -> bytes:
    gen_args = {"num_inference_steps": steps, "height": size, "width": size, "seed": i}
    return json.dumps(request_body(f"a lighthouse, variation {i}", None, {}, gen_args)).encode()


def infer(url: str, body: bytes) -> None:
    request = urllib.request.Request(f"http://{url}/v2/models/sd_base/infer", data=body)
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()


def executions(url: str) -> int:
    with urllib.request.urlopen(f"http://{url}/v2/models/sd_base/stats") as response:
        return json.loads(response.read())["model_stats"][0]["execution_count"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    bodies = [payload(i, args.steps, args.size) for i in range(args.requests)]
    with TritonServer(args.model_repository.resolve()) as server:
        infer(server.url, bodies[0])  # warm-up
        start, calls = time.monotonic(), executions(server.url)
        for body in bodies:
            infer(server.url, body)
        sequential, sequential_calls = time.monotonic() - start, executions(server.url) - calls
        start, calls = time.monotonic(), executions(server.url)
        with ThreadPoolExecutor(len(bodies)) as pool:
            list(pool.map(lambda body: infer(server.url, body), bodies))
        concurrent, concurrent_calls = time.monotonic() - start, executions(server.url) - calls
    print(f"sd_base, {args.requests} requests, {args.steps} steps, {args.size}x{args.size}")
    print(f"one at a time: {sequential:.2f}s in {sequential_calls} execute() calls")
    print(f"all at once:   {concurrent:.2f}s in {concurrent_calls} execute() calls")
    print(f"speed-up from batching: {sequential / concurrent:.2f}x")


if __name__ == "__main__":
    main()
