"""`make bench-gpu`: the full-size pipelines on a GPU, through the runtime the Triton models use.

Measures, in one run, and appends to docs/benchmarks.md with the GPU, versions and date:
- SD 2.1-base, 512x512, 50 steps, batch 1: latency, it/s, achieved TFLOP/s and the host syncs inside
  the denoising loop (torch.cuda.set_sync_debug_mode) for each setting without compile: today's
  default (SDPA), xformers when installed, the sync-free loop, + CUDA graphs, + channels_last and/or
  fused QKV on top, in interleaved rounds; the first call's extra time (the graphs' capture); each
  setting's image against today's default, same seed;
- images/s at batch 1, 4 and 8 with the fastest of them, and peak GPU memory;
- each scheduler (gen_args.scheduler) with today's default and with the fastest;
- adapters with it: a rank-64 LoRA of the attention projections fused (as served) and as PEFT's unfused
  layers, the time to load one onto the GPU and fuse it, and a switch between two loaded ones;
- depth and inpaint at 512x512; the upscaler at 128->512 and 256->1024 with and without VAE tiling;
- the largest upscaler input that fits in the memory of the default instance's GPU (A10G, 24 GB);
- compile artifacts for each compile mode: the cold compile that builds them, a cold load with and
  without them (fresh processes), latency at batch 1 and 8 and a first request at a new size;
- last, the fastest setting + torch.compile, whose compile time is reported apart.
`--skip` leaves out batching, the schedulers, the other models or the upscaler's limit (a short lease).

Weights: the model_repository's when they came from the hub, else full-size random weights built,
when first needed, from the published configs (same shapes, so the same speed and memory). Without a
CUDA GPU it says so and exits with status 2. `--device cpu --tiny` runs the same code on tiny weights
(for tests).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from sdmme import loader
from sdmme.pipeline import compile_artifacts, speed, sync_free
from sdmme.pipeline.runner import Runner, free_memory, is_out_of_memory
from sdmme.serving import batching
from sdmme.settings import Settings
from sdmme.spec import MODELS, SCHEDULERS
from sdmme.tools import weights

ROOT = Path(__file__).resolve().parent.parent
A10G_BYTES = 22 * 2**30  # an A10G's 24 GB less the CUDA context and the allocator's slack


@dataclass
class Result:
    label: str
    seconds: float  # median latency of one call
    steps: int
    images: int = 1
    peak_gb: Optional[float] = None
    tflops: Optional[float] = None
    compile_s: Optional[float] = None
    syncs: Optional[int] = None  # host syncs inside the denoising loop of one call (GPU only)
    times: List[float] = field(default_factory=list)  # every timed call
    image: object = None  # the first image of the sync-counting call, to compare settings

    def row(self) -> str:
        cells = [
            self.label,
            f"{self.seconds:.3f}",
            f"{self.steps / self.seconds:.1f}",
            f"{self.images / self.seconds:.2f}",
            "" if self.tflops is None else f"{self.tflops:.3g}",
            "" if self.peak_gb is None else f"{self.peak_gb:.1f}",
            "" if self.compile_s is None else f"{self.compile_s:.1f}",
            "" if self.syncs is None else str(self.syncs),
        ]
        return "| " + " | ".join(cells) + " |"


HEADER = (
    "| setting / case | latency (s) | it/s | images/s | TFLOP/s | peak GPU memory (GB) "
    "| first call's extra: compile or capture (s) | host syncs in the loop |\n"
    "|---|---|---|---|---|---|---|---|"
)
FAILED_CELLS = " | | | | | | |"  # after a failed row's reason


class Bench:
    def __init__(self, device: torch.device, weight_folder: Callable[[str], Path], repeats: int):
        self.device = device
        self.weight_folder = weight_folder  # a model's weights, built the first time they are asked for
        self.repeats = repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def load(self, model: str, settings: Settings) -> Runner:
        free_memory(self.device)
        folder = self.weight_folder(model)
        return loader.load(MODELS[model], folder.parent.parent, self.device, settings, weights=folder).runner

    def timed(self, runner, jobs) -> float:
        self.sync()
        start = time.perf_counter()
        batching.run(runner, jobs)
        self.sync()
        return time.perf_counter() - start

    def measure(self, label: str, runner, jobs, steps: int, first_call: bool = False) -> Result:
        """Median of `repeats` calls after one warm-up call (whose extra time is the compile time)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        warm = self.timed(runner, jobs)
        times = [self.timed(runner, jobs) for _ in range(self.repeats)]
        median = statistics.median(times)
        result = Result(label, median, steps, images=sum(len(j.seeds) for j in jobs), times=times)
        if self.device.type == "cuda":
            result.peak_gb = torch.cuda.max_memory_allocated(self.device) / 1e9
        if first_call:
            result.compile_s = max(0.0, warm - median)  # noise can make it negative when nothing is prepared
        return result

    def host_syncs(self, runner, jobs, result: Result) -> None:
        """One more call, counting the host syncs inside its denoising loop (CUDA's sync debug mode);
        keeps its first image."""
        scheduler = runner.scheduler(jobs[0].args["scheduler"])
        cuda = self.device.type == "cuda"

        def mode(value):
            return (lambda: torch.cuda.set_sync_debug_mode(value)) if cuda else (lambda: None)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with sync_free.during_loop(runner.pipeline, scheduler, mode("warn"), mode(0)):
                [[result.image, *_], *_] = batching.run(runner, jobs)
        if cuda:
            result.syncs = sum("synchroniz" in str(w.message) for w in caught)

    def unet_flops(self, runner, job: batching.Job) -> float:
        """FLOPs of one image's denoising loop: one guided UNet call (batch 2) counted, times the steps."""
        from torch.utils.flop_counter import FlopCounterMode

        unet = runner.pipeline.unet
        latents = torch.zeros(2, 4, job.args["height"] // 8, job.args["width"] // 8, device=self.device)
        context = torch.zeros(2, 77, unet.config.cross_attention_dim, device=self.device)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            unet(latents.to(unet.dtype), 999, context.to(unet.dtype))
        return counter.get_total_flops() * job.args["num_inference_steps"]


def job(model: str, steps: int, side: int, seed: int = 0) -> batching.Job:
    """One request of `model` with `steps` denoising steps, at `side` pixels (input side for images)."""
    request = batching.warmup_job(MODELS[model], side, steps, seed)
    request.prompt = "a lighthouse at dawn"
    return request


TODAY = "SDPA (today's default)"


def settings_to_compare(dtype: str = "float16") -> Dict[str, Settings]:
    """The settings without compile, each adding one option; compile is measured last, on the fastest."""
    base = Settings(dtype=dtype, adapters="none")  # the GPU defaults (float16); fused QKV needs no adapters
    variants = {TODAY: base}
    try:
        import xformers  # noqa: F401

        variants["xformers"] = base.replace(attention="xformers")
    except ImportError:
        print("xformers is not installed: its row is skipped", flush=True)
    variants["sync-free loop"] = base.replace(sync_free=True)
    graphs = base.replace(sync_free=True, cuda_graphs=True)
    variants["sync-free + CUDA graphs"] = graphs
    variants["sync-free + CUDA graphs + channels_last"] = graphs.replace(channels_last=True)
    variants["sync-free + CUDA graphs + fused QKV"] = graphs.replace(fuse_qkv=True)
    variants["sync-free + CUDA graphs + channels_last + fused QKV"] = graphs.replace(
        channels_last=True, fuse_qkv=True
    )
    return variants


def against(images: Dict[str, object], reference: str) -> str:
    """Each setting's image against the reference's (same seed): identical, or the largest difference."""
    base = np.asarray(images[reference], dtype=np.int16)
    said = []
    for label, image in images.items():
        if label != reference:
            difference = int(np.abs(np.asarray(image, dtype=np.int16) - base).max())
            said.append(
                f"{label}: " + ("identical" if difference == 0 else f"at most {difference}/255 apart")
            )
    return "; ".join(said)


def largest_upscale_input(bench: Bench, settings: Settings, sides: List[int]) -> Optional[int]:
    """Largest square input side whose 2-step upscale runs within A10G_BYTES (allocator capped)."""
    if bench.device.type != "cuda":
        return None
    index = bench.device.index if bench.device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, A10G_BYTES / total), index)
    best = None
    try:
        runner = bench.load("sd_upscale", settings)
        for side in sides:
            try:
                bench.timed(runner, [job("sd_upscale", 2, side)])
                best = side
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                break
            finally:
                free_memory(bench.device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)
    return best


