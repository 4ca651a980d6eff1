"""Make each default model's folder (`<repository>/<model>/`, sdmme/model_folder.py) and fill its weights
folder (`1/weights`) from one of three sources.

- `tiny`: random tiny pipelines built offline (tests, demo, CI);
- `full`: the real architectures at full size with random weights, built offline from the published
  configs in `sdmme/tools/configs/` (fp16 safetensors: the real weights' shapes and bytes, noise as images);
- `hub`: the real models, from the first of an ordered list of sources that answers (each model's
  `hub_sources` in spec.py, or `--source`): hub ids, local folders or `file://` locations laid out like a
  hub repository. The fp16 safetensors variant where every component has one, else the full-precision
  safetensors converted to fp16 here; pickled checkpoints are never fetched or loaded.

All end in `save_pretrained` into the same folder, which the server loads with the same code, and a
record (`source.json`) of where the weights came from.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple
from urllib.parse import urlparse

from sdmme import model_folder
from sdmme.spec import MODELS

log = logging.getLogger("sdmme.tools.weights")
SOURCE_FILE = "source.json"  # records where a weights folder came from


def weights_dir(repository: Path, model: str) -> Path:
    return model_folder.weights_dir(repository / model)


def _build_tiny(model: str):
    from sdmme.tools import tiny

    return tiny.BUILDERS[model]()


def _build_full(model: str):
    from sdmme.tools import full

    return full.build(model)


class SourceError(Exception):
    """This source cannot provide the weights; the message says why."""


@dataclass(frozen=True)
class Resolved:
    location: str  # what from_pretrained is given: a hub id or a local folder
    revision: Optional[str]  # the hub commit it resolved to (None for a local folder)
    variant: Optional[str]  # "fp16" when every component has an fp16 safetensors variant


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def _variant(files: Sequence[str]) -> Optional[str]:
    """fp16 when every component's weights come as an fp16 safetensors variant, None for full precision."""
    weights = [f for f in files if "/" in f and f.endswith(WEIGHT_SUFFIXES)]
    components = {f.split("/")[0] for f in weights}
    safe = {f.split("/")[0] for f in weights if f.endswith(".safetensors")}
    if not components or components - safe:
        only_pickled = ", ".join(sorted(components - safe)) or "every component"
        raise SourceError(f"no safetensors weights for {only_pickled} (pickled checkpoints are never loaded)")
    fp16 = {f.split("/")[0] for f in weights if f.endswith(".fp16.safetensors")}
    return "fp16" if fp16 == components else None


def _resolve_one(source: str, need_weights: bool = True) -> Resolved:
    if source.startswith(("file://", "/", "./", "../")) or Path(source).is_dir():
        folder = Path(urlparse(source).path if source.startswith("file://") else source)
        if not (folder / "model_index.json").is_file():
            raise SourceError(f"no model_index.json in {folder}")
        files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        return Resolved(str(folder), None, _variant(files) if need_weights else None)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        info = HfApi().model_info(source)  # HF_TOKEN is honoured
    except GatedRepoError:
        raise SourceError("gated: accept its terms on the hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SourceError("not found on the hub (removed, or private: set HF_TOKEN)") from None
    except Exception as e:  # offline, DNS, proxy, timeouts
        raise SourceError(f"unreachable ({type(e).__name__}: {str(e)[:200]})") from None
    files = [s.rfilename for s in info.siblings or []]
    return Resolved(source, info.sha, _variant(files) if need_weights else None)


def resolve(model: str, sources: Sequence[str], need_weights: bool = True) -> Tuple[Resolved, List[str]]:
    """The first source that can provide the weights (or, without need_weights, the configs and
    tokenizer alone), and what was tried before it."""
    tried = []
    for source in sources:
        try:
            resolved = _resolve_one(source, need_weights)
        except SourceError as e:
            tried.append(f"{source}: {e}")
            log.warning("%s: %s cannot be used (%s); trying the next source", model, source, e)
            continue
        log.info(
            "%s: %s from %s%s%s",
            model,
            "weights" if need_weights else "configs and tokenizer",
            resolved.location,
            f" at {resolved.revision}" if resolved.revision else "",
            (" (fp16 variant)" if resolved.variant else " (full precision, converted to fp16)")
            if need_weights
            else "",
        )
        return resolved, tried
    raise SystemExit(
        f"{model}: no source of weights could be used; tried, in order:\n  "
        + "\n  ".join(tried)
        + "\nOffline? Gated? Set HF_TOKEN, or name a local copy laid out like the hub repository "
        "(python -m sdmme.tools.weights hub --source /path/to/folder)."
    )


def download(
    model: str, sources: Optional[Sequence[str]] = None, check: Optional[Callable[[Resolved], None]] = None
):
    """The pipeline of `model` (a kind) from the first usable source; `check` may refuse it before the
    weights are read."""
    import diffusers
    import torch

    resolved, tried = resolve(model, sources or MODELS[model].hub_sources)
    if check is not None:
        check(resolved)
    # Only the files the pipeline needs, safetensors only; the hub shows progress bars. Without an fp16
    # variant the full-precision weights are read as fp16: the saved weights are fp16 either way.
    pipeline = getattr(diffusers, MODELS[model].pipeline).from_pretrained(
        resolved.location,
        revision=resolved.revision,
        dtype=torch.float16,
        variant=resolved.variant,
        use_safetensors=True,
    )
    record = {
        "location": resolved.location,
        "revision": resolved.revision,
        "variant": resolved.variant or "float32, converted to fp16",
        "tried": tried,
    }
    return pipeline, record


def _built(builder):
    return lambda model, sources=None: (builder(model), {})


SOURCES = {"tiny": _built(_build_tiny), "full": _built(_build_full), "hub": download}


def fill(
    repository: Path,
    model: str,
    source: str,
    force: bool = False,
    sources: Optional[Sequence[str]] = None,
    if_missing: bool = False,
) -> Path:
    """The default model of kind `model` with `source` weights; `if_missing`: any weights already there
    stay (make weights, which also rewrites config.pbtxt when the spec changed)."""
    model_folder.write(repository / model, model)  # the contract, kept current
    dest = weights_dir(repository, model)
    marker = dest / SOURCE_FILE
    if marker.exists() and not force:
        have = json.loads(marker.read_text())["source"]
        if have == source or if_missing:
            log.info("%s: %s weights already in %s", model, source, dest)
            return dest
        raise SystemExit(f"{model}: {dest} holds {have} weights; pass --force to replace them with {source}")
    start = time.monotonic()
    log.info("%s: building %s weights", model, source)
    pipeline, record = SOURCES[source](model, sources)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    record = {"source": source, "model": model, "architecture": MODELS[model].hub_sources[-1], **record}
    (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
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
    parser.add_argument("--if-missing", action="store_true", help="keep weights of any source already there")
    parser.add_argument(
        "--source",
        dest="sources",
        action="append",
        help="with hub: a hub id, local folder or file:// location to try instead of the model's own list "
        "(repeat to try several in order)",
    )
    args = parser.parse_args()
    for model in args.models:
        fill(args.repository, model, args.source, args.force, args.sources, args.if_missing)


if __name__ == "__main__":
    main()
