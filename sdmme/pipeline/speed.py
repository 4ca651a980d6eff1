"""How the eager pipeline runs: its dtype, attention kernel, memory layout, fused projections and VAE
decoding.

`apply()` runs the same on any device: CI applies the GPU settings to the tiny pipelines on CPU and
checks that each one took effect. The GPU defaults are the fastest settings that cost no cold-start
time and change no output beyond rounding, as measured by `make bench-gpu` (docs/benchmarks.md): on an
H100 the eager UNet is bound by kernel launches, and neither channels_last nor fused QKV was faster
beyond run-to-run noise, so the defaults stay plain SDPA.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from sdmme.settings import Group, Setting

log = logging.getLogger("sdmme")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _check(settings) -> None:
    if settings.fuse_qkv and settings.attention == "xformers":
        raise ValueError("config.pbtxt: fuse_qkv runs on PyTorch SDPA; it cannot go with attention=xformers")


SETTINGS = Group(
    "speed",
    (
        Setting(
            "dtype",
            ("auto", *DTYPES),
            "auto",
            "Weights and activations; auto: float16 on GPU, float32 on CPU.",
        ),
        Setting(
            "attention",
            ("sdpa", "xformers"),
            "sdpa",
            "Attention kernel: PyTorch SDPA, or xformers (SDPA when unusable).",
        ),
        Setting("channels_last", bool, False, "NHWC memory layout for the UNet and the VAE."),
        Setting(
            "fuse_qkv", bool, False, "One projection matmul for q, k, v (k, v in cross-attention); SDPA only."
        ),
        Setting(
            "vae_slicing",
            bool,
            True,
            "Decode a batch one image at a time, so large batches fit in memory.",
            cpu=False,
        ),
        Setting(
            "vae_tiling",
            bool,
            False,
            "Decode in overlapping tiles, so large outputs (upscaler) fit in memory.",
        ),
    ),
    _check,
)


def torch_dtype(settings, device: torch.device) -> torch.dtype:
    if settings.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[settings.dtype]


def _attention(pipeline, settings) -> str:
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


def apply(pipeline, settings) -> Dict[str, Any]:
    """Apply the settings to a loaded pipeline; returns what was applied (for the load's log line)."""
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
    return applied
