"""Tiny, randomly initialised versions of the four pipelines, built offline from configs.

They have the real models' structure (components, channel counts at the pipeline boundary, VAE scale
factors, schedulers) at a few MB, so tests and the demo exercise the exact loading and serving path of
the real weights without downloading them. Deterministic: the same code gives the same weights.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Dict

import diffusers
import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    DPTConfig,
    DPTForDepthEstimation,
    DPTImageProcessor,
)

TEXT_DIM = 32


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE vocabulary is built on."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer: every unicode prompt tokenises without <unk>."""
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps(vocab))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="<|endoftext|>")


def text_encoder(vocab_size: int) -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TEXT_DIM,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            projection_dim=TEXT_DIM,
            vocab_size=vocab_size,
            max_position_embeddings=77,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        )
    )


def unet(in_channels: int) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=64,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,  # as in SD 2.x
    )


def vae(levels: int, scaling_factor: float) -> diffusers.AutoencoderKL:
    """VAE downscaling by 2**(levels-1): 4 levels give SD's x8, 3 levels the upscaler's x4."""
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,) + (16,) * (levels - 1),
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        scaling_factor=scaling_factor,
    )


def sd_scheduler() -> diffusers.PNDMScheduler:
    return diffusers.PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _text_parts() -> dict:
    tok = tokenizer()
    return {"tokenizer": tok, "text_encoder": text_encoder(len(tok))}


def _text_to_image(cls, in_channels: int):
    """Text-to-image and inpainting differ only in the UNet's input channels (4, or 4 + mask + masked)."""
    return cls(
        **_text_parts(),
        unet=unet(in_channels),
        vae=vae(4, 0.18215),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_base() -> diffusers.StableDiffusionPipeline:
    return _text_to_image(diffusers.StableDiffusionPipeline, 4)


def sd_inpaint() -> diffusers.StableDiffusionInpaintPipeline:
    return _text_to_image(diffusers.StableDiffusionInpaintPipeline, 9)


def sd_depth() -> diffusers.StableDiffusionDepth2ImgPipeline:
    torch.manual_seed(0)
    estimator = DPTForDepthEstimation(
        DPTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=37,
            is_hybrid=False,
            neck_hidden_sizes=[16, 32, 64, 64],
            fusion_hidden_size=32,
            backbone_out_indices=[0, 1, 2, 3],
        )
    )
    processor = DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False)
    return diffusers.StableDiffusionDepth2ImgPipeline(
        **_text_parts(),
        unet=unet(5),
        vae=vae(4, 0.18215),
        scheduler=sd_scheduler(),
        depth_estimator=estimator,
        feature_extractor=processor,
    )


def sd_upscale() -> diffusers.StableDiffusionUpscalePipeline:
    torch.manual_seed(0)
    upscaler_unet = diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=7,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 2, 4),
        use_linear_projection=True,
        num_class_embeds=1000,  # one per noise level; the real model's value
    )
    return diffusers.StableDiffusionUpscalePipeline(
        **_text_parts(),
        unet=upscaler_unet,
        vae=vae(3, 0.08333),
        low_res_scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear"),
        scheduler=diffusers.DDIMScheduler(
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        max_noise_level=350,
    )


BUILDERS: Dict[str, Callable[[], diffusers.DiffusionPipeline]] = {
    "sd_base": sd_base,
    "sd_depth": sd_depth,
    "sd_inpaint": sd_inpaint,
    "sd_upscale": sd_upscale,
}