class Report(list):
    """The report's lines, each printed as it comes: a run cut short (a lent GPU's time limit) still
    shows what it measured."""

    def append(self, line: str) -> None:
        print(line, flush=True)
        super().append(line)

    def __iadd__(self, lines):
        for line in lines:
            self.append(line)
        return self


ARTIFACT_MODES = ("default", "reduce-overhead", "max-autotune")


def merged(results: List[Result]) -> Result:
    """One setting measured in several rounds: the median of all its timed calls."""
    first, seconds = results[0], statistics.median(t for r in results for t in r.times)
    peaks = [r.peak_gb for r in results if r.peak_gb is not None]
    return replace(
        first,
        seconds=seconds,
        times=[t for r in results for t in r.times],
        peak_gb=max(peaks) if peaks else None,
        tflops=None if first.tflops is None else first.tflops * first.seconds / seconds,
    )


class Run:
    """One `make bench-gpu` run: its report, the one pipeline in memory, and what the settings section
    found fastest, which the later sections measure with."""

    def __init__(self, bench: Bench, steps: int):
        self.bench, self.steps, self.lines = bench, steps, Report()
        self.loaded: Dict[tuple, Runner] = {}  # the one pipeline in memory, kept for the next case
        self.base_job = job("sd_base", steps, 512)
        self.variants: Dict[str, Settings] = {}
        self.best_label, self.best, self.best_settings = "", None, None

    def unload(self) -> None:
        self.loaded.clear()
        free_memory(self.bench.device)

    def attempt(self, label: str, model: str, settings: Settings, jobs, first_call=False, show=True):
        """One case measured (a row), or a row saying why it failed; None then."""
        bench = self.bench
        try:
            if (model, settings) not in self.loaded:
                self.unload()
                start = time.perf_counter()
                self.loaded[model, settings] = bench.load(model, settings)
                print(f"  ({model}: loaded in {time.perf_counter() - start:.1f}s)", flush=True)
            runner = self.loaded[model, settings]
            first_call = first_call or settings.cuda_graphs  # the graphs are captured in the first call
            result = bench.measure(label, runner, jobs, self.steps, first_call=first_call)
            bench.host_syncs(runner, jobs, result)
            if model == "sd_base":
                flops = bench.unet_flops(runner, jobs[0]) * result.images  # the jobs are all alike
                result.tflops = flops / result.seconds / 1e12
            (self.lines.append if show else print)(result.row())
            return result
        except Exception as e:
            self.unload()
            what = "out of memory" if is_out_of_memory(e) else f"failed: {type(e).__name__}: {e}"
            self.lines.append(f"| {label} | {what[:200].replace('|', '/')}{FAILED_CELLS}")
            return None


