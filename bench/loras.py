"""Random LoRAs of a model's attention projections, as a trainer writes them, for the benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from sdmme.adapters import files

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # what diffusers' LoRA trainers adapt


def write_lora(weights_folder: Path, dest: Path, rank: int, seed: int) -> Path:
    """A random LoRA of the UNet's attention projections in diffusers' format, as its trainers write it
    (built on the model's empty architecture: no weights are read)."""
    import diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = files.architecture_of(weights_folder)["unet"]
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian")
    )
    layers = diffusers.utils.convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    for key, tensor in layers.items():  # trained LoRAs have non-zero up weights; gaussian init leaves them 0
        if ".up." in key or "lora_B" in key:
            tensor.copy_(torch.randn(tensor.shape) * 0.01)
    dest.mkdir(parents=True, exist_ok=True)
    layers = {k: v.to(torch.float16) for k, v in layers.items()}
    diffusers.StableDiffusionPipeline.save_lora_weights(
        dest, unet_lora_layers=layers, weight_name="lora.safetensors"
    )
    return dest / "lora.safetensors"


def write_adapter(weights_folder: Path, dest: Path, rank: int, seed: int) -> dict:
    """The same kind of LoRA written straight in the stored form (`make adapter`'s output) with its
    record, without PEFT or diffusers' readers: what a lent GPU measures with only the serving stack."""
    unet = files.architecture_of(weights_folder)["unet"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(TARGETS)):
            key = f"unet.{name}"
            a = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            tensors[f"{key}.lora_A.weight"] = a.to(torch.float16)
            tensors[f"{key}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.01
            ).to(torch.float16)
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    layers = len(tensors) // 3
    info = {"format": "random", "rank": rank, "layers": {"unet": layers, "text_encoder": 0}}
    return files.write(tensors, dest, {"name": dest.stem, **info})
