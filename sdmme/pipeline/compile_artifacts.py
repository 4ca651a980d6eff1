"""The compile setting, and its artifacts: torch.compile's caches built once on a machine with the
endpoint's GPU type (`make compile-cache`, sdmme/tools/compile_cache.py), shipped in the model's archive
and loaded at a cold load, so a compiled model compiles nothing there.

`compile: reduce-overhead` is the fastest path measured (docs/benchmarks.md), but each cold load compiles
for about a minute, and an MME loads cold models all day. torch's Mega-Cache
(`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) carries the FX-graph, AOTAutograd,
Triton-kernel and autotuning caches a compile filled; loaded before the model compiles, every graph
comes from them (Dynamo still traces: seconds). It is valid only for the same GPU, torch and Triton,
so each artifact is keyed by what it is valid for, and a load takes only an exact match: another GPU or
torch, or a corrupt file, is a log line saying why and a normal compile, never a failed load.
Mega-Cache over AOTInductor: it keeps every compile mode (CUDA graphs included) and the batches and sizes
compiled at run time, where an AOTInductor package is one fixed shape without CUDA graphs.

On the instance itself torch's own cache (TORCHINDUCTOR_CACHE_DIR, /tmp/torchinductor_<user> by
default) outlives a model's process: a model unloaded and loaded again (SageMaker evicts idle ones)
compiles nothing the second time, with or without artifacts.

    make compile-cache MODEL=sd_base [SHAPES=512:1,512:8]

(sdmme/tools/compile_cache.py) loads the model with its config.pbtxt's compile setting on this machine's
GPU (CPU without one), runs each SIDE:BATCH (default: the warm-up's size at batch 1 and at the largest
batch a call makes) and writes `model_repository/<model>/1/compile/<mode>-<key>.torchcache` with its
record `.json` (key, shapes, bytes, sha256). `make package` ships them; `make models` lists them.

An artifact is compiled code (kernels, and torch's pickle around them): like model.py it is trusted
because the operator built it, and the archive ships it although it ships no pickled weights. The
sha256 in its record catches a corrupt or truncated file, not a forged one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Tuple

from sdmme.settings import Group, Setting

if TYPE_CHECKING:
    import torch

FOLDER = "compile"  # <model>/1/compile/
SUFFIX = ".torchcache"  # torch.compiler.save_cache_artifacts' bytes
log = logging.getLogger("sdmme")
MODES = ("none", "default", "reduce-overhead", "max-autotune")
SETTINGS = Group(
    "compile",
    (
        Setting(
            "compile",
            MODES,
            "none",
            "torch.compile the UNet at load, warmed up there: a minute or more of cold start. "
            "reduce-overhead (CUDA graphs) is the fastest on GPU.",
        ),
    ),
)


def apply(pipeline, settings) -> str:
    """Compiles the UNet in place when the settings say so (pipeline.unet stays a UNet2DConditionModel:
    the pipeline still reads its config); the mode, for the log."""
    if settings.compile != "none":
        pipeline.unet.compile(mode=None if settings.compile == "default" else settings.compile)
    return settings.compile


def key(device: torch.device, mode: str) -> Dict[str, str]:
    """What compiled code is valid for: the accelerator, the compiler stack, the compile mode."""
    import diffusers
    import torch  # here, not above: make package and make models list artifacts without torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device.index if device.index is not None else 0)
        accelerator = f"{props.name} (sm_{props.major}{props.minor})"
    else:  # inductor's C++ targets the host's vector ISA
        accelerator = f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return {
        "device": accelerator,
        "torch": torch.__version__,
        "triton": triton,
        "diffusers": diffusers.__version__,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "mode": mode,
    }


def records(model_folder: Path) -> List[Tuple[Path, dict]]:
    """The model's artifacts: (the artifact's file, its record), unreadable records left out (logged)."""
    found = []
    for path in sorted((model_folder / "1" / FOLDER).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            found.append((path.with_suffix(SUFFIX), record))
        except (OSError, ValueError) as e:
            log.warning("compile artifact record %s is unreadable (%s): left out", path, e)
    return found


def _differences(want: Dict[str, str], have: Dict[str, str]) -> str:
    return ", ".join(f"{k} {have.get(k)!r} (here {v!r})" for k, v in want.items() if have.get(k) != v)


def load(model_folder: Path, device: torch.device, mode: str, label: str) -> bool:
    """Loads the artifact made for this machine and mode into torch's caches; False (and a log line
    saying why) when there is none or it cannot be used: the model then compiles as it would without."""
    import torch

    want = key(device, mode)
    found = records(model_folder)
    if not found:
        log.info(
            "%s: no compile artifacts in %s: compiling (make compile-cache builds them)",
            label,
            model_folder / "1" / FOLDER,
        )
        return False
    for path, record in found:
        if record.get("key") != want:
            continue
        start = time.perf_counter()
        try:
            data = path.read_bytes()
            if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
                raise ValueError(f"{len(data)} bytes that do not match its record (truncated or corrupt)")
            if torch.compiler.load_cache_artifacts(data) is None:  # torch logs why, and loads nothing
                raise ValueError("torch could not read it")
        except Exception as e:  # a corrupt artifact must never fail the load
            log.warning(
                "%s: compile artifact %s cannot be used (%s: %s): compiling",
                label,
                path.name,
                type(e).__name__,
                e,
            )
            return False
        log.info(
            "%s: compile artifact %s loaded in %.2fs (%.1f MB; shapes %s)",
            label,
            path.name,
            time.perf_counter() - start,
            len(data) / 1e6,
            record.get("shapes"),
        )
        return True
    nearest = min(found, key=lambda item: len(_differences(want, item[1].get("key", {}))))
    log.info(
        "%s: no compile artifact for this machine: %s has %s: compiling",
        label,
        nearest[0].name,
        _differences(want, nearest[1].get("key", {})),
    )
    return False


def compiled_graphs() -> Dict[str, int]:
    """Graphs this process compiled and took from a cache so far (inductor's counters)."""
    from torch._dynamo.utils import counters

    return {
        "compiled": counters["inductor"]["fxgraph_cache_miss"],
        "from cache": counters["inductor"]["fxgraph_cache_hit"],
    }


def log_new_graphs(label: str, seen: int, what: str) -> int:
    """Says when the call just run compiled graphs (a size or batch compiled for the first time: later
    calls of it reuse them); returns the count of compiled graphs now."""
    compiled = compiled_graphs()["compiled"]
    if compiled > seen:
        log.info(
            "%s: compiled %d new graph(s) for %s; later calls of that shape reuse them",
            label,
            compiled - seen,
            what,
        )
    return compiled


def summary(model_folder: Path) -> List[Dict[str, str]]:
    """The model's artifacts, a line each for make models: mode, device, torch."""
    return [
        {"mode": r["key"]["mode"], "device": r["key"]["device"], "torch": r["key"]["torch"]}
        for _, r in records(model_folder)
        if "key" in r
    ]
