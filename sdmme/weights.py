"""Fill each model's weights folder (`<repository>/<model>/1/weights`) from one of two sources.

- `tiny`: random tiny pipelines built offline (tests, demo, CI);
- `full`: the real architectures at full size with random weights, built offline from the published
  configs in `sdmme/configs/` (fp16 safetensors: the real weights' shapes and bytes, noise as images);
- `hub`: the real models from the Hugging Face hub, fp16 safetensors only.

Both end in `save_pretrained` into the same folder, which the server loads with the same code.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from sdmme.spec import MODELS

log = logging.getLogger("sdmme.weights")
SOURCE_FILE = "source.json"  # records where a weights folder came from


def weights_dir(repository: Path, model: str) -> Path:
    return repository / model / "1" / "weights"


def _build_tiny(model: str):
    from sdmme import tiny

    return tiny.BUILDERS[model]()


def _build_full(model: str):
    from sdmme import full

    return full.build(model)


def _download(model: str):
    import diffusers
    import torch

    spec = MODELS[model]
    # Only the fp16 safetensors variant of each component is fetched; the hub shows progress bars.
    return getattr(diffusers, spec.pipeline).from_pretrained(
        spec.hub_id, torch_dtype=torch.float16, variant="fp16", use_safetensors=True
    )


SOURCES = {"tiny": _build_tiny, "full": _build_full, "hub": _download}


def fill(repository: Path, model: str, source: str, force: bool = False) -> Path:
    dest = weights_dir(repository, model)
    marker = dest / SOURCE_FILE
    if marker.exists() and not force:
        have = json.loads(marker.read_text())["source"]
        if have == source:
            log.info("%s: %s weights already in %s", model, source, dest)
            return dest
        raise SystemExit(f"{model}: {dest} holds {have} weights; pass --force to replace them with {source}")
    start = time.monotonic()
    log.info("%s: building %s weights", model, source)
    pipeline = SOURCES[source](model)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    (tmp / SOURCE_FILE).write_text(json.dumps({"source": source, "hub_id": MODELS[model].hub_id}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log.info(
        "%s: %s weights saved to %s (%.1f MB, %.1fs)",
        model,
        source,
        dest,
        size / 1e6,
        time.monotonic() - start,
    )
    return dest


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", choices=sorted(SOURCES))
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--force", action="store_true", help="replace weights from another source")
    args = parser.parse_args()
    for model in args.models:
        fill(args.repository, model, args.source, args.force)


if __name__ == "__main__":
    main()
