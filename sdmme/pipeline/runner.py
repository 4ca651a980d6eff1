"""One diffusers pipeline and one call of it: the pipeline read from a weights folder, and the Runner that
runs a batch of prompts with one generator per image, the adapters the call names and the scheduler it
asks for, stopping between steps when told to.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import diffusers
import torch

from sdmme.pipeline import cuda_graphs, sync_free
from sdmme.spec import InvalidInput, ModelSpec


class Interrupted(Exception):
    """Raised between denoising steps when a call's `should_stop` says so."""


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


def load(spec: ModelSpec, weights: Path, device: torch.device, dtype: torch.dtype):
    """The kind's pipeline from its weights folder, in `dtype` on `device`, settings not yet applied."""
    if not (weights / "model_index.json").exists():
        raise FileNotFoundError(
            f"no weights in {weights}: run `make weights` (tiny, offline) or `make weights-hub` (real)"
        )
    pipeline = getattr(diffusers, spec.pipeline).from_pretrained(
        weights, dtype=dtype, use_safetensors=True, local_files_only=True
    )
    pipeline.set_progress_bar_config(disable=True)
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
    with schedulers that keep their bookkeeping on the host when `sync_free` (the sync_free setting)."""

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
