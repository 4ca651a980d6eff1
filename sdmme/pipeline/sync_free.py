"""A denoising loop that never waits for the GPU: diffusers' own schedulers, with their bookkeeping on
the host.

diffusers' pipelines hand the scheduler the timestep the UNet got, a 0-d tensor on the GPU. PNDM (SD 2's
default) and DDIM then index host tables with it and test `prev_timestep >= 0`; Euler and DPM++ look it
up with `nonzero().item()` on the first step; UniPC copies host scalars to the GPU and solves on it with
an error check; Euler ancestral draws its noise with the host generators and copies it over. Each of
these makes the host wait until the GPU has finished every step queued so far, so the host cannot queue
step n+1 while the GPU runs step n.

`HostScheduler` wraps one scheduler with one behaviour each, none of them a copy of a scheduler's code:
- host bookkeeping (always): the scheduler's tables and timesteps stay on the host and it is given the
  host timestep of the step it runs, by position, as its own `step_index` already works; the loop (and so
  the UNet) gets a device copy uploaded once per call;
- `NoWaitUploads`: host tensors a step sends to the device go without waiting for the queue (pinned
  memory; a 0-d value becomes a kernel argument);
- `UncheckedSolves`: `torch.linalg.solve` without its error read-back (UniPC's matrices are Vandermonde
  matrices of distinct nodes: never singular).
The arithmetic is diffusers' own on the same values, so images are the same bytes (tests/test_sync_free.py
checks every scheduler against the upstream class and, with a tensor that fails on any host read, that
no step reads the device).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable, Dict, Iterator, Tuple

import torch
from torch.overrides import TorchFunctionMode

from sdmme.settings import Group, Setting

log = logging.getLogger("sdmme")

# On for CPU, where it changes nothing but is what every CPU test runs through.
SETTINGS = Group(
    "sync-free loop",
    (
        Setting(
            "sync_free",
            bool,
            False,
            "Scheduler bookkeeping on the host, so the denoising loop never waits for the GPU; same images. "
            "Off on GPU until make bench-gpu has measured it.",
            cpu=True,
        ),
    ),
)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device`, queued without waiting for the work already queued there."""
    if device.type != "cuda":
        return host.to(device, non_blocking=True)
    if host.dim() == 0:  # a kernel argument read on the host, no copy at all
        return torch.full((), host.item(), dtype=host.dtype, device=device)
    return host.pin_memory().to(device, non_blocking=True)  # the pinned block lives until the copy ran


class NoWaitUploads(TorchFunctionMode):
    """`tensor.to(device)` of a host tensor becomes `upload()`; everything else runs as called."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device is not None and device != args[0].device and memory_format is None:
                host = args[0] if dtype is None else args[0].to(dtype)
                return upload(host, device)
        return func(*args, **kwargs)


class UncheckedSolves(TorchFunctionMode):
    """`torch.linalg.solve` as `solve_ex` without the error check, which reads the result's info back."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linalg.solve:
            return torch.linalg.solve_ex(*args, **kwargs, check_errors=False).result
        return func(*args, **kwargs)


# The behaviours each offered scheduler needs beyond host bookkeeping (diffusers 0.42; the test fails
# when a diffusers release needs another).
BEHAVIOURS: Dict[str, Tuple[type, ...]] = {
    "DDIMScheduler": (),
    "PNDMScheduler": (),
    "EulerDiscreteScheduler": (),
    "EulerAncestralDiscreteScheduler": (NoWaitUploads,),
    "DPMSolverMultistepScheduler": (),
    "UniPCMultistepScheduler": (NoWaitUploads, UncheckedSolves),
}


class HostScheduler:
    """A scheduler whose step never reads the device; the pipeline sees the scheduler it wraps."""

    def __init__(self, inner):
        self.inner = inner
        self.behaviours = BEHAVIOURS[type(inner).__name__]
        self.timesteps = None  # the loop's: the host timesteps' device copy
        self._position = 0  # the step the loop runs next

        # diffusers reads step's signature (inspect) to decide whether to pass eta and generator
        @functools.wraps(inner.step)
        def step(model_output, timestep, sample, *args, **kwargs):
            with self._modes():
                result = inner.step(model_output, self._host_timestep(), sample, *args, **kwargs)
            self._position += 1
            return result

        self.step = step

    @staticmethod
    def supports(scheduler) -> bool:
        return type(scheduler).__name__ in BEHAVIOURS

    def __getattr__(self, name):  # config, order, init_noise_sigma, add_noise, ...: the scheduler's own
        if name == "inner":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def set_timesteps(self, num_inference_steps: int, device=None, **kwargs) -> None:
        self.inner.set_timesteps(num_inference_steps, device="cpu", **kwargs)
        self.timesteps = upload(self.inner.timesteps, torch.device(device or "cpu"))
        self._position = 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where an image-to-image loop starts; offered also for schedulers without it (PNDM, DDIM)."""
        self._position = begin_index
        if hasattr(self.inner, "set_begin_index"):
            self.inner.set_begin_index(begin_index)

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        with self._modes():
            return self.inner.scale_model_input(sample, self._host_timestep())

    def _host_timestep(self) -> torch.Tensor:
        return self.inner.timesteps[self._position]

    def _modes(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for mode in self.behaviours:
            stack.enter_context(mode())
        return stack


def host_bookkeeping(scheduler):
    """`scheduler` wrapped to run sync-free, or as it is (with a log line) when it is not one known to."""
    if isinstance(scheduler, HostScheduler):
        return scheduler
    if not HostScheduler.supports(scheduler):
        log.info(
            "%s is not one of the schedulers known to run without host syncs (%s): it runs as diffusers "
            "wrote it, waiting for the GPU where it reads it",
            type(scheduler).__name__,
            ", ".join(BEHAVIOURS),
        )
        return scheduler
    return HostScheduler(scheduler)


@contextlib.contextmanager
def during_loop(pipeline, scheduler, enter: Callable[[], None], leave: Callable[[], None]) -> Iterator[None]:
    """Calls `enter` as each step of the denoising loop starts (`scheduler.scale_model_input`, the UNet
    call) and `leave` when the VAE decodes the loop's result: the span a check of the loop (no host
    syncs) covers, and nothing before or after it. `scheduler` is the one the call will run."""
    scale_model_input = scheduler.scale_model_input

    def entering(*args, **kwargs):
        enter()
        return scale_model_input(*args, **kwargs)

    scheduler.scale_model_input = entering
    hooks = [
        pipeline.unet.register_forward_pre_hook(lambda module, args: enter()),
        pipeline.vae.decoder.register_forward_pre_hook(lambda module, args: leave()),
    ]
    try:
        yield
    finally:
        leave()
        del scheduler.scale_model_input  # the class's own again
        for hook in hooks:
            hook.remove()
