"""The four models served by the real tritonserver (nvidia-pytriton's) and called as the AWS sample calls
them: each input a BYTES tensor of shape [1, 1] in a JSON body, `generated_image` (base64) read back.

What a GPU instance behind the MME does, minus SageMaker: one server with all four models at full size
(random weights from the published configs, or `--tiny`), a first call per model (its kernels warm up)
and then `--repeats` timed calls; then `make bench`'s serving overhead for sd_base (the same request
in-process and served). `--set` gives every model a speed setting (a config.pbtxt parameter, e.g.
compile=reduce-overhead). Prints a markdown table and appends it to `--out`. Run on a GPU machine by
`bash bench/device.sh serve`; `--tiny --side 64 --steps 2` runs it on CPU (tests).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import torch
from PIL import Image

from bench import serving
from client.base import images_from_response, request_body
from deploy.local.tritonserver import TritonServer
from sdmme import model_folder
from sdmme.settings import Settings
from sdmme.spec import MODELS
from sdmme.tools import weights

ROOT = Path(__file__).resolve().parent.parent


def repository(dest: Path, tiny: bool, settings: Dict[str, str]) -> Path:
    """The four default models, with weights built in place (kept between runs) and `settings` as
    config.pbtxt parameters (sdmme/settings.py: e.g. compile inside tritonserver)."""
    for model in MODELS:
        weights.fill(dest, model, "tiny" if tiny else "full")
        model_folder.write(dest / model, model, settings)
    return dest


def sample_body(model: str, side: int, steps: int) -> dict:
    """The AWS sample's request for `model`: images at `side` pixels (the upscaler's a quarter of it)."""
    spec = MODELS[model]
    args = {"num_inference_steps": steps, "seed": 1}
    if "height" in spec.validate_args({}):
        args.update(height=side, width=side)
    image_side = side // 4 if model == "sd_upscale" else side  # x4: the same output size
    images = {
        name: Image.new("L" if name == "mask_image" else "RGB", (image_side, image_side), 128)
        for name in spec.image_inputs
    }
    return request_body("a lighthouse at dawn, oil painting", "blurry", images, args)


def call(port: int, model: str, body: dict) -> tuple:
    """One request over HTTP; returns (status, seconds, output size or the error's message)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            files, _ = images_from_response(json.loads(response.read()))
            status = response.status
    except urllib.error.HTTPError as e:
        message = e.read().decode(errors="replace")[:300].replace("|", "/")
        return e.code, time.perf_counter() - start, message
    seconds = time.perf_counter() - start
    return status, seconds, "x".join(map(str, Image.open(io.BytesIO(files[0])).size))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repository", type=Path, required=True, help="built here (weights kept)")
    parser.add_argument("--tiny", action="store_true", help="tiny weights instead of full size")
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="a speed setting for every model"
    )
    args = parser.parse_args(argv)
    settings = dict(item.partition("=")[::2] for item in args.set)
    try:  # as the models' loads will, before minutes of building weights and starting the server
        Settings.from_parameters(settings, "GPU")
    except ValueError as e:
        parser.error(f"--set: {e}")
    repo = repository(args.repository, args.tiny, settings)
    log_file = args.out.with_name("tritonserver.log")
    rows, failed = [], False
    started = time.monotonic()
    with TritonServer(repo, log_file=log_file) as server:
        print(f"tritonserver ready with {', '.join(MODELS)} in {time.monotonic() - started:.0f}s", flush=True)
        for model in MODELS:
            body = sample_body(model, args.side, args.steps)
            first = call(server.http_port, model, body)
            timed = [call(server.http_port, model, body) for _ in range(args.repeats)]
            statuses = {first[0], *(t[0] for t in timed)}
            failed |= statuses != {200}
            median = statistics.median(t[1] for t in timed) if timed else float("nan")
            side = args.side // 4 if model == "sd_upscale" else args.side
            codes = ", ".join(map(str, sorted(statuses)))
            row = (
                f"| {model} | {side} px, {args.steps} steps | {codes} | {first[2]} "
                f"| {first[1]:.2f} s | {median:.2f} s |"
            )
            print(row, flush=True)
            rows.append(row)
        # the same sd_base request in-process (on the device the server's instance has) and served
        kind = "GPU" if torch.cuda.is_available() else "CPU"
        overhead = serving.overhead(server, repo, args.steps, args.side, args.repeats, kind, settings)
        print("\n".join(overhead), flush=True)

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    report = [
        f"## Served by tritonserver, AWS sample payloads: {device}; {datetime.date.today().isoformat()}",
        "",
        f"{'Tiny' if args.tiny else 'Full-size random'} weights; one server, the four models; settings: "
        f"{', '.join(f'{k}={v}' for k, v in settings.items()) or 'the defaults'}; HTTP JSON, first call "
        f"apart, then the median of {args.repeats}.",
        "",
        "| model | request | status | output | first call | median |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "```",
        *overhead,
        "```",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(report) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
