"""The model repository: which models it holds and of which kind, and `make model`, which adds one.

A model is a folder `<name>/` with config.pbtxt (its kind in `parameters`), `1/model.py` (the shared
implementation) and `1/weights/` (fp16 safetensors in the diffusers layout, with `source.json`). Models of
one kind differ only in their weights, so a new one is its kind's default folder with other weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

from sdmme.spec import KIND_PARAMETER, MODELS

log = logging.getLogger("sdmme.weights")
# A TargetModel is `<name>.tar.gz`; Triton model names and S3 keys both take these characters.
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_PARAMETER = re.compile(
    r'parameters:\s*\{\s*key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', re.S
)


class ModelError(Exception):
    """The model cannot be added or read; nothing was written."""


def parameters_in(config_text: str) -> Dict[str, str]:
    """The `parameters` a config.pbtxt sets (string values, as Triton hands them to the model)."""
    return dict(_PARAMETER.findall(config_text))


def parameters_text(parameters: Dict[str, str]) -> str:
    """config.pbtxt lines setting these `parameters` (what parameters_in reads back)."""
    return "".join(
        f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
        for key, value in parameters.items()
    )


def kind_in(config_text: str) -> Optional[str]:
    """The kind a config.pbtxt declares, or None."""
    return parameters_in(config_text).get(KIND_PARAMETER)


def models(repository: Path) -> Dict[str, str]:
    """Every model folder in the repository and its kind."""
    found = {}
    for config in sorted(repository.glob("*/config.pbtxt")):
        found[config.parent.name] = kind_in(config.read_text()) or "unknown"
    return found


def check_name(name: str) -> None:
    if not NAME.match(name) or name.endswith(".tar.gz"):
        raise ModelError(
            f"model name {name!r}: use 1 to 63 letters, digits, '_', '-' or '.', starting with a letter or "
            "digit, without .tar.gz (the archive is <name>.tar.gz)"
        )


def add(
    repository: Path,
    name: str,
    kind: str,
    weights: str,
    lora: Optional[str] = None,
    lora_scale: float = 1.0,
    config: Optional[str] = None,
    force: bool = False,
) -> Path:
    """`repository/<name>/`, a model of `kind` with `weights` (and `lora` fused at `lora_scale`)."""
    import torch

    from sdmme import checkpoints

    check_name(name)
    if kind not in MODELS:
        raise ModelError(f"kind {kind!r} is not one of {', '.join(MODELS)}")
    template = repository / kind
    if not (template / "config.pbtxt").is_file():
        raise ModelError(f"{template}/config.pbtxt is missing: the default {kind} model is the template")
    dest = repository / name
    if dest.exists() and not force:
        raise ModelError(f"{dest} exists; pass FORCE=1 (--force) to replace it")
    if name in MODELS and name != kind:
        raise ModelError(f"{name} is the default model of another kind; choose another name")
    start = time.monotonic()
    pipeline, record = checkpoints.load(kind, weights, config)  # every check, before anything is written
    if lora:
        record.update(checkpoints.fuse_lora(pipeline, lora, lora_scale))
    partial = repository / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        text = (template / "config.pbtxt").read_text()
        (partial / "1").mkdir(parents=True)
        (partial / "config.pbtxt").write_text(
            re.sub(r'^name:\s*"[^"]*"', f'name: "{name}"', text, count=1, flags=re.M)
        )
        shutil.copy2(template / "1" / "model.py", partial / "1" / "model.py")
        if pipeline.unet.dtype != torch.float16:  # the loaders read fp16 already; a safeguard
            pipeline.to(torch.float16)
        pipeline.save_pretrained(partial / "1" / "weights", safe_serialization=True)
        record = {"source": "custom", "model": name, "kind": kind, "weights": weights, **record}
        (partial / "1" / "weights" / "source.json").write_text(json.dumps(record, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("%s: a %s model from %s in %s (%.1fs)", name, kind, weights, dest, time.monotonic() - start)
    return dest


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="the model's name; it is served as TargetModel <name>.tar.gz")
    parser.add_argument("--kind", required=True, choices=sorted(MODELS))
    parser.add_argument(
        "--weights",
        required=True,
        help="a single-file checkpoint (.safetensors), a local diffusers folder, or a hub id",
    )
    parser.add_argument("--lora", help="a LoRA (.safetensors file or hub id) fused into the weights")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="the LoRA's strength (default 1)")
    parser.add_argument(
        "--config",
        help="single files: a diffusers folder or hub id with the architecture's configs and tokenizer "
        "(default: the kind's own sources, SD 1.x ones for SD 1.x files)",
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--force", action="store_true", help="replace an existing model of that name")
    args = parser.parse_args()
    from sdmme.checkpoints import CheckpointError

    try:
        add(
            args.repository,
            args.name,
            args.kind,
            args.weights,
            args.lora,
            args.lora_scale,
            args.config,
            args.force,
        )
    except (ModelError, CheckpointError) as e:
        raise SystemExit(f"make model: {e}") from None


if __name__ == "__main__":
    main()
