"""The one way a model is loaded: device, settings from its parameters, weights, each concept's
settings applied, and the Runner that serves it.

The Triton model (sdmme.serving.core), `make compile-cache` and the benchmarks all load through `load`,
so what is measured and built is what serves: from a model folder's config.pbtxt parameters through
`prepare` (as Triton hands them; `load_model` reads them from the folder), or from settings already made
(the benchmarks compare several).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Optional, Tuple

import torch

from sdmme import model_folder
from sdmme.adapters import serving as adapters
from sdmme.pipeline import compile_artifacts, cuda_graphs, runner, speed
from sdmme.serving import batching, host_memory, recovery
from sdmme.settings import Settings
from sdmme.spec import MODELS, ModelSpec

log = logging.getLogger("sdmme")
Phase = Callable[[str], ContextManager]  # times one phase of the load (sdmme.serving.telemetry)


def no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


@dataclass
class Loaded:
    """A model ready to serve."""

    spec: ModelSpec
    device: torch.device
    settings: Settings
    runner: Any  # runner.Runner, wrapped by recovery's fault hook when tests ask for one
    from_artifacts: bool = False  # its compiled graphs came from a compile artifact

    @property
    def pipeline(self):
        return self.runner.pipeline


def device_for(instance_kind: str, device_id: str = "0") -> torch.device:
    """The GPU Triton assigned to this instance, or the CPU."""
    return torch.device(f"cuda:{device_id}") if instance_kind == "GPU" else torch.device("cpu")


def spec_of(kind: Optional[str], name: str) -> ModelSpec:
    """The spec of the kind a model's config.pbtxt declares."""
    if kind not in MODELS:
        raise ValueError(
            f"config.pbtxt of {name} must declare its kind, one of {', '.join(MODELS)}: "
            f'parameters: {{ key: "{model_folder.KIND_PARAMETER}" value: {{ string_value: "sd_base" }} }}'
            + (f" (it says {kind!r})" if kind is not None else "")
        )
    return MODELS[kind]


def prepare(
    parameters: Mapping[str, str], instance_kind: str = "CPU", device_id: str = "0", name: str = ""
) -> Tuple[ModelSpec, torch.device, Settings]:
    """A model's kind, device and settings from its config.pbtxt `parameters`, on the device of a Triton
    instance of `instance_kind` (GPU, CPU) with that kind's defaults."""
    spec = spec_of(parameters.get(model_folder.KIND_PARAMETER), name)
    return spec, device_for(instance_kind, device_id), Settings.from_parameters(parameters, instance_kind)


def load_model(folder: Path, instance_kind: str = "CPU", device_id: str = "0") -> Loaded:
    """The model in `folder` as its config.pbtxt says, as a Triton instance of `instance_kind` loads it."""
    parameters = model_folder.parameters_in((folder / model_folder.CONFIG).read_text())
    spec, device, settings = prepare(parameters, instance_kind, device_id, folder.name)
    return load(spec, folder, device, settings)


def load(
    spec: ModelSpec,
    folder: Path,
    device: torch.device,
    settings: Settings,
    name: Optional[str] = None,
    phase: Phase = no_phase,
    weights: Optional[Path] = None,
    use_artifacts: bool = True,
) -> Loaded:
    """The model of `spec` in `folder` (its weights, compile artifacts and adapters; `weights` elsewhere
    when given) on `device` with `settings`. A load that cannot fit in host memory is refused first.
    `use_artifacts` False leaves its compile artifacts unread (make compile-cache builds them afresh)."""
    name = name or folder.name
    weights = weights or model_folder.weights_dir(folder)
    dtype = speed.torch_dtype(settings, device)
    host_memory.check(name, weights, dtype, settings.host_memory_reserve_gib)
    from_artifacts = False
    if settings.compile != "none" and use_artifacts:  # before anything compiles: graphs come from them
        with phase("compile_cache"):
            from_artifacts = compile_artifacts.load(folder, device, settings.compile, name)
    with phase("weights"):
        pipeline = runner.load(spec, weights, device, dtype)
    with phase("to_device"):
        pipeline = pipeline.to(device)
    with phase("settings"):
        applied = speed.apply(pipeline, settings)
        applied["sync_free"] = settings.sync_free  # the Runner wraps the schedulers
        graphs = cuda_graphs.apply(pipeline, settings)
        if graphs is not None:
            applied["cuda_graphs"] = graphs
        applied["compile"] = compile_artifacts.apply(pipeline, settings)
    log.info(
        "%s: loaded %s on %s (%s, %s)",
        spec.name,
        spec.pipeline,
        device,
        str(dtype).replace("torch.", ""),
        ", ".join(f"{k}: {v}" for k, v in applied.items()),
    )
    served = adapters.for_model(folder, settings, pipeline)
    runs = recovery.with_fault_hook(runner.Runner(pipeline, served, settings.sync_free), name)
    loaded = Loaded(spec, device, settings, runs, from_artifacts)
    if settings.compile != "none":
        with phase("warmup"):
            warm = time.monotonic()
            batching.run(loaded.runner, [batching.warmup_job(spec)])
        graphs_now = compile_artifacts.compiled_graphs()
        log.info(
            "%s: compiled and warmed up in %.1fs (%d graph(s) from the compile cache, %d compiled)",
            name,
            time.monotonic() - warm,
            graphs_now["from cache"],
            graphs_now["compiled"],
        )
    return loaded
