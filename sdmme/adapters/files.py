"""Adapter files: a LoRA in any format, read once into the one form this project stores and serves.

`make adapter` (and `make model LORA=`) read a LoRA the way diffusers does (its own format, PEFT's,
kohya's), loading it onto the model's architecture built from the model's configs without weights. What
landed there is the LoRA as that model sees it; it is written in one canonical form, per adapted layer
`<component>.<layer>.lora_A.weight`, `.lora_B.weight` and `.alpha` (scale = alpha / rank, kohya's
convention), in the source's precision. Serving reads only that form, with safetensors alone (no
diffusers conversion, no PEFT), and checks it against the loaded model before it touches a weight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from sdmme.spec import InvalidInput

COMPONENTS = ("unet", "text_encoder")  # what a Stable Diffusion LoRA adapts, in every kind
MAX_RANK = 256
MAX_BYTES = 512 * 1024 * 1024  # a rank-128 LoRA of every UNet and text-encoder layer of SD 2 fits
PICKLED = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")
RECORD = ".json"  # <name>.json beside <name>.safetensors: what make adapter checked and wrote
NOWHERE = "layers match no layer of this model (a LoRA for another architecture?)"
_KEY = re.compile(r"\A(unet|text_encoder)\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)\Z")


class AdapterError(InvalidInput):
    """This adapter cannot be used on this model; the message names it and says why."""


Layers = Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]  # "<component>.<layer>" -> (A, B, scale)


def too_large(size: int) -> str:
    return f"{size:,} bytes; at most {MAX_BYTES:,} ({MAX_BYTES // 2**20} MiB)"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def empty_architecture(unet_config: dict, text_encoder_config) -> Dict[str, torch.nn.Module]:
    """The UNet and text encoder of a model, with uninitialised weights (allocated, never written): the
    shapes a LoRA must fit, at no cost even at full size."""
    import diffusers
    from accelerate import init_empty_weights
    from transformers import CLIPTextModel

    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(text_encoder_config)
    return {"unet": unet.to_empty(device="cpu"), "text_encoder": text_encoder.to_empty(device="cpu")}


def architecture_of(weights: Path) -> Dict[str, torch.nn.Module]:
    """The empty architecture of a model's weights folder (its unet/ and text_encoder/ configs)."""
    import diffusers
    from transformers import CLIPTextConfig

    if not (weights / "unet" / "config.json").is_file():
        raise AdapterError(f"no weights in {weights}: an adapter is checked against its model (make weights)")
    unet = diffusers.UNet2DConditionModel.load_config(weights / "unet")
    return empty_architecture(unet, CLIPTextConfig.from_pretrained(weights / "text_encoder"))


def _source_format(keys) -> str:
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for k in keys):
        return "kohya"
    return "peft" if any(".lora_A." in k for k in keys) else "diffusers"


HUB_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' trainers write and look for


def local_file(source: str) -> Path:
    """A LoRA given as a file, or as a hub id (its pytorch_lora_weights.safetensors, fetched once)."""
    path = Path(source)
    if path.suffix in (".safetensors", *PICKLED) or path.exists() or source.count("/") != 1:
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, HUB_WEIGHT_NAME))
    except Exception as e:
        raise AdapterError(
            f"LoRA {source}: no such file, and no {HUB_WEIGHT_NAME} from the hub ({type(e).__name__})"
        ) from None


