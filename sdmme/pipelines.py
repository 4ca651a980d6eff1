"""Loading a diffusers pipeline for the device Triton gave the instance, with its speed settings, and
running one batch.

The settings a GPU gets (dtype, attention kernel, memory layout, fused projections, compilation, VAE
slicing and tiling) are applied by `apply()`, which runs the same on any device: CI applies the GPU
settings to the tiny pipelines on CPU and checks that each one took effect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Mapping, Optional, Tuple

import diffusers
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from sdmme import cuda_graphs, sync_free
from sdmme.batching import Interrupted
from sdmme.spec import KIND_PARAMETER, InvalidInput, ModelSpec

log = logging.getLogger("sdmme")

# gen_args scheduler name -> (diffusers class, settings over the model's own scheduler config)
SCHEDULER_CLASSES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    # PLMS as in every Stable Diffusion config; the Runge-Kutta warm-up fails below 4 steps.
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}

# gen_args the pipeline call takes directly; the rest (seed, scheduler, encoding) are handled here.
PIPELINE_ARGS = ("num_inference_steps", "guidance_scale", "strength", "noise_level", "height", "width")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHOICES = {
    "dtype": ("auto", *DTYPES),
    "attention": ("sdpa", "xformers"),
    "compile": ("none", "default", "reduce-overhead", "max-autotune"),
}
# Parameters in a config.pbtxt that are not these settings: Triton's, and the model's kind.
OTHER_PARAMETERS = ("EXECUTION_ENV_PATH", KIND_PARAMETER)


def _setting(default, help: str, values: str = ""):
    """A setting with what it does and, beyond a choice or true/false, the values it takes (docs)."""
    return dataclasses.field(default=default, metadata={"help": help, "values": values})


@dataclass(frozen=True)
class Settings:
    """How a pipeline is set up for speed, the time a request may take, where its adapters come from
    and what it tells the operator; config.pbtxt `parameters` of the same names override them.

    The GPU defaults are the fastest settings that cost no cold-start time and change no output beyond
    rounding, as measured by `make bench-gpu` (docs/benchmarks.md): on an H100 the eager UNet is bound
    by kernel launches, and neither channels_last nor fused QKV was faster beyond run-to-run noise, so
    the defaults stay plain SDPA. Only compile (CUDA graphs above all) removes that bound, at a cost
    in cold start, so it stays an option.
    """

    dtype: str = _setting("auto", "Weights and activations; auto: float16 on GPU, float32 on CPU.")
    attention: str = _setting("sdpa", "Attention kernel: PyTorch SDPA, or xformers (SDPA when unusable).")
    channels_last: bool = _setting(False, "NHWC memory layout for the UNet and the VAE.")
    fuse_qkv: bool = _setting(
        False, "One projection matmul for q, k, v (k, v in cross-attention); SDPA only."
    )
    sync_free: bool = _setting(
        False,
        "Scheduler bookkeeping on the host, so the denoising loop never waits for the GPU; same images. "
        "Off on GPU until make bench-gpu has measured it.",
    )
    cuda_graphs: bool = _setting(
        False,
        "Replay the UNet from CUDA graphs, captured per batch and size on their second call (eager until "
        "then); no compile. Off on GPU until make bench-gpu has measured it; on CPU plain calls stand in.",
    )
    max_cuda_graphs: int = _setting(
        8, "CUDA graphs kept per model; the least recently used goes.", "a count, 1 or more"
    )
    compile: str = _setting(
        "none",
        "torch.compile the UNet at load, warmed up there: a minute or more of cold start. "
        "reduce-overhead (CUDA graphs) is the fastest on GPU.",
    )
    vae_slicing: bool = _setting(True, "Decode a batch one image at a time, so large batches fit in memory.")
    vae_tiling: bool = _setting(
        False, "Decode in overlapping tiles, so large outputs (upscaler) fit in memory."
    )
    time_budget_s: float = _setting(
        30.0,
        "Refuse up front a request whose time, measured at load, exceeds this; with the queue's 30 s, "
        "SageMaker's 60 s. 0: no limit.",
        "seconds",
    )
    adapters: str = _setting(
        "",
        "Where the model's adapters are (docs/models.md): a folder (relative to the model's) or "
        "s3://bucket/prefix/; none: no adapters. Empty: $SDMME_ADAPTERS/<model>/ when set (make deploy, "
        "the local MME), else the model's adapters/ folder.",
        "a folder, s3://bucket/prefix/, none",
    )
    max_adapters: int = _setting(
        8, "Adapters kept loaded on the device; the least recently used goes.", "a count, 1 or more"
    )
    adapter_cache_mb: float = _setting(
        4096.0, "Disk for adapters fetched from S3; the least recently used file goes.", "megabytes"
    )
    host_memory_reserve_gib: float = _setting(
        0.0,
        "Host memory a load leaves free for the other models and the server: a load whose weights would "
        "not fit beside it is refused as out of memory (SageMaker: 507, it evicts and retries).",
        "GiB",
    )

    request_log: bool = _setting(
        True, "One JSON line per request on stderr: model, outcome, sizes, times (docs/operating.md)."
    )
    log_prompts: bool = _setting(
        False, "Put the prompt and negative prompt in the request's log line (they may be personal)."
    )
    metrics: bool = _setting(
        True, "Publish the model's metrics (sdmme_*) on Triton's metrics port (docs/operating.md)."
    )

    def __post_init__(self):
        if self.cuda_graphs and self.compile != "none":
            raise ValueError(
                "config.pbtxt: cuda_graphs captures the eager UNet; compile makes its own graphs "
                "(reduce-overhead): set one of them"
            )

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str], base: Settings) -> Settings:
        """`base` with the values a model's config.pbtxt sets; a bad key or value is a clear error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, text in parameters.items():
            if key in OTHER_PARAMETERS:
                continue
            if key not in fields:
                raise ValueError(
                    f"config.pbtxt parameter {key!r} is not a pipeline setting; known: {', '.join(fields)}"
                )
            kind = fields[key].type
            if key in CHOICES:
                if text not in CHOICES[key]:
                    raise ValueError(
                        f"config.pbtxt parameter {key}={text!r} is not one of {', '.join(CHOICES[key])}"
                    )
                values[key] = text
            elif kind in (str, "str"):  # free text, checked where it is used (adapters: the store)
                values[key] = text
            elif kind in (int, "int"):
                if not text.isdigit() or int(text) < 1:
                    raise ValueError(
                        f"config.pbtxt parameter {key} must be a whole number of 1 or more, got {text!r}"
                    )
                values[key] = int(text)
            elif kind in (bool, "bool"):
                if text.lower() not in ("true", "false"):
                    raise ValueError(f"config.pbtxt parameter {key} must be true or false, got {text!r}")
                values[key] = text.lower() == "true"
            elif kind in (float, "float"):
                try:
                    values[key] = float(text)
                except ValueError:
                    raise ValueError(f"config.pbtxt parameter {key} must be a number, got {text!r}") from None
                if not values[key] >= 0:
                    raise ValueError(f"config.pbtxt parameter {key} must be 0 or more, got {text!r}")
        settings = dataclasses.replace(base, **values)
        if settings.fuse_qkv and settings.attention == "xformers":
            raise ValueError(
                "config.pbtxt: fuse_qkv runs on PyTorch SDPA; it cannot go with attention=xformers"
            )
        if settings.fuse_qkv and settings.adapters != "none":
            raise ValueError(
                "config.pbtxt: fuse_qkv computes q, k and v with one new projection, so adapters fused into "
                "to_q, to_k and to_v would not count; set adapters to none with it"
            )
        return settings

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


