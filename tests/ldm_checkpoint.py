"""Write a diffusers pipeline as an original (LDM) single-file checkpoint, the format fine-tunes are shared
in (`.safetensors` with `model.diffusion_model.`, `first_stage_model.` and `cond_stage_model.` keys).

Tests use it to make single-file checkpoints from tiny pipelines offline; the mapping is the inverse of
the one diffusers' `from_single_file` reads, so a round trip must give back the same tensors.
"""

from __future__ import annotations

import re
from typing import Dict

import torch

RESNET = {  # diffusers name -> LDM name inside a UNet ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "class_embedding": "label_emb",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return f"{RESNET.get(name, name)}.{tail}"


def unet_to_ldm(unet) -> Dict[str, torch.Tensor]:
    per = unet.config.layers_per_block + 1  # LDM blocks per level: the resnets and a down/upsampler
    with_attention = {
        int(k.split(".")[1]) for k in unet.state_dict() if re.match(r"up_blocks\.\d+\.attentions", k)
    }
    out = {}
    for key, value in unet.state_dict().items():
        if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            b, j, rest = int(m[1]), int(m[2]), m[3]
            new = f"input_blocks.{1 + b * per + j}.0.{_resnet(rest)}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
            new = f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
            new = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_resnet(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", key):
            new = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            slot = 2 if int(m[1]) in with_attention else 1
            new = f"output_blocks.{int(m[1]) * per + per - 1}.{slot}.conv.{m[2]}"
        else:
            module, _, leaf = key.rpartition(".")
            new = f"{UNET_TOP[module]}.{leaf}"
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(vae) -> Dict[str, torch.Tensor]:
    levels = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
            lambda m: (
                f"decoder.up.{levels - 1 - int(m[1])}." + ("block." if m[2] == "resnets" else "upsample.")
            ),
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", new):
            new = f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out[f"first_stage_model.{new}"] = value
    return out


def _text_state(text_encoder) -> Dict[str, torch.Tensor]:
    """CLIPTextModel's weights under the names checkpoints use (transformers 4's: `text_model.` first)."""
    state = text_encoder.state_dict()
    return {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in state.items()
        if not k.endswith("position_ids")
    }


def clip_to_ldm(text_encoder) -> Dict[str, torch.Tensor]:
    """SD 1.x: transformers' CLIPTextModel keys under cond_stage_model.transformer."""
    return {f"cond_stage_model.transformer.{k}": v for k, v in _text_state(text_encoder).items()}


def open_clip_to_ldm(text_encoder) -> Dict[str, torch.Tensor]:
    """SD 2.x: OpenCLIP's layout under cond_stage_model.model. (q, k, v as one in_proj)."""
    state = _text_state(text_encoder)
    out = {
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
    }
    for layer in range(text_encoder.config.num_hidden_layers):
        old, new = f"text_model.encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for leaf in ("weight", "bias"):
            out[f"{new}attn.in_proj_{leaf}"] = torch.cat(
                [state.pop(f"{old}self_attn.{p}_proj.{leaf}") for p in "qkv"]
            )
            for name, ldm in CLIP_LAYER.items():
                out[f"{new}{ldm}.{leaf}"] = state.pop(f"{old}{name}.{leaf}")
    assert not state, f"unmapped text encoder keys: {sorted(state)[:5]}"
    return {f"cond_stage_model.model.{k}": v for k, v in out.items()}


def pipeline_to_ldm(pipeline, text_layout: str = "open_clip") -> Dict[str, torch.Tensor]:
    text = open_clip_to_ldm if text_layout == "open_clip" else clip_to_ldm
    state = {**unet_to_ldm(pipeline.unet), **vae_to_ldm(pipeline.vae), **text(pipeline.text_encoder)}
    return {k: v.detach().contiguous() for k, v in state.items()}
