"""Full-size pipelines with random weights, built offline from the published configs in `configs/`.

`configs/<model>/` is laid out like the model's hub repository with the weights (and the tokenizer's
vocabulary) left out: diff it against the published files. Random weights have the real models' shapes,
so memory, speed and every architecture-dependent behaviour (linear projections, the DPT-hybrid depth
estimator, the upscaler's 4-level UNet) are those of the real models; the images are noise.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import diffusers
import torch
import transformers

from sdmme.tools import tiny

log = logging.getLogger("sdmme")
CONFIGS = Path(__file__).resolve().parent / "configs"


def _component(folder: Path, library: str, class_name: str):
    if library == "diffusers":
        cls = getattr(diffusers, class_name)
        if issubclass(cls, diffusers.SchedulerMixin):
            return cls.from_pretrained(folder)
        return cls.from_config(cls.load_config(folder))
    if class_name == "CLIPTokenizer":
        # The published vocabulary is not kept here: the byte-level one tokenises any prompt.
        return tiny.tokenizer()
    cls = getattr(transformers, class_name)
    if class_name.endswith(("ImageProcessor", "FeatureExtractor")):
        return cls.from_pretrained(folder)
    return cls(transformers.AutoConfig.from_pretrained(folder))


def build(model: str, dtype: torch.dtype = torch.float16) -> diffusers.DiffusionPipeline:
    """The pipeline of `model` at full size with random weights, in `dtype` (fp16, as published)."""
    folder = CONFIGS / model
    index = json.loads((folder / "model_index.json").read_text())
    torch.manual_seed(0)
    start = time.monotonic()
    components, settings = {}, {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list):
            settings[name] = value  # pipeline settings such as max_noise_level
            continue
        library, class_name = value
        present = library is not None and (folder / name).is_dir()
        components[name] = _component(folder / name, library, class_name) if present else None
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            torch.nn.Module.to(component, dtype)  # random weights: nothing has to stay in fp32
    pipeline = getattr(diffusers, index["_class_name"])(**components, **settings)
    parameters = sum(
        p.numel() for c in components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()
    )
    log.info(
        "%s: built %s at full size (%.0fM parameters, random) in %.1fs",
        model,
        index["_class_name"],
        parameters / 1e6,
        time.monotonic() - start,
    )
    return pipeline