GPU_DEFAULTS = Settings()
# On CPU: full precision, none of the layout tricks (tuned for GPU kernels), and no time budget (a CPU
# serves tests and development, not SageMaker's 60 s; a model's config.pbtxt can set one).
# The sync-free loop is on: the same images, and every CPU test runs through it.
CPU_DEFAULTS = Settings(vae_slicing=False, time_budget_s=0.0, sync_free=True)


def device_for(instance_kind: str, device_id: str) -> Tuple[torch.device, Settings]:
    """The GPU Triton assigned to this instance with the GPU defaults, or the CPU with its own."""
    if instance_kind == "GPU":
        return torch.device(f"cuda:{device_id}"), GPU_DEFAULTS
    return torch.device("cpu"), CPU_DEFAULTS


def _attention(pipeline, settings: Settings) -> str:
    if settings.attention == "xformers":
        try:
            pipeline.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # not installed, no kernel for this card, no GPU, wrong build
            log.warning(
                "xformers is not usable here (%s: %s); falling back to PyTorch SDPA", type(e).__name__, e
            )
    # Also undoes a partly applied xformers attempt; SDPA is diffusers' default on torch 2.
    for name in ("unet", "vae"):
        getattr(pipeline, name).set_attn_processor(AttnProcessor2_0())
    if settings.fuse_qkv:
        for name in ("unet", "vae"):
            getattr(pipeline, name).fuse_qkv_projections()  # sets FusedAttnProcessor2_0
        return "sdpa, fused qkv"
    return "sdpa"


