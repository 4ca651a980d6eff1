"""Loading a diffusers pipeline for the device Triton gave the instance, and running one batch."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import diffusers
import torch

from sdmme.spec import ModelSpec

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


def device_for(instance_kind: str, device_id: str) -> Tuple[torch.device, torch.dtype]:
    """fp16 on the GPU Triton assigned to this instance, fp32 on CPU."""
    if instance_kind == "GPU":
        return torch.device(f"cuda:{device_id}"), torch.float16
    return torch.device("cpu"), torch.float32


def configure_attention(pipeline: diffusers.DiffusionPipeline, device: torch.device) -> str:
    """Memory-efficient attention on GPU: xformers when importable, else PyTorch SDPA. Returns which."""
    if device.type != "cuda":
        return "default (cpu)"
    pipeline.enable_vae_slicing()  # decode a batch one image at a time: batches fit in memory
    try:
        import xformers  # noqa: F401
    except ImportError:
        return "sdpa"  # diffusers' default processor on torch >= 2 is scaled_dot_product_attention
    pipeline.enable_xformers_memory_efficient_attention()
    return "xformers"


def load(spec: ModelSpec, weights: Path, device: torch.device, dtype: torch.dtype):
    if not (weights / "model_index.json").exists():
        raise FileNotFoundError(
            f"no weights in {weights}: run `make weights` (tiny, offline) or `make weights-hub` (real)"
        )
    pipeline = getattr(diffusers, spec.pipeline).from_pretrained(
        weights, torch_dtype=dtype, use_safetensors=True, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline = pipeline.to(device)
    attention = configure_attention(pipeline, device)
    log.info("%s: loaded %s on %s (%s, attention: %s)", spec.name, spec.pipeline, device, dtype, attention)
    return pipeline


class Runner:
    """Owns one pipeline; runs one batch of prompts with one generator per image."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.default_scheduler = pipeline.scheduler
        self._schedulers: Dict[str, Any] = {"default": pipeline.scheduler}

    def scheduler(self, name: str):
        if name not in self._schedulers:
            cls, settings = SCHEDULER_CLASSES[name]
            self._schedulers[name] = getattr(diffusers, cls).from_config(
                self.default_scheduler.config, **settings
            )
        return self._schedulers[name]

    @torch.inference_mode()
    def __call__(
        self,
        args: Dict[str, Any],
        prompts: List[str],
        negative_prompts: List[str],
        seeds: List[int],
        images: Dict[str, List[Any]],
    ) -> list:
        self.pipeline.scheduler = self.scheduler(args["scheduler"])
        kwargs = {k: args[k] for k in PIPELINE_ARGS if k in args}
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
