"""Offline stand-ins for what users bring to `make model`: single-file checkpoints in both layouts, a
diffusers folder, LoRAs (fitting and not), and the config folder (architecture and tokenizer) that single
files of the tiny architecture need.
"""

from __future__ import annotations

import re
from pathlib import Path

import diffusers
import torch
from ldm_checkpoint import pipeline_to_ldm
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from sdmme.tools import tiny


def fine_tuned(seed: int = 7) -> diffusers.StableDiffusionPipeline:
    """The tiny sd_base with every UNet weight moved: a stand-in for a fine-tune of it."""
    pipeline = tiny.sd_base()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in pipeline.unet.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return pipeline


def write_lora(pipeline, dest: Path, seed: int = 3) -> Path:
    """A LoRA on the attention projections of `pipeline`'s UNet, with non-zero weights."""
    torch.manual_seed(seed)
    pipeline.unet.add_adapter(
        LoraConfig(
            r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    layers = diffusers.utils.convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet))
    dest.mkdir(parents=True, exist_ok=True)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        dest, unet_lora_layers=layers, weight_name="lora.safetensors"
    )
    return dest / "lora.safetensors"


def write_kohya(canonical: Path, dest: Path) -> Path:
    """The adapter file `canonical` (this project's form) as kohya's trainers name and write it."""
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    parts = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}
    kohya = {}
    for key, tensor in load_file(canonical).items():
        component, module, part = re.match(
            r"(unet|text_encoder)\.(.+)\.(lora_[AB]\.weight|alpha)$", key
        ).groups()
        kohya[f"{prefixes[component]}{module.replace('.', '_')}.{parts[part]}"] = tensor
    save_file(kohya, dest)
    return dest


def write_text_encoder_lora(pipeline, dest: Path, seed: int = 5) -> Path:
    """A kohya-format LoRA of the UNet's and the text encoder's attention, alpha 1 (scale 1 / rank)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for component, prefix, targets in (
        (pipeline.unet, "lora_unet_", ("to_q", "to_k", "to_v", "to_out.0")),
        (pipeline.text_encoder, "lora_te_", ("q_proj", "k_proj", "v_proj", "out_proj")),
    ):
        for name, module in component.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                key = prefix + name.replace(".", "_")
                state[key + ".lora_down.weight"] = torch.randn(2, module.in_features, generator=generator)
                state[key + ".lora_up.weight"] = torch.randn(module.out_features, 2, generator=generator)
                state[key + ".alpha"] = torch.tensor(1.0)
    save_file(state, dest)
    return dest


def write_all(root: Path) -> Path:
    tiny.sd_base().save_pretrained(root / "config")
    tiny.sd_base().save_pretrained(root / "base")
    tiny.sd_inpaint().save_pretrained(root / "inpaint_folder")
    save_file(pipeline_to_ldm(fine_tuned(), "open_clip"), root / "style_sd2.safetensors")
    save_file(pipeline_to_ldm(fine_tuned(), "clip"), root / "style_sd1.safetensors")
    save_file(pipeline_to_ldm(tiny.sd_inpaint(), "open_clip"), root / "inpaint.safetensors")
    write_lora(tiny.sd_base(), root / "lora")
    write_lora(tiny.sd_upscale(), root / "lora_other")  # another architecture: more levels
    state = load_file(root / "lora" / "lora.safetensors")
    save_file(
        {k.replace("unet.", "unet.extra_"): v for k, v in state.items()}, root / "lora_nowhere.safetensors"
    )
    wider = {k: torch.randn(v.shape[0], v.shape[1] + 8) if ".down." in k else v for k, v in state.items()}
    save_file(wider, root / "lora_wider.safetensors")  # the same layers, other widths
    xl = pipeline_to_ldm(tiny.sd_base(), "open_clip")
    xl["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.zeros(1, 77)
    save_file(xl, root / "sdxl.safetensors")
    return root