def convert(path: Path, architecture: Dict[str, torch.nn.Module]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """The canonical tensors of the LoRA at `path` for this architecture, and what to record about it.

    Every check runs here: safetensors only, within the size and rank caps, every layer it names present
    in the model with its shape; a LoRA for another architecture is refused, never half applied.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    from peft.tuners.lora import LoraLayer
    from safetensors import safe_open

    path = Path(path)
    if path.suffix in PICKLED:
        raise AdapterError(f"LoRA {path}: pickled files are never loaded; use a .safetensors file")
    if not path.is_file():
        raise AdapterError(f"LoRA {path}: no such file")
    if path.stat().st_size > MAX_BYTES:
        raise AdapterError(f"LoRA {path} is {too_large(path.stat().st_size)}")
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            dtype = f.get_slice(keys[0]).get_dtype() if keys else None
        state, alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as e:
        raise AdapterError(f"LoRA {path} cannot be read: {type(e).__name__}: {str(e)[:300]}") from None
    if any(".lora_magnitude_vector" in k or "dora_scale" in k for k in keys):
        raise AdapterError(f"LoRA {path} is a DoRA: only plain LoRAs are supported")
    wanted = {
        c: sum(1 for k in state if k.startswith(c + ".") and k.endswith(("lora_A.weight", "down.weight")))
        for c in COMPONENTS
    }
    if not sum(wanted.values()):
        raise AdapterError(
            f"LoRA {path} adapts neither the UNet nor the text encoder (keys: {', '.join(keys[:3])})"
        )
    try:
        Loader.load_lora_into_unet(
            state, alphas, architecture["unet"], adapter_name="check", metadata=metadata
        )
        if wanted["text_encoder"]:
            Loader.load_lora_into_text_encoder(
                state,
                alphas,
                architecture["text_encoder"],
                prefix="text_encoder",
                adapter_name="check",
                metadata=metadata,
            )
    except Exception as e:  # no layer of that name (PEFT's words), or layers of other shapes
        if "not found in the base model" in str(e):
            total = sum(wanted.values())
            raise AdapterError(f"LoRA {path}: {total} of its {total} {NOWHERE}") from None
        raise AdapterError(f"LoRA {path} does not fit this model: {str(e)[:600]}") from None
    tensors: Dict[str, torch.Tensor] = {}
    counts, rank = {}, 0
    for component in COMPONENTS:
        counts[component] = 0
        for name, module in architecture[component].named_modules():
            if not isinstance(module, LoraLayer) or "check" not in module.lora_A:
                continue
            if module.use_dora.get("check") or getattr(module, "lora_bias", {}).get("check"):
                raise AdapterError(
                    f"LoRA {path}: {name} is a DoRA or has a bias; only plain LoRAs are supported"
                )
            a, b = module.lora_A["check"].weight, module.lora_B["check"].weight
            r = a.shape[0]
            key = f"{component}.{name}"
            tensors[f"{key}.lora_A.weight"] = a.detach().to(dtype=_torch_dtype(dtype)).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.detach().to(dtype=_torch_dtype(dtype)).contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(module.scaling["check"]) * r, dtype=torch.float32)
            counts[component] += 1
            rank = max(rank, r)
    missing = sum(wanted.values()) - sum(counts.values())
    if missing:
        raise AdapterError(f"LoRA {path}: {missing} of its {sum(wanted.values())} {NOWHERE}")
    if rank > MAX_RANK:
        raise AdapterError(f"LoRA {path} has rank {rank}; at most {MAX_RANK}")
    info = {"format": _source_format(keys), "rank": rank, "layers": counts, "dtype": str(dtype)}
    return tensors, info


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float32}


def _torch_dtype(safetensors_dtype: Optional[str]) -> torch.dtype:
    return _DTYPES.get(safetensors_dtype, torch.float32)


def write(tensors: Dict[str, torch.Tensor], dest: Path, record: dict) -> dict:
    """`dest` (<name>.safetensors) and its record beside it, the record last: a record means a whole file.
    The file gets the record's mode (safetensors writes 0600, which a server running as another user
    cannot read)."""
    from safetensors.torch import save_file

    partial = dest.with_name(dest.name + ".partial")
    save_file(tensors, str(partial))
    record = {**record, "bytes": partial.stat().st_size, "sha256": sha256(partial)}
    record_partial = dest.with_name(dest.stem + RECORD + ".partial")
    record_partial.write_text(json.dumps(record, indent=2) + "\n")
    os.chmod(partial, stat.S_IMODE(record_partial.stat().st_mode))
    partial.rename(dest)
    record_partial.rename(dest.with_suffix(RECORD))
    return record


def read(path: Path, record: dict, modules: Dict[str, torch.nn.Module], name: str, where: str) -> Layers:
    """The layers of a canonical adapter file checked against its record and the loaded model's
    `modules` ({"unet": ..., "text_encoder": ...}); anything else is refused naming the adapter.

    The file is read into memory once, and that copy is what is checked and used: a tensor mapped from
    the file would change (or fault, cut short) when the file is rewritten while the model serves."""
    from safetensors.torch import load

    def refuse(why: str):
        return AdapterError(f"adapter {name} in {where} {why}")

    size = path.stat().st_size
    if size > MAX_BYTES:
        raise refuse(f"is {too_large(size)}")
    data = path.read_bytes()
    if len(data) != record.get("bytes") or hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise refuse(
            f"is not the file its record describes ({len(data)} bytes; the record says "
            f"{record.get('bytes')} bytes and its sha256): truncated or corrupt; add it again with make "
            "adapter and upload it"
        )
    try:
        tensors = load(data)
    except Exception as e:
        raise refuse(f"is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    return layers_of(tensors, modules, refuse)


def layers_of(tensors: Dict[str, torch.Tensor], modules: Dict[str, torch.nn.Module], refuse) -> Layers:
    """The canonical tensors as layers of `modules`, each checked to fit; `refuse(why)` makes the error."""
    parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        found = _KEY.match(key)
        if not found:
            raise refuse(
                f"holds {key!r}, which is not in this project's adapter format (make adapter writes it)"
            )
        parts.setdefault(f"{found.group(1)}.{found.group(2)}", {})[found.group(3)] = tensor
    layers: Layers = {}
    lookup = {c: dict(modules[c].named_modules()) for c in COMPONENTS if modules.get(c) is not None}
    for key, part in sorted(parts.items()):
        component, module_name = key.split(".", 1)
        if set(part) != {"lora_A.weight", "lora_B.weight", "alpha"}:
            raise refuse(f"lacks part of layer {module_name} (has {', '.join(sorted(part))})")
        a, b, alpha = part["lora_A.weight"], part["lora_B.weight"], part["alpha"]
        module = lookup.get(component, {}).get(module_name)
        weight = getattr(module, "weight", None)
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or weight is None:
            raise refuse(
                f"adapts {component}.{module_name}, which this model does not have: a LoRA for another model?"
            )
        r = a.shape[0]
        fits = (
            a.dim() == weight.dim()
            and b.dim() == weight.dim()
            and b.shape[:2] == (weight.shape[0], r)
            and a.shape[1:] == weight.shape[1:]
            and all(s == 1 for s in b.shape[2:])
            and r <= MAX_RANK
        )
        if not fits or alpha.numel() != 1:
            raise refuse(
                f"does not fit {component}.{module_name}: A {list(a.shape)}, B {list(b.shape)} for a "
                f"weight of {list(weight.shape)}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all() and torch.isfinite(alpha).all()):
            raise refuse(f"holds values that are not finite in {component}.{module_name}")
        layers[key] = (a, b, float(alpha) / r)
    if not layers:
        raise refuse("adapts no layer")
    return layers