def settings_section(run: Run, rounds: int, dtype: str) -> bool:
    """The eager settings in `rounds` interleaved rounds; whether any ran (the rest needs the fastest)."""
    steps = run.steps
    run.lines += [f"SD 2.1-base (`sd_base`), 512x512, {steps} steps, batch 1, {dtype}:", "", HEADER]
    run.variants = settings_to_compare(dtype)
    measured: Dict[str, List[Result]] = {label: [] for label in run.variants}
    for round_ in range(1, rounds + 1):
        print(f"  (round {round_} of {rounds})", flush=True)
        for label, settings in run.variants.items():
            if round_ == 1 or measured[label]:  # a setting that failed once is not tried again
                result = run.attempt(label, "sd_base", settings, [run.base_job], show=False)
                if result is not None:
                    measured[label].append(result)
    results = {}
    for label, settings in run.variants.items():
        if measured[label]:
            results[label] = (merged(measured[label]), settings)
            run.lines.append(results[label][0].row())
    if not results:
        return False
    run.best_label, (run.best, run.best_settings) = min(results.items(), key=lambda item: item[1][0].seconds)
    run.lines += [
        "",
        f"Fastest without compile: {run.best_label} ({run.best.seconds:.3f} s); rounds: {rounds}.",
    ]
    images = {label: measured[label][0].image for label in results}
    if TODAY in images and len(images) > 1:
        run.lines.append(f"Images against {TODAY}, same seed: {against(images, TODAY)}.")
    run.lines.append("")
    return True


