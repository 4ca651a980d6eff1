"""`make adapter NAME=<name> MODEL=<model> FILE=<lora.safetensors>`: a LoRA as an adapter of a model.

The file (diffusers, PEFT or kohya format; or a hub id) is checked against the model's architecture before
anything is written, then stored in the one format serving reads as
`model_repository/<model>/adapters/<name>.safetensors` with its record `<name>.json` (source, format,
rank, layers, bytes, sha256). `make serve` serves it at once; `make upload` puts it where an endpoint
finds it (s3://BUCKET/PREFIX/adapters/<model>/), live without a redeploy.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from sdmme import model_folder
from sdmme.adapters import FOLDER, files
from sdmme.spec import InvalidInput, check_adapter_name

log = logging.getLogger("sdmme.tools.weights")


def add(model_repository: Path, model: str, name: str, source: str, force: bool = False) -> dict:
    """Check `source` against `model` and write it as the model's adapter `name`; returns its record.
    Raises InvalidInput (a bad name) or AdapterError, having written nothing."""
    start = time.monotonic()
    check_adapter_name(name, "adapter name")
    folder = model_repository / model
    kinds = model_folder.in_repository(model_repository)
    if model not in kinds:
        raise files.AdapterError(f"no model {model} in {model_repository} (there: {', '.join(kinds)})")
    dest = folder / FOLDER / f"{name}.safetensors"
    if dest.exists() and not force:
        raise files.AdapterError(f"{dest} exists; pass FORCE=1 (--force) to replace it")
    architecture = files.architecture_of(folder / "1" / "weights")
    tensors, info = files.convert(files.local_file(source), architecture)
    dest.parent.mkdir(parents=True, exist_ok=True)
    record = files.write(
        tensors, dest, {"name": name, "model": model, "kind": kinds[model], "source": source, **info}
    )
    log.info(
        "%s: adapter %s from %s (%s, rank %d, %s) in %s (%.1f MB, %.1fs)",
        model,
        name,
        source,
        info["format"],
        info["rank"],
        ", ".join(f"{n} {c} layers" for c, n in info["layers"].items() if n),
        dest,
        record["bytes"] / 1e6,
        time.monotonic() - start,
    )
    return record


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        prog="make adapter", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", help="the adapter's name, as requests give it in gen_args.lora")
    parser.add_argument("--model", required=True, help="the model it adapts (a folder of the repository)")
    parser.add_argument("--file", required=True, help="the LoRA: a .safetensors file or a hub id")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--force", action="store_true", help="replace an adapter of that name")
    args = parser.parse_args()
    try:
        add(args.repository, args.model, args.name, args.file, args.force)
    except InvalidInput as e:  # AdapterError among them
        raise SystemExit(f"make adapter: {e}") from None


if __name__ == "__main__":
    main()
