"""The model repository: which models it holds and of which kind, and `make model`, which adds one.

A model is a folder (sdmme/model_folder.py) whose config.pbtxt is written from its kind's spec. Models of
one kind differ only in their weights (and settings), so a new one takes the settings of its kind's
default folder, when there is one, and other weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from sdmme import model_folder
from sdmme.spec import MODELS

log = logging.getLogger("sdmme.tools.weights")
# A TargetModel is `<name>.tar.gz`; Triton model names and S3 keys both take these characters.
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")


class ModelError(Exception):
    """The model cannot be added or read; nothing was written."""


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

    from sdmme.tools import checkpoints

    check_name(name)
    if kind not in MODELS:
        raise ModelError(f"kind {kind!r} is not one of {', '.join(MODELS)}")
    template = repository / kind / model_folder.CONFIG
    parameters = model_folder.parameters_in(template.read_text()) if template.is_file() else {}
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
        partial.mkdir(parents=True)
        model_folder.write(partial, kind, parameters, name=name)
        if pipeline.unet.dtype != torch.float16:  # the loaders read fp16 already; a safeguard
            pipeline.to(torch.float16)
        pipeline.save_pretrained(model_folder.weights_dir(partial), safe_serialization=True)
        record = {"source": "custom", "model": name, "kind": kind, "weights": weights, **record}
        (model_folder.weights_dir(partial) / "source.json").write_text(json.dumps(record, indent=2) + "\n")
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
    from sdmme.tools.checkpoints import CheckpointError

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