def batching_section(run: Run) -> None:
    steps = run.steps
    run.lines += [
        f"Batching with {run.best_label}: one call of n requests, 512x512, {steps} steps:",
        "",
        HEADER,
    ]
    for n in (1, 4, 8):
        jobs = [replace(job("sd_base", steps, 512, seed=i), index=i) for i in range(n)]
        run.attempt(f"batch {n}", "sd_base", run.best_settings, jobs)
    run.lines.append("")


def schedulers_section(run: Run) -> None:
    # PNDM, the SD 2 default, reads a GPU tensor on the host at every step (`prev_timestep >= 0`),
    # so the CPU waits for each UNet call before it queues the next; Euler keeps its sigmas on the CPU.
    run.lines += [f"Schedulers (gen_args.scheduler), {run.steps} steps:", "", HEADER]
    compared = {TODAY: run.variants[TODAY], run.best_label: run.best_settings}
    for label, settings in compared.items():  # one load each
        for name in (n for n in SCHEDULERS if n != "default"):  # the model's own is one of these
            scheduled = replace(run.base_job, args={**run.base_job.args, "scheduler": name})
            run.attempt(f"scheduler {name}, {label}", "sd_base", settings, [scheduled])
    run.lines.append("")


def adapters_section(run: Run) -> None:
    run.lines += [
        f"Adapters with {run.best_label} (fused QKV off: adapters cannot go with it): a rank-64 LoRA of the "
        f"attention projections (random), {run.steps} steps:",
        "",
        HEADER,
    ]
    run.unload()
    try:
        run.lines += adapter_rows(run.bench, run.best_settings, run.base_job, run.steps)
    except Exception as e:
        run.lines.append(
            f"| adapters | failed: {type(e).__name__}: {str(e)[:200].replace('|', '/')}{FAILED_CELLS}"
        )
    free_memory(run.bench.device)
    run.lines.append("")


def models_section(run: Run) -> None:
    steps = run.steps
    run.lines += [f"The other models with {run.best_label}, {steps} steps:", "", HEADER]
    run.attempt("sd_depth 512x512", "sd_depth", run.best_settings, [job("sd_depth", steps, 512)])
    run.attempt("sd_inpaint 512x512", "sd_inpaint", run.best_settings, [job("sd_inpaint", steps, 512)])
    for tiling in (False, True):
        for side in (128, 256):
            label = f"sd_upscale {side}->{side * 4}" + (", VAE tiling" if tiling else "")
            settings = run.best_settings.replace(vae_tiling=tiling)
            run.attempt(label, "sd_upscale", settings, [job("sd_upscale", steps, side)])
    run.lines.append("")
    run.unload()


def upscale_limit_section(run: Run, sides: List[int]) -> None:
    run.unload()
    for tiling in (False, True):
        within = f"within {A10G_BYTES / 2**30:.0f} GiB (A10G, ml.g5.xlarge)"
        within += ", VAE tiling" if tiling else ""
        try:
            side = largest_upscale_input(run.bench, run.best_settings.replace(vae_tiling=tiling), sides)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"[:200]
            run.lines += [f"Largest `sd_upscale` input {within}: failed ({error}).", ""]
            free_memory(run.bench.device)
            continue
        if side is not None:
            tried = ", ".join(map(str, sides))
            run.lines += [f"Largest `sd_upscale` input {within}: {side}x{side} (sides tried: {tried}).", ""]


