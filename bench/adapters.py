"""`make bench-adapters`: a LoRA as an adapter of a warm model against the same LoRA as a model of its
own, at full size, through the local MME, in one run; and what a LoRA costs per denoising step, unfused
(PEFT's layers) and fused (how adapters are served).

SD 2.1-base's architecture with random full-size weights (fp16 safetensors, the real bytes) and random
rank-64 LoRAs of its attention projections (to_q, to_k, to_v, to_out.0), as a trainer writes them. Served
through the local MME (moto's S3 on loopback, tritonserver in SageMaker mode, this machine's CPU
environment env/sd_env, slim archives):
- as adapters: `make adapter` twice, `make upload`; sd_base.tar.gz called with gen_args.lora;
- as its own model: `make model LORA=` (fused at build time), its own archive.
Requests are small (64x64, 2 steps): what is measured is what adapters add. Appended to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from bench.local_s3 import local_s3
from bench.loras import write_lora
from bench.report import cpu_machine, publish
from client import base
from deploy.aws import package, upload
from deploy.local.mme.service import LocalEndpoint
from env import build
from sdmme.adapters import __main__ as make_adapter
from sdmme.tools import repository, weights

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "work" / "adapters"
REQUEST = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def per_step(weights_folder: Path, lora: Path, side: int, rounds: int) -> Dict[str, float]:
    """Seconds per guided UNet step (batch 2) in fp32 on this CPU: the model alone, with the LoRA as
    PEFT's unfused layers, and fused into the weights; interleaved rounds, the best of each."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(weights_folder / "unet", torch_dtype=torch.float32)
    unet.load_lora_adapter(str(lora), prefix="unet", adapter_name="lora")
    latents = torch.randn(2, 4, side // 8, side // 8)
    text = torch.randn(2, 77, unet.config.cross_attention_dim)

    @torch.inference_mode()
    def step() -> float:
        start = time.perf_counter()
        unet(latents, torch.tensor(500), encoder_hidden_states=text)
        return time.perf_counter() - start

    settings = {
        "model alone": lambda: unet.disable_adapters(),
        "LoRA unfused (PEFT)": lambda: unet.enable_adapters(),
        "LoRA fused": lambda: (unet.enable_adapters(), unet.fuse_lora()),
    }
    undo = {"LoRA fused": unet.unfuse_lora}
    times: Dict[str, List[float]] = {name: [] for name in settings}
    step()  # warm-up
    for _ in range(rounds):
        for name, setup in settings.items():
            setup()
            times[name].append(step())
            undo.get(name, lambda: None)()
    return {name: min(values) for name, values in times.items()}


def stub_rss(endpoint: LocalEndpoint) -> Dict[str, int]:
    """Resident memory of each model's stub process, by the model name the endpoint loaded it under."""
    import psutil

    found = {}
    for process in psutil.Process(endpoint.triton.process.pid).children(recursive=True):
        try:
            command = " ".join(process.cmdline())
            rss = process.memory_info().rss
        except psutil.Error:
            continue
        for target, model in endpoint.manager.models.items():
            if model.name in command:
                found[target] = found.get(target, 0) + rss
    return found


def timed(endpoint: LocalEndpoint, target: str, **gen_args) -> float:
    body = json.dumps(base.request_body("a lighthouse", None, {}, {**REQUEST, **gen_args})).encode()
    start = time.monotonic()
    endpoint.manager.invoke(target, body, "application/json")
    return time.monotonic() - start


def logged(log: Path, pattern: str) -> List[float]:
    """Seconds that the models' log lines matching `pattern` (a regex with one group) report."""
    return [float(m) for m in re.findall(pattern, log.read_text())]


def measure(
    weights_source: str, rank: int, env_dir: Path, repeats: int, rounds: int, side: int, work: Path = WORK
) -> Dict:

    repo = work / "model_repository"  # fill makes the model's folder
    weights_folder = weights.weights_dir(repo, "sd_base")
    marker = weights_folder / weights.SOURCE_FILE  # kept between runs; replaced when the kind differs
    other = marker.exists() and json.loads(marker.read_text())["source"] != weights_source
    weights.fill(repo, "sd_base", weights_source, force=other)
    shutil.rmtree(repo / "sd_base" / "adapters", ignore_errors=True)
    loras = {
        name: write_lora(weights_folder, work / "loras" / name, rank, seed)
        for name, seed in (("ink", 1), ("sun", 2))
    }
    results: Dict = {"rank": rank, "repeats": repeats}
    start = time.monotonic()
    records = {name: make_adapter.add(repo, "sd_base", name, str(path)) for name, path in loras.items()}
    results["make_adapter_s"] = (time.monotonic() - start) / len(loras)
    results["adapter_bytes"] = records["ink"]["bytes"]
    results["adapter_layers"] = records["ink"]["layers"]["unet"]
    start = time.monotonic()
    repository.add(repo, "sd_base_ink", "sd_base", str(weights_folder), lora=str(loras["ink"]), force=True)
    results["make_model_s"] = time.monotonic() - start
    say("per-step cost of the LoRA, in-process")
    results["per_step"] = per_step(weights_folder, loras["ink"], side, rounds)
    dist = work / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    archives = package.package(repo, ["sd_base", "sd_base_ink"], dist, env_dir, str(env_dir))
    results["archive_bytes"] = {path.name: path.stat().st_size for path in archives}

    root = work / "mme"
    shutil.rmtree(root, ignore_errors=True)
    python = build.verified_manifest(env_dir)["python"]
    with local_s3("bench") as (url, s3, single):
        upload.upload(s3, archives, "bench", "models", config=single)
        with LocalEndpoint(
            "bench", "models", root, max_models=2, s3_endpoint_url=url, python_version=python
        ) as endpoint:
            endpoint.manager.transfer_config = single
            log = root / "tritonserver.log"
            results["model_cold_s"] = timed(endpoint, "sd_base.tar.gz")
            results["alone_s"] = statistics.median(timed(endpoint, "sd_base.tar.gz") for _ in range(repeats))
            rss_alone = stub_rss(endpoint)["sd_base.tar.gz"]
            # adapters uploaded now, with the endpoint running
            upload.upload(s3, [], "bench", "models", config=single, adapters=upload.adapter_files(repo))
            results["cold_adapter_s"] = timed(endpoint, "sd_base.tar.gz", lora="ink")
            results["warm_adapter_s"] = statistics.median(
                timed(endpoint, "sd_base.tar.gz", lora="ink") for _ in range(repeats)
            )
            timed(endpoint, "sd_base.tar.gz", lora="sun")  # both loaded now
            switches = [
                timed(endpoint, "sd_base.tar.gz", lora=name)
                for _ in range(repeats)
                for name in ("ink", "sun")
            ]
            results["switch_s"] = statistics.median(switches)
            results["back_to_alone_s"] = timed(endpoint, "sd_base.tar.gz")
            rss_adapters = stub_rss(endpoint)["sd_base.tar.gz"]
            results["fetch_s"] = logged(log, r"adapter \w+: fetched from \S+ \([\d.]+ MB in ([\d.]+)s\)")
            results["load_s"] = logged(log, r"adapter \w+ loaded from .* in ([\d.]+)s")
            results["fuse_s"] = logged(log, r"fused [\w@., ]+ in ([\d.]+)s")
            results["unfuse_s"] = logged(log, r"back to the model alone in ([\d.]+)s")
            results["own_model_cold_s"] = timed(endpoint, "sd_base_ink.tar.gz")
            results["own_model_s"] = statistics.median(
                timed(endpoint, "sd_base_ink.tar.gz") for _ in range(repeats)
            )
            rss = stub_rss(endpoint)
            results["rss"] = {
                "alone": rss_alone,
                "with two adapters": rss_adapters,
                "own model": rss["sd_base_ink.tar.gz"],
            }
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(dist, ignore_errors=True)
    return results


def _median(values: List[float]) -> float:
    return statistics.median(values) if values else 0.0


def report(r: Dict, machine: str, side: int) -> str:
    mb, day = 1e6, time.strftime("%Y-%m-%d")
    steps = r["per_step"]
    alone_step = steps["model alone"]
    step_rows = [f"| {name} | {s:.3f}s | {100 * (s / alone_step - 1):+.1f}% |" for name, s in steps.items()]
    fetch, load, fuse, unfuse = (_median(r[k]) for k in ("fetch_s", "load_s", "fuse_s", "unfuse_s"))
    archive, rss = r["archive_bytes"], r["rss"]
    own_mb, base_mb = archive["sd_base_ink.tar.gz"] / mb, archive["sd_base.tar.gz"] / mb
    lines = [
        f"\n## make bench-adapters: a LoRA as an adapter and as its own model ({day}; {machine})\n",
        f"Rank-{r['rank']} LoRA of the attention projections ({r['adapter_layers']} layers), SD 2.1-base's "
        "architecture with random full-size weights; local MME (moto's S3 on loopback, tritonserver in "
        "SageMaker mode, the CPU environment, slim archives); requests of 64x64, 2 steps, medians.\n",
        f"Per guided UNet step (batch 2) at {side}x{side}, fp32, best of interleaved rounds:\n",
        "| LoRA | per step | against the model alone |",
        "|---|---|---|",
        *step_rows,
        "",
        "| | as an adapter of sd_base | as its own model (make model LORA=) |",
        "|---|---|---|",
        f"| S3 bytes | {r['adapter_bytes'] / mb:,.1f} MB | {own_mb:,.0f} MB (slim archive; sd_base's: "
        f"{base_mb:,.0f} MB) |",
        f"| made in | {r['make_adapter_s']:.1f}s (make adapter) | {r['make_model_s']:.1f}s (make model) |",
        f"| first image, cold | {r['cold_adapter_s']:.2f}s (warm model, cold adapter: fetch {fetch:.2f}s, "
        f"load {load:.2f}s, fuse {fuse:.3f}s) | {r['own_model_cold_s']:.2f}s (a cold model) |",
        f"| a request, warm | {r['warm_adapter_s']:.2f}s (the model alone: {r['alone_s']:.2f}s) "
        f"| {r['own_model_s']:.2f}s |",
        f"| switching between two loaded adapters | {r['switch_s']:.2f}s a request, fusing {fuse:.3f}s of it "
        "| a request to another model |",
        f"| back to the model alone | {r['back_to_alone_s']:.2f}s a request, unfusing {unfuse:.3f}s "
        "of it | |",
        f"| memory (the model's stub process, RSS) | {rss['alone'] / mb:,.0f} MB alone, "
        f"{rss['with two adapters'] / mb:,.0f} MB with two adapters loaded | {rss['own model'] / mb:,.0f} MB "
        "in a process of its own: a second copy of the model |",
        "",
        f"A cold adapter added {fetch + load + fuse:.2f}s to a request as the model logged it (fetch, load, "
        f"fuse; target: under 3 s), a switch {fuse:.2f}s (target: under 0.5 s); end to end, against requests "
        f"of {r['alone_s']:.2f}s alone, they took {r['cold_adapter_s'] - r['alone_s']:+.2f}s and "
        f"{r['switch_s'] - r['alone_s']:+.2f}s (one cold request; the median of {2 * r['repeats']} "
        "switches). The first image with a cold adapter came "
        f"{r['own_model_cold_s'] / r['cold_adapter_s']:.1f}x sooner than that of a cold model of its own.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--weights", choices=("full", "tiny"), default="full", help="tiny: a quick run of the code"
    )
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of the per-step measurement"
    )
    parser.add_argument("--side", type=int, default=512, help="image side of the per-step measurement")
    parser.add_argument("--env", type=Path, default=build.OUTPUT, help="the environment (make env)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    results = measure(args.weights, args.rank, args.env, args.repeats, args.rounds, args.side)
    say(json.dumps(results))
    publish(report(results, cpu_machine(), args.side), docs=not args.no_docs)


if __name__ == "__main__":
    main()
