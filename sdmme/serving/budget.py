"""How long a request takes on this instance, measured, against the time an invocation has.

SageMaker cuts an invocation at 60 s. A request whose own work cannot finish within the model's budget
is refused up front, saying what to lower, instead of running into that cut; a group that could not
finish in time after waiting is answered at once.

The cost is one rate, seconds per unit of work (an image's megapixels times its denoising steps plus
one, the text encoder and VAE counting about one step), measured at load and then on every call the
model runs, keeping the best: a request is refused only when it could not finish even at the best
speed seen, so that a measurement slowed down by other work (models loading beside it) never refuses
a request the instance can serve.
"""

from __future__ import annotations

import logging
import time
from typing import List

from sdmme.serving import batching
from sdmme.settings import Group, Setting
from sdmme.spec import InvalidInput, ModelSpec

log = logging.getLogger("sdmme")

# No time budget on CPU: a CPU serves tests and development, not SageMaker's 60 s (a model's config.pbtxt
# can set one).
SETTINGS = Group(
    "time budget",
    (
        Setting(
            "time_budget_s",
            float,
            30.0,
            "Refuse up front a request whose time, measured at load, exceeds this; with the queue's 30 s, "
            "SageMaker's 60 s. 0: no limit.",
            "seconds",
            cpu=0.0,
        ),
    ),
)


def work(spec: ModelSpec, job: batching.Job) -> float:
    """Units of work of a request: per image, the UNet's megapixels times (steps run + 1)."""
    width, height = job.size
    megapixels = width * height / spec.output_scale**2 / 1e6
    return len(job.seeds) * megapixels * (batching.steps_run(job.args) + 1)


class CostModel:
    def __init__(self, spec: ModelSpec, rate: float):
        self.spec = spec
        self.rate = rate  # seconds per unit of work, the best seen

    def seconds(self, jobs: List[batching.Job]) -> float:
        return self.rate * sum(work(self.spec, job) for job in jobs)

    def observe(self, jobs: List[batching.Job], seconds: float) -> None:
        units = sum(work(self.spec, job) for job in jobs)
        if units > 0:
            self.rate = min(self.rate, seconds / units)


def calibrate(runner, spec: ModelSpec) -> CostModel:
    """The faster of two 2-step calls at the model's default size, after a warm-up call."""
    job = batching.warmup_job(spec)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        batching.run(runner, [job])
        times.append(time.perf_counter() - start)
    cost = CostModel(spec, min(times[1:]) / work(spec, job))
    width, height = job.size
    log.info("%s: measured %.3fs per megapixel-step at %dx%d", spec.name, cost.rate, width, height)
    return cost


def check(cost: CostModel, budget: float, job: batching.Job) -> None:
    """Refuse a request that cannot finish within `budget` seconds even with the instance to itself."""
    seconds = cost.seconds([job])
    if seconds > budget:
        width, height = job.size
        steps = job.args["num_inference_steps"]
        raise InvalidInput(
            f"this request would take about {seconds:.0f}s on this instance ({len(job.seeds)} image(s), "
            f"{steps} steps, {width}x{height}) and must finish within {budget:.0f}s: "
            "lower num_inference_steps, the size or num_images_per_prompt"
        )