def apply(pipeline, settings: Settings, device: torch.device) -> Dict[str, Any]:
    """Apply `settings` to a loaded pipeline on `device`; returns what was applied (for the log)."""
    applied: Dict[str, Any] = {"attention": _attention(pipeline, settings)}
    if settings.channels_last:
        for name in ("unet", "vae"):
            getattr(pipeline, name).to(memory_format=torch.channels_last)
    applied["channels_last"] = settings.channels_last
    (pipeline.vae.enable_slicing if settings.vae_slicing else pipeline.vae.disable_slicing)()
    (pipeline.vae.enable_tiling if settings.vae_tiling else pipeline.vae.disable_tiling)()
    applied["vae"] = "slicing" if settings.vae_slicing else "whole batch"
    if settings.vae_tiling:
        applied["vae"] += ", tiling"
    applied["sync_free"] = settings.sync_free  # Runner wraps the schedulers
    if settings.cuda_graphs:
        cuda_graphs.GraphedUNet(pipeline.unet, settings.max_cuda_graphs).install()
        applied["cuda_graphs"] = f"up to {settings.max_cuda_graphs}" + (
            "" if device.type == "cuda" else " (no CUDA here: plain calls stand in for graphs)"
        )
    if settings.compile != "none":
        # In place: pipeline.unet stays a UNet2DConditionModel (its config is still read by the pipeline).
        pipeline.unet.compile(mode=None if settings.compile == "default" else settings.compile)
    applied["compile"] = settings.compile
    return applied


def load(
    spec: ModelSpec,
    weights: Path,
    device: torch.device,
    settings: Settings,
    phase: Callable[[str], ContextManager] = lambda name: contextlib.nullcontext(),
):
    """The pipeline on `device` with `settings`; `phase(name)` times each step (sdmme.telemetry)."""
    if not (weights / "model_index.json").exists():
        raise FileNotFoundError(
            f"no weights in {weights}: run `make weights` (tiny, offline) or `make weights-hub` (real)"
        )
    dtype = settings.torch_dtype(device)
    with phase("weights"):
        pipeline = getattr(diffusers, spec.pipeline).from_pretrained(
            weights, dtype=dtype, use_safetensors=True, local_files_only=True
        )
    pipeline.set_progress_bar_config(disable=True)
    with phase("to_device"):
        pipeline = pipeline.to(device)
    with phase("settings"):
        applied = apply(pipeline, settings, device)
    log.info(
        "%s: loaded %s on %s (%s, %s)",
        spec.name,
        spec.pipeline,
        device,
        str(dtype).replace("torch.", ""),
        ", ".join(f"{k}: {v}" for k, v in applied.items()),
    )
    return pipeline


