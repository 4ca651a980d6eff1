"""`make compile-cache MODEL=sd_base [SHAPES=512:1,512:8]`: torch.compile's caches for a model, built on
this machine's GPU (CPU without one) for endpoints of that GPU type.

Loads the model with its config.pbtxt's compile setting, runs each SIDE:BATCH (default: the warm-up's
size at batch 1 and at the largest batch a call makes) and writes
`model_repository/<model>/1/compile/<mode>-<key>.torchcache` with its record `.json` (key, shapes, bytes,
sha256), which a cold load takes (sdmme/pipeline/compile_artifacts.py). `make package` ships them;
`make models` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Tuple

from sdmme import loader, model_folder
from sdmme.pipeline.compile_artifacts import FOLDER, SUFFIX, compiled_graphs, key

log = logging.getLogger("sdmme")


def build(folder: Path, shapes: Optional[List[Tuple[int, int]]] = None) -> Path:
    """Compiles the model as its config.pbtxt says on this machine, runs `shapes` (side, batch) and
    writes the artifacts and their record into the model's folder; returns the artifact's path."""
    import torch

    from sdmme.serving import batching

    parameters = model_folder.parameters_in((folder / model_folder.CONFIG).read_text())
    spec, device, settings = loader.prepare(
        parameters, "GPU" if torch.cuda.is_available() else "CPU", "0", folder.name
    )
    if settings.compile == "none":
        raise SystemExit(
            f"{folder.name}: its config.pbtxt sets no compile mode, so nothing compiles: add "
            'parameters: { key: "compile" value: { string_value: "reduce-overhead" } } first'
        )
    side = batching.default_side(spec)
    shapes = shapes or [(side, 1), (side, batching.MAX_IMAGES_PER_CALL)]
    start = time.perf_counter()
    runner = loader.load(spec, folder, device, settings, use_artifacts=False).runner
    for side, batch in shapes:
        jobs = [dataclasses.replace(batching.warmup_job(spec, side), index=i) for i in range(batch)]
        shape_start = time.perf_counter()
        batching.run(runner, jobs)
        log.info(
            "%s: %dpx x %d compiled and run in %.1fs",
            folder.name,
            side,
            batch,
            time.perf_counter() - shape_start,
        )
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        raise SystemExit(f"{folder.name}: torch recorded no compile artifacts")
    data, _ = saved
    what = key(device, settings.compile)
    stem = f"{settings.compile}-{hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]}"
    dest = folder / model_folder.VERSION / FOLDER / f"{stem}{SUFFIX}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    record = {
        "key": what,
        "shapes": [f"{side}:{batch}" for side, batch in shapes],
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - start, 1),
        "graphs": compiled_graphs(),
    }
    dest.with_suffix(".json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    log.info("%s: wrote %s (%.1f MB) for %s", folder.name, dest, len(data) / 1e6, what["device"])
    return dest


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    shapes = []
    for item in filter(None, text.split(",")):
        side, _, batch = item.partition(":")
        if not side.isdigit() or not (batch or "1").isdigit():
            raise SystemExit(f"SHAPES: {item!r} is not SIDE:BATCH (e.g. 512:1,512:8)")
        shapes.append((int(side), int(batch or 1)))
    return shapes


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument(
        "--shapes", default="", help="SIDE:BATCH,... (default: the warm-up's size at 1 and 8)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = args.repository / args.model
    if not (folder / model_folder.CONFIG).exists():
        raise SystemExit(f"no model {args.model} in {args.repository}")
    # Compile everything afresh here, so that the artifact holds every graph, not what a warm local
    # cache would have answered without recording it.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdmme-compile-")
    build(folder, parse_shapes(args.shapes))


if __name__ == "__main__":
    main()
