"""Weights a user brings for `make model`: diffusers folders or hub ids, single-file checkpoints and LoRAs.

What a kind needs is read from its published configs (`configs/<kind>/`): the pipeline class and the
UNet's input channels (4 text-to-image, 5 depth, 9 inpainting, 7 upscaler). Every check runs before
anything is written, and a mismatch names what differs. Single files are read as safetensors only; the
components they do not carry (tokenizer, scheduler, depth estimator) and the shapes of those they do come
from a config source laid out like a hub repository.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from sdmme.adapters.files import PICKLED
from sdmme.spec import MODELS
from sdmme.tools import weights
from sdmme.tools.full import CONFIGS

log = logging.getLogger("sdmme.tools.weights")

# Which Stable Diffusion generations each kind accepts in a single file, and where their configs (and
# tokenizer) come from when no CONFIG is given: SD 2.x from the kind's own sources; SD 1.x (512 px, CLIP
# ViT-L text encoder) where a 1.x model of that kind exists. There is no 1.x depth model or x4 upscaler.
SD1_SOURCES: Dict[str, Tuple[str, ...]] = {
    "sd_base": ("stable-diffusion-v1-5/stable-diffusion-v1-5",),
    "sd_inpaint": ("stable-diffusion-v1-5/stable-diffusion-inpainting",),
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


class CheckpointError(Exception):
    """These weights cannot become a model of this kind; the message says why. Nothing was written."""


def families(kind: str) -> Dict[str, Tuple[str, ...]]:
    """Accepted generations of a kind and the config sources of each."""
    accepted = {"sd2": MODELS[kind].hub_sources}
    if kind in SD1_SOURCES:
        accepted["sd1"] = SD1_SOURCES[kind]
    return accepted


def accepted_architectures(kind: str) -> str:
    return " or ".join(FAMILY_NAMES[f] for f in families(kind))


def _published(kind: str, component: str) -> dict:
    return json.loads((CONFIGS / kind / component).read_text())


def required_in_channels(kind: str) -> int:
    return _published(kind, "unet/config.json")["in_channels"]


@dataclass(frozen=True)
class Architecture:
    """What a single-file checkpoint holds, read from its tensor names and shapes alone."""

    family: str  # sd1, sd2, sdxl, or "" (something else)
    in_channels: int
    cross_attention_dim: Optional[int]
    text_hidden: Optional[int]


def inspect(path: Path) -> Architecture:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e})"
        ) from None
    if any(".lora" in key or key.startswith("lora_") for key in shapes):
        raise CheckpointError(
            f"{path} is a LoRA, not a whole model: pass it as LORA= with the model it adapts"
        )
    if any(key.startswith("conditioner.embedders.") for key in shapes):
        family = "sdxl"
    elif any(key.startswith("cond_stage_model.model.") for key in shapes):
        family = "sd2"  # OpenCLIP ViT-H text encoder
    elif any(key.startswith("cond_stage_model.transformer.") for key in shapes):
        family = "sd1"  # CLIP ViT-L text encoder
    else:
        family = ""
    if UNET_IN not in shapes:
        raise CheckpointError(
            f"{path} holds no Stable Diffusion UNet ({UNET_IN} is missing): not an SD 1.x/2.x checkpoint "
            f"(a VAE, an embedding, or another architecture such as SD 3 or Flux?)"
        )
    cross = next((s[-1] for k, s in sorted(shapes.items()) if re.search(r"attn2\.to_k\.weight$", k)), None)
    text = next(
        (
            s[-1]
            for k, s in shapes.items()
            if k.startswith("cond_stage_model.") and k.endswith("token_embedding.weight")
        ),
        None,
    )
    return Architecture(family, shapes[UNET_IN][1], cross, text)


def check_single_file(arch: Architecture, kind: str, path: Path) -> None:
    accepted = families(kind)
    if arch.family not in accepted:
        what = FAMILY_NAMES.get(
            arch.family, "not a Stable Diffusion 1.x/2.x checkpoint (no text encoder it knows)"
        )
        raise CheckpointError(f"{path} is {what}; {kind} accepts {accepted_architectures(kind)} checkpoints")
    needed = required_in_channels(kind)
    if arch.in_channels != needed:
        raise CheckpointError(
            f"{path} does not fit {kind}: its UNet takes {arch.in_channels} input channels, {kind} needs "
            f"{needed} ({MODELS[kind].description}); is it a model of another kind?"
        )


def _read_config(location: str, revision: Optional[str], filename: str) -> Optional[dict]:
    """One JSON file of a diffusers layout, local or on the hub; None when it is not there."""
    if Path(location).is_dir():
        path = Path(location) / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(location, filename, revision=revision)).read_text())
    except EntryNotFoundError:
        return None


def check_config_fits(arch: Architecture, location: str, revision: Optional[str], path: Path) -> None:
    """The config source must describe the checkpoint's shapes, or loading would fail halfway."""
    unet = _read_config(location, revision, "unet/config.json") or {}
    text = _read_config(location, revision, "text_encoder/config.json") or {}
    problems = []
    if unet.get("in_channels") != arch.in_channels:
        problems.append(f"UNet input channels {arch.in_channels} (config: {unet.get('in_channels')})")
    if arch.cross_attention_dim is not None and unet.get("cross_attention_dim") != arch.cross_attention_dim:
        problems.append(
            f"cross-attention width {arch.cross_attention_dim} (config: {unet.get('cross_attention_dim')})"
        )
    if arch.text_hidden is not None and text.get("hidden_size") != arch.text_hidden:
        problems.append(f"text encoder width {arch.text_hidden} (config: {text.get('hidden_size')})")
    if problems:
        raise CheckpointError(
            f"{path} does not match the config from {location}: " + "; ".join(problems) + ". Pass CONFIG= "
            "with a diffusers folder or hub id of the same architecture"
        )