def artifacts_section(run: Run) -> None:
    """Each mode compiled cold, then cold loads in fresh processes: the slowest section."""
    from bench import compiled

    run.unload()
    run.lines += [
        f"Compile artifacts (make compile-cache), sd_base, {run.steps} steps; each load a fresh process "
        "with an empty compile cache of its own:",
        "",
    ]
    run.lines += compiled.rows(
        run.bench.weight_folder("sd_base"), list(ARTIFACT_MODES), 512, run.steps, run.bench.repeats
    )
    run.lines.append("")


def compile_section(run: Run, compile_mode: str) -> None:
    label = f"{run.best_label} + compile ({compile_mode})"
    if run.best_settings.cuda_graphs:  # compile makes its own graphs
        label = f"{run.best_label}, its CUDA graphs off, + compile ({compile_mode})"
    run.lines += [f"The compile option (a config.pbtxt parameter, off by default), {run.steps} steps:", ""]
    run.lines.append(HEADER)
    settings = run.best_settings.replace(cuda_graphs=False, compile=compile_mode)
    result = run.attempt(label, "sd_base", settings, [run.base_job], first_call=True)
    if result is not None:
        ratio = result.seconds / run.best.seconds
        run.lines += ["", f"With compile: {ratio:.2f}x the latency of {run.best_label}."]


# what --skip can leave out, in the order they run; the settings and compile stay
SECTIONS = ("batching", "schedulers", "adapters", "models", "upscale-limit", "artifacts")


def run(
    bench: Bench,
    steps: int,
    compile_mode: str,
    upscale_sides: List[int],
    rounds: int = 2,
    skip=(),
    dtype: str = "float16",
) -> List[str]:
    """Every measurement, the slowest to prepare (compile) last: a run cut short by a lent GPU's time
    limit keeps the rest. A case that fails is a row saying why, and the run goes on. The eager settings
    are measured in `rounds` interleaved rounds: on the first GPU run (H100) the setting measured first
    took 2.9 s, and 1.4-1.8 s in later runs, so a single pass ranks the order, not the settings."""
    measured = Run(bench, steps)
    if not settings_section(measured, rounds, dtype):
        return measured.lines
    sections = {
        "batching": batching_section,
        "schedulers": schedulers_section,
        "adapters": adapters_section,
        "models": models_section,
        "upscale-limit": lambda r: upscale_limit_section(r, upscale_sides),
        "artifacts": artifacts_section,
    }
    for name in SECTIONS:
        if name not in skip:
            sections[name](measured)
    measured.unload()
    if compile_mode != "none":
        compile_section(measured, compile_mode)
    return measured.lines


