"""The sync-free denoising loop (sdmme.pipeline.sync_free), on CPU, for every scheduler gen_args offers and
every model: the same bytes as diffusers' own schedulers, and no read of the device from the host.

There is no GPU here, so "the device" is emulated: the timesteps the loop iterates are a `Device`
tensor, and so is everything computed from them (the UNet's output, then the latents); a `Device`
tensor says it is on `cpu:0` (THE_DEVICE), which the host's tensors (`cpu`) are not. `HostReads`
fails the run at anything inside the loop that, on a GPU, would make the host wait for the device: a
`Device` tensor read on the host (`item`, `bool`, `int`, `float`, `index`, `tolist`, `numpy`, `cpu`,
printing), an op whose output size depends on device data (`nonzero`, boolean masks), a host table
indexed with a device tensor, a linalg call that checks its result, and a host tensor sent to the
device with a blocking copy. diffusers' own schedulers fail it (each is shown to), so it can fail; on a
GPU, `make bench-gpu` checks the same span with `torch.cuda.set_sync_debug_mode`.
"""

import pytest
import torch
from helpers import load_pipeline
from torch.overrides import TorchFunctionMode

from sdmme.pipeline import sync_free
from sdmme.pipeline.runner import Runner
from sdmme.serving import batching
from sdmme.settings import Settings
from sdmme.spec import MODELS, SCHEDULERS
from sdmme.tools import weights

CPU = torch.device("cpu")
THE_DEVICE = torch.device("cpu", 0)  # CPU memory, but not the host's `cpu`: code that sends to it uploads


class Device(torch.Tensor):
    """A tensor that lives on "the device": results of ops on it are too (torch's subclass rules)."""

    @property
    def device(self):
        return THE_DEVICE


READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.argwhere,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.unique,
    torch.Tensor.unique,
    torch.unique_consecutive,
    torch.equal,
    torch.allclose,
    torch.is_nonzero,
    torch.linalg.solve,
    torch.linalg.inv,
    torch.linalg.cholesky,
    torch.inverse,
    torch.Tensor.repeat_interleave,
}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class HostReads(TorchFunctionMode):
    """Records, while `active`, every call that would make the host wait for the device."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            why = self.why(func, args, kwargs)
            if why:
                self.found.append(f"{getattr(func, '__qualname__', func)}: {why}")
        return func(*args, **kwargs)

    @staticmethod
    def why(func, args, kwargs):
        on_device = any(isinstance(t, Device) for t in _tensors(list(args) + list(kwargs.values())))
        if func in READS and on_device:
            return "reads device data on the host"
        if func is torch.linalg.solve_ex and on_device and kwargs.get("check_errors", False):
            return "checks its result on the host"
        if func is torch.Tensor.__getitem__ and not isinstance(args[0], Device):
            if any(isinstance(t, Device) for t in _tensors(args[1])):
                return "indexes a host tensor with a device tensor"
        if func is torch.Tensor.__getitem__ and any(
            isinstance(t, Device) and t.dtype == torch.bool for t in _tensors(args[1])
        ):
            return "indexes with a device mask (its size is read back)"
        if func is torch.Tensor.to and not isinstance(args[0], Device):
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            if device == THE_DEVICE and not non_blocking:
                return "sends a host tensor to the device and waits for the copy"
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") == THE_DEVICE:
            return "sends host data to the device and waits for the copy"
        return None


def on_device(scheduler):
    """The timesteps `scheduler.set_timesteps` gives the loop become device tensors."""
    set_timesteps = scheduler.set_timesteps

    def wrapped(*args, **kwargs):
        set_timesteps(*args, **kwargs)
        scheduler.timesteps = scheduler.timesteps.as_subclass(Device)

    scheduler.set_timesteps = wrapped
    return scheduler


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync-free")
    loaded = {}
    for model in MODELS:
        folder = weights.fill(root, model, "tiny")
        loaded[model] = load_pipeline(MODELS[model], folder, CPU, Settings("CPU"))
    return loaded


def request(model: str, scheduler: str, steps: int = 5) -> batching.Job:
    """The smallest request with enough steps for every multistep scheduler's history (PNDM: 4)."""
    job = batching.warmup_job(MODELS[model], 32 if model == "sd_upscale" else 64, steps, seed=7)
    job.prompt = "a lighthouse at dawn"
    job.args["scheduler"] = scheduler
    return job


def run(pipeline, job, sync_free_loop: bool, detector=None):
    own = pipeline.scheduler  # a Runner sets the one a call asks for; the next Runner must start from this
    try:
        return _run(pipeline, job, sync_free_loop, detector)
    finally:
        pipeline.scheduler = own