def check_diffusers(location: str, revision: Optional[str], kind: str) -> None:
    index = _read_config(location, revision, "model_index.json") or {}
    unet = _read_config(location, revision, "unet/config.json") or {}
    expected = _published(kind, "model_index.json")["_class_name"]
    problems = []
    if index.get("_class_name") != expected:
        problems.append(f"it is a {index.get('_class_name')}, {kind} takes a {expected}")
    if unet.get("in_channels") != required_in_channels(kind):
        problems.append(
            f"its UNet takes {unet.get('in_channels')} input channels, {kind} needs "
            f"{required_in_channels(kind)}"
        )
    if unet.get("addition_embed_type") is not None:
        problems.append(f"its UNet has {unet['addition_embed_type']} added embeddings (SDXL)")
    if problems:
        raise CheckpointError(
            f"{location} does not fit {kind} ({accepted_architectures(kind)}): " + "; ".join(problems)
        )


def _config_source(arch: Architecture, kind: str, config: Optional[str]) -> Tuple[str, Optional[str]]:
    sources = [config] if config else list(families(kind)[arch.family])
    resolved, _ = weights.resolve(kind, sources, need_weights=False)
    return resolved.location, resolved.revision


def load_single_file(kind: str, path: Path, config: Optional[str] = None):
    """The kind's pipeline (fp16) from an original-format single-file checkpoint; and what to record."""
    import diffusers
    import torch

    if path.suffix in PICKLED:
        raise CheckpointError(f"{path}: pickled checkpoints are never loaded; use a .safetensors file")
    arch = inspect(path)
    check_single_file(arch, kind, path)
    location, revision = _config_source(arch, kind, config)
    check_config_fits(arch, location, revision, path)
    pipeline = getattr(diffusers, MODELS[kind].pipeline).from_single_file(
        str(path),
        config=location,
        revision=revision,
        torch_dtype=torch.float16,
        local_files_only=Path(location).is_dir(),
    )
    record = {"format": "single-file", "family": FAMILY_NAMES[arch.family], "config": location}
    if revision:
        record["config_revision"] = revision
    return pipeline, record


def load(kind: str, source: str, config: Optional[str] = None):
    """A pipeline of `kind` from a single .safetensors file, a diffusers folder or a hub id."""
    path = Path(source)
    if path.suffix == ".safetensors" or path.suffix in PICKLED:
        if not path.is_file():
            raise CheckpointError(f"{source}: no such file")
        return load_single_file(kind, path, config)
    pipeline, record = weights.download(
        kind, [source], check=lambda resolved: check_diffusers(resolved.location, resolved.revision, kind)
    )
    return pipeline, {"format": "diffusers", **record}


def fuse_lora(pipeline, lora: str, scale: float) -> dict:
    """Fuse a LoRA (a .safetensors file) into the weights, with the checks and the fusing of adapters
    (sdmme.adapters): every one of its layers must land, or nothing is changed."""
    from sdmme.adapters import files
    from sdmme.adapters.fusing import Fuser

    modules = {c: getattr(pipeline, c) for c in files.COMPONENTS}
    architecture = files.empty_architecture(pipeline.unet.config, pipeline.text_encoder.config)
    try:
        tensors, info = files.convert(files.local_file(lora), architecture)
        layers = files.layers_of(tensors, modules, lambda why: files.AdapterError(f"LoRA {lora} {why}"))
    except files.AdapterError as e:
        raise CheckpointError(str(e)) from None
    Fuser(modules).apply([("lora", layers, scale)])
    log.info(
        "fused LoRA %s at scale %s into %s",
        lora,
        scale,
        ", ".join(f"{n} {c} layers" for c, n in info["layers"].items() if n),
    )
    return {"lora": lora, "lora_scale": scale, "lora_layers": info["layers"], "lora_format": info["format"]}