def adapter_rows(bench: Bench, settings: Settings, base_job: batching.Job, steps: int) -> List[str]:
    """sd_base alone, with an adapter (fused, as served) and with the same LoRA as PEFT's layers (unfused);
    then what loading and switching cost on this device."""
    from bench.loras import write_adapter, write_lora

    folder = bench.weight_folder("sd_base")
    rank = 2 if bench.device.type == "cpu" else 64  # tests run this on CPU with tiny weights
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp)
        records = [
            write_adapter(folder, store / f"{name}.safetensors", rank, seed)
            for name, seed in (("ink", 1), ("sun", 2))
        ]
        settings = settings.replace(adapters=str(store), fuse_qkv=False)  # they cannot go together
        runner = loader.load(
            MODELS["sd_base"], folder.parent.parent, bench.device, settings, weights=folder
        ).runner
        pipeline = runner.pipeline

        def activate(lora) -> float:
            bench.sync()
            start = time.perf_counter()
            runner.adapters.activate(lora)
            bench.sync()
            return time.perf_counter() - start

        alone = bench.measure("model alone", runner, [base_job], steps)
        load = activate((("ink", 1.0),))  # from the local store onto the device, and fused
        ink = replace(base_job, args={**base_job.args, "lora": (("ink", 1.0),)})
        fused = bench.measure("adapter, fused (as served)", runner, [ink], steps)
        activate((("sun", 1.0),))
        switches = [activate(((name, 1.0),)) for _ in range(3) for name in ("ink", "sun")]
        activate(None)
        try:  # PEFT is no part of serving; a lent GPU has it only when device.sh carried it
            lora = write_lora(folder, store / "unfused", rank, 1)
        except ImportError as e:
            unfused = None
            why = f"{e}; bash bench/device.sh wheels carries it"
        else:
            pipeline.load_lora_weights(str(lora), adapter_name="peft")
            unfused = bench.measure(
                "the LoRA as PEFT layers, unfused",
                Runner(pipeline, sync_free=settings.sync_free),
                [base_job],
                steps,
            )
            pipeline.unload_lora_weights()
    rows = [result.row() for result in (alone, fused, unfused) if result is not None]
    if unfused is None:
        rows.append(f"| the LoRA as PEFT layers, unfused | not measured: {why}{FAILED_CELLS}")
    against = f"fused {100 * (fused.seconds / alone.seconds - 1):+.1f}%"
    if unfused is not None:
        against += f", unfused {100 * (unfused.seconds / alone.seconds - 1):+.1f}%"
    return rows + [
        "",
        f"Against the model alone: {against}. Loading an adapter "
        f"({records[0]['layers']['unet']} layers, rank {rank}) onto the device and fusing it: {load:.3f}s; "
        f"a switch between two loaded adapters: {statistics.median(switches):.3f}s (median of "
        f"{len(switches)}).",
    ]


def environment(device: torch.device) -> str:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return (
        f"{name}; torch {torch.__version__} (CUDA {torch.version.cuda}), diffusers {diffusers.__version__}; "
        f"{datetime.date.today().isoformat()}"
    )


def weight_folder(repository: Path, tiny: bool, cache: Path, built: Dict[str, str]) -> Callable[[str], Path]:
    """A model's weights: the model repository's when they came from the hub, else built in `cache`
    (tiny, or full-size random) the first time they are needed. `built` records each one's source."""

    def folder(model: str) -> Path:
        hub = weights.weights_dir(repository, model)
        record = hub / weights.SOURCE_FILE
        if not tiny and record.exists() and json.loads(record.read_text())["source"] == "hub":
            result = hub
        else:
            result = weights.fill(cache, model, "tiny" if tiny else "full")
        built[model] = json.loads((result / weights.SOURCE_FILE).read_text())["source"]
        return result

    return folder


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", default="cuda", help="cuda (default) or cpu (with --tiny: tests the code)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny weights instead of full size")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=speed.DTYPES,
        help="float32: tests on CPU (fp16 is slow there)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the eager settings")
    parser.add_argument("--skip", nargs="+", default=[], choices=SECTIONS, help="sections to leave out")
    parser.add_argument("--compile", default="max-autotune", choices=compile_artifacts.MODES)
    parser.add_argument("--upscale-sides", type=int, nargs="+", default=[256, 320, 384, 448, 512, 640])
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--weights-cache", type=Path, help="where built weights go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "make bench-gpu needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False). "
            "Run it on a GPU machine with a CUDA build of torch (make venv TORCH='torch==<version>').",
            file=sys.stderr,
        )
        return 2
    cache = args.weights_cache or Path(tempfile.mkdtemp(prefix="bench-weights-"))
    sources: Dict[str, str] = {}
    bench = Bench(device, weight_folder(args.model_repository, args.tiny, cache, sources), args.repeats)
    started = time.monotonic()
    lines = run(bench, args.steps, args.compile, args.upscale_sides, args.rounds, args.skip, args.dtype)
    title = f"## make bench-gpu: {environment(device)}"
    report = [
        title,
        "",
        f"Weights: {', '.join(sorted(set(sources.values())))}. Each row: median of {args.repeats} calls "
        f"after a warm-up; the eager settings: of {args.rounds} interleaved rounds of that.",
        "",
    ]
    report += lines + ["", f"({time.monotonic() - started:.0f} s in all)", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write("\n".join(report) + "\n")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