def _run(pipeline, job, sync_free_loop: bool, detector):
    runner = Runner(pipeline, sync_free=sync_free_loop)
    scheduler = runner.scheduler(job.args["scheduler"])
    if detector is None:
        [[image]] = batching.run(runner, [job])
        return image
    on_device(scheduler)

    def enter():
        detector.active = True

    def leave():
        detector.active = False

    try:
        with sync_free.during_loop(pipeline, scheduler, enter, leave), detector:
            [[image]] = batching.run(runner, [job])
    finally:
        del scheduler.set_timesteps  # back to the class's own
        if isinstance(scheduler, sync_free.HostScheduler):
            scheduler.timesteps = None
    return image


@pytest.mark.parametrize("model", sorted(MODELS))
def test_same_images_as_diffusers_own_schedulers(pipes, model):
    for scheduler in SCHEDULERS:
        job = request(model, scheduler)
        upstream = run(pipes[model], job, sync_free_loop=False)
        ours = run(pipes[model], job, sync_free_loop=True)
        assert ours.tobytes() == upstream.tobytes(), f"{model}, scheduler {scheduler}: images differ"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_no_step_reads_the_device(pipes, model):
    for scheduler in SCHEDULERS:
        detector = HostReads()
        run(pipes[model], request(model, scheduler), sync_free_loop=True, detector=detector)
        assert detector.found == [], f"{model}, scheduler {scheduler}: the loop waits for the device"


def test_diffusers_own_schedulers_read_the_device(pipes):
    """The check can fail: each upstream scheduler, as diffusers wrote it, is caught."""
    caught = {}
    for scheduler in SCHEDULERS[1:]:  # default is one of them (PNDM)
        detector = HostReads()
        run(pipes["sd_base"], request("sd_base", scheduler), sync_free_loop=False, detector=detector)
        caught[scheduler] = sorted(set(detector.found))
    assert all(caught.values()), {name: found for name, found in caught.items() if not found}
    assert any("reads device data" in why for why in caught["pndm"])  # prev_timestep >= 0
    assert any("indexes a host tensor" in why for why in caught["ddim"])  # alphas_cumprod[t]
    assert any("sends a host tensor" in why for why in caught["unipc"])  # sigmas[i].to(device)


def test_detector_sees_each_kind_of_host_read():
    detector = HostReads()
    x = torch.arange(4.0).as_subclass(Device)
    table = torch.arange(10.0)
    detector.active = True
    with detector:
        float(x.sum())
        x.nonzero()
        table[x[1].long()]
        torch.ones(3).to(CPU)  # host to host: fine
        torch.ones(3).to(x.device)
        torch.ones(3).to(x.device, non_blocking=True)  # an upload that does not wait: fine
        torch.linalg.solve(torch.eye(2).as_subclass(Device), x[:2])
    assert [why.split(": ")[1] for why in detector.found] == [
        "reads device data on the host",
        "reads device data on the host",
        "indexes a host tensor with a device tensor",
        "sends a host tensor to the device and waits for the copy",
        "reads device data on the host",
    ]


def test_every_offered_scheduler_runs_sync_free(pipes):
    """No scheduler gen_args offers falls back to diffusers' loop: each is one HostScheduler knows."""
    runner = Runner(pipes["sd_base"], sync_free=True)
    for name in SCHEDULERS:
        assert isinstance(runner.scheduler(name), sync_free.HostScheduler), name
    assert not isinstance(Runner(pipes["sd_base"]).scheduler("ddim"), sync_free.HostScheduler)


def test_a_scheduler_it_does_not_know_runs_as_diffusers_wrote_it(pipes, caplog):
    import diffusers

    heun = diffusers.HeunDiscreteScheduler.from_config(pipes["sd_base"].scheduler.config)
    with caplog.at_level("INFO", logger="sdmme"):
        assert sync_free.host_bookkeeping(heun) is heun
    assert "HeunDiscreteScheduler is not one of the schedulers known to run without host syncs" in caplog.text


def test_uploads_do_not_wait_and_solves_do_not_check():
    detector = HostReads()
    detector.active = True
    with detector, sync_free.NoWaitUploads():
        moved = torch.ones(3).to(THE_DEVICE, torch.float16)
    assert moved.dtype == torch.float16 and detector.found == []
    singular = torch.zeros(2, 2)
    with pytest.raises(RuntimeError):
        torch.linalg.solve(singular, torch.ones(2))
    with sync_free.UncheckedSolves():
        result = torch.linalg.solve(singular, torch.ones(2))  # no error read back: inf/nan, not a raise
    assert result.shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; make bench-gpu checks the same")
def test_no_host_sync_on_a_gpu(tmp_path):
    device = torch.device("cuda")
    folder = weights.fill(tmp_path, "sd_base", "tiny")
    pipeline = load_pipeline(MODELS["sd_base"], folder, device, Settings(sync_free=True))
    runner = Runner(pipeline, sync_free=True)
    for name in SCHEDULERS:
        with sync_free.during_loop(
            pipeline,
            runner.scheduler(name),
            lambda: torch.cuda.set_sync_debug_mode("error"),
            lambda: torch.cuda.set_sync_debug_mode(0),
        ):
            batching.run(runner, [request("sd_base", name)])