def min_image_side(pipeline) -> int:
    """Smallest input side the architecture handles: one latent cell at the UNet's deepest level.

    SD 2 (VAE x8, 3 downsamplings): 64 pixels. The upscaler's UNet runs at the input's own size: 8.
    """
    downsamplings = len(pipeline.unet.config.block_out_channels) - 1
    upscaler = isinstance(pipeline, diffusers.StableDiffusionUpscalePipeline)
    to_latent = 1 if upscaler else pipeline.vae_scale_factor
    return max(8, to_latent * 2**downsamplings)


def is_out_of_memory(error: BaseException) -> bool:
    """A real allocation failure (GPU or host), as opposed to bad input or a bug."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "CUDA out of memory" in text or "can't allocate memory" in text
    )


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Runner:
    """Owns one pipeline; runs one batch of prompts with one generator per image, with the adapters
    (sdmme.adapters.Adapters, or None when the model serves none) the batch's gen_args.lora names, and
    with schedulers that keep their bookkeeping on the host when `sync_free` (Settings.sync_free)."""

    def __init__(self, pipeline, adapters=None, sync_free: bool = False):
        self.pipeline = pipeline
        self.adapters = adapters
        self.device = pipeline.device
        self.sync_free = sync_free
        self.default_scheduler = pipeline.scheduler
        self._schedulers: Dict[str, Any] = {"default": self._wrapped(pipeline.scheduler)}
        self.min_image_side = min_image_side(pipeline)
        self.prompt_window = pipeline.tokenizer.model_max_length  # tokens the text encoder reads

    def prompt_tokens(self, text: str) -> int:
        """Tokens in `text` as the pipeline's tokenizer counts them, start and end markers included."""
        return len(self.pipeline.tokenizer(text, truncation=False, verbose=False)["input_ids"])

    def scheduler(self, name: str):
        if name not in self._schedulers:
            cls, settings = SCHEDULER_CLASSES[name]
            self._schedulers[name] = self._wrapped(
                getattr(diffusers, cls).from_config(self.default_scheduler.config, **settings)
            )
        return self._schedulers[name]

    def _wrapped(self, scheduler):
        return sync_free.host_bookkeeping(scheduler) if self.sync_free else scheduler

    def free_memory(self) -> None:
        free_memory(self.device)

    @staticmethod
    def is_out_of_memory(error: BaseException) -> bool:
        return is_out_of_memory(error)

    def __call__(
        self,
        args: Dict[str, Any],
        prompts: List[str],
        negative_prompts: List[str],
        seeds: List[int],
        images: Dict[str, List[Any]],
        should_stop: Optional[Callable[[], bool]] = None,
    ) -> list:
        """Images for the prompts; raises Interrupted between steps once `should_stop()` says so."""
        if self.adapters is not None:
            self.adapters.activate(args.get("lora"))  # outside inference mode: it writes weights
        elif args.get("lora"):
            raise InvalidInput("this model serves no adapters (its config.pbtxt sets adapters to none)")
        return self._generate(args, prompts, negative_prompts, seeds, images, should_stop)

    @torch.inference_mode()
    def _generate(self, args, prompts, negative_prompts, seeds, images, should_stop) -> list:
        graphs = cuda_graphs.of(self.pipeline.unet)
        if graphs is not None:
            graphs.check_weights()
        self.pipeline.scheduler = self.scheduler(args["scheduler"])
        kwargs = {k: args[k] for k in PIPELINE_ARGS if k in args}
        if should_stop is not None:
            kwargs.update(self._stop_callback(should_stop))
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        result = self.pipeline(
            prompt=prompts,
            negative_prompt=negative_prompts,
            generator=generators,
            num_images_per_prompt=1,
            output_type="pil",
            **images,
            **kwargs,
        )
        return result.images

    def _stop_callback(self, should_stop: Callable[[], bool]) -> Dict[str, Any]:
        def check(*args):
            if should_stop():
                raise Interrupted
            return args[-1] if len(args) == 4 else None  # callback_on_step_end returns its tensors

        if isinstance(self.pipeline, diffusers.StableDiffusionUpscalePipeline):  # the older callback API
            return {"callback": check, "callback_steps": 1}
        return {"callback_on_step_end": check}
