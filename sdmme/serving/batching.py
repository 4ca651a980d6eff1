"""From requests to pipeline calls: decode and check each request, group compatible ones, run each group
and say how each ended.

Kept free of Triton imports: inputs arrive as a name -> numpy array mapping (None when absent).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
from PIL import Image

from sdmme.pipeline.runner import Interrupted
from sdmme.serving import images, recovery
from sdmme.serving.outcomes import Failure, Status, classify
from sdmme.spec import MAX_GEN_ARGS_CHARS, MAX_PROMPT_CHARS, InvalidInput, ModelSpec, show

log = logging.getLogger("sdmme")
MAX_IMAGES_PER_CALL = 8  # one pipeline call generates at most this many images
POST_PROCESSING_ARGS = ("seed", "num_images_per_prompt", "output_format", "quality")


@dataclass
class Job:
    """One request, checked and resolved: everything a pipeline call needs."""

    index: int  # position of the request in the execute() call
    prompt: str
    negative_prompt: str
    images: Dict[str, Any]  # input name -> PIL image
    args: Dict[str, Any]  # complete and validated gen_args, sizes resolved
    seeds: List[int]  # one per image
    size: Tuple[int, int]  # width and height of its images
    warnings: List[str] = field(default_factory=list)  # told to the caller (output `warnings`) and logged
    deadline: float = math.inf  # time.monotonic() by which the caller stops waiting
    cancelled: Callable[[], bool] = lambda: False  # the caller gave up (asked only before responding)
    started: Optional[float] = None  # time.monotonic() when its pipeline call started (None: never ran)
    pipeline_s: float = 0.0  # seconds its pipeline call took (to its end or its failure)
    group_size: int = 0  # requests in that call

    def gone(self) -> bool:
        return self.why_gone() is not None

    def why_gone(self) -> Optional[str]:
        """too_late (its deadline passed), cancelled (its caller gave up), or None (still wanted)."""
        if time.monotonic() > self.deadline:
            return "too_late"
        return "cancelled" if self.cancelled() else None

    def group_key(self) -> tuple:
        """Jobs with equal keys can share one pipeline call."""
        sizes = tuple((name, image.size) for name, image in sorted(self.images.items()))
        return tuple(sorted((k, v) for k, v in self.args.items() if k not in POST_PROCESSING_ARGS)) + sizes


def _text(name: str, array: Optional[np.ndarray], required: bool = False) -> Optional[str]:
    if array is None:
        if required:
            raise InvalidInput(f"input {name} is required")
        return None
    if array.size != 1:
        raise InvalidInput(
            f"input {name} must hold one element (shape [1, 1]), got shape {list(array.shape)}; send one "
            "prompt per request: concurrent requests are batched by the server"
        )
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"input {name} is not valid UTF-8") from None
    return str(value)


def _prompt(name: str, array: Optional[np.ndarray], required: bool = False) -> str:
    text = _text(name, array, required) or ""
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidInput(
            f"{name} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted (the text encoder "
            "reads the first 77 tokens, about 300 characters)"
        )
    return text


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({show(k, 40) for k in keys if keys.count(k) > 1})
    if repeated:
        raise InvalidInput(f"gen_args names {', '.join(repeated)} more than once")
    return dict(pairs)


def _gen_args(text: Optional[str]) -> Dict[str, Any]:
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_GEN_ARGS_CHARS:
        raise InvalidInput(f"gen_args has {len(text)} characters; at most {MAX_GEN_ARGS_CHARS} are accepted")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"gen_args is not valid JSON ({e})") from None
    except RecursionError:
        raise InvalidInput("gen_args is not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"gen_args must be a JSON object, got {type(value).__name__}")
    return value


def output_size(spec: ModelSpec, args: Dict[str, Any], decoded: Dict[str, Any]) -> Tuple[int, int]:
    """Width and height of the images a request will get."""
    if args.get("height"):
        return args["width"], args["height"]
    width, height = decoded["image"].size
    return width * spec.output_scale, height * spec.output_scale


def parse(spec: ModelSpec, index: int, inputs: Mapping[str, Optional[np.ndarray]], min_side: int) -> Job:
    """Decode and check one request; `min_side` is the smallest image side the loaded model handles."""
    prompt = _prompt("prompt", inputs.get("prompt"), required=True)
    negative = _prompt("negative_prompt", inputs.get("negative_prompt"))
    args = spec.validate_args(_gen_args(_text("gen_args", inputs.get("gen_args"))))
    decoded = {}
    for name in spec.image_inputs:
        mode = "L" if name == "mask_image" else "RGB"
        text = _text(name, inputs.get(name), required=True)
        decoded[name] = images.decode(name, text, spec.max_image_pixels, min_side, mode)
    if "mask_image" in decoded and decoded["mask_image"].size != decoded["image"].size:
        raise InvalidInput(
            "mask_image must have the size of image: got mask {}x{} for image {}x{}".format(
                *decoded["mask_image"].size, *decoded["image"].size
            )
        )
    if "height" in args and "image" in decoded:
        width, height = decoded["image"].size
        args["height"] = args["height"] or height
        args["width"] = args["width"] or width
    width, height = output_size(spec, args, decoded)
    limit = images.MAX_SIDE[args["output_format"]]
    if max(width, height) > limit:
        raise InvalidInput(
            f"the output would be {width}x{height} and output_format {args['output_format']} encodes at most "
            f"{limit} pixels a side; use output_format png or jpeg"
        )
    seed = args["seed"] if args["seed"] is not None else secrets.randbelow(2**32)
    seeds = [(seed + i) % 2**32 for i in range(args["num_images_per_prompt"])]
    return Job(index, prompt, negative, decoded, args, seeds, (width, height))


def plan(jobs: List[Job], max_images: int = MAX_IMAGES_PER_CALL) -> List[List[Job]]:
    """Group jobs by key (first-come order kept), splitting groups so a call makes <= max_images."""
    groups: Dict[tuple, List[List[Job]]] = {}
    for job in jobs:
        chunks = groups.setdefault(job.group_key(), [[]])
        if sum(len(j.seeds) for j in chunks[-1]) + len(job.seeds) > max_images:
            chunks.append([])
        chunks[-1].append(job)
    return [chunk for chunks in groups.values() for chunk in chunks]


def _gone(jobs: List[Job], message: str) -> Iterator[Tuple[List[Job], Failure]]:
    """Callers who gave up, or whose deadline passed, each told why."""
    for reason in ("too_late", "cancelled"):
        these = [job for job in jobs if (job.why_gone() or "cancelled") == reason]
        if these:
            yield these, Failure(reason, Status.CANCELLED, message)


def execute(
    runner, jobs: List[Job], label: str = "", cost=None
) -> Iterator[Tuple[List[Job], Union[List[List[Any]], Failure]]]:
    """Run every group; yields (group, images per job) or (group, the Failure that ended it alone), each
    group as soon as it is done.

    Requests whose callers are gone are dropped before their group runs, and a call stops between
    denoising steps once every request in it is gone. With `cost` (sdmme.serving.budget.CostModel: the
    seconds a group takes at the best speed seen, updated by every call), a group that cannot finish by
    its requests' deadline is answered at once instead of run. A group that runs out of memory is split
    in halves, which are retried, before anyone fails: only a request that does not fit on its own gets
    the out-of-memory error. Memory is freed after a failure. A sticky device error fails every group
    left without running it: nothing can run on that device again.
    """
    pending = plan(jobs)
    while pending:
        group = pending.pop(0)
        gone = [job for job in group if job.gone()]
        if gone:
            yield from _gone(gone, "the caller gave up before the request started")
            group = [job for job in group if job not in gone]
            if not group:
                continue
        start = time.monotonic()
        if cost is not None and start + cost.seconds(group) > min(job.deadline for job in group):
            message = f"the server is busy: it could not start this request in time ({label})"
            yield group, Failure("busy", Status.UNAVAILABLE, message)
            continue
        for job in group:
            job.started, job.group_size = start, len(group)
        try:
            try:
                results = run(runner, group, should_stop=_all_gone(group))
            finally:
                for job in group:
                    job.pipeline_s = time.monotonic() - start
        except Interrupted:
            log.info("%s: stopped a call of %d request(s): every caller gave up", label, len(group))
            yield from _gone(group, "the caller gave up; the call was stopped")
            continue
        except InvalidInput as e:  # found only when the group ran (an unknown adapter): theirs, no trace
            log.info("%s: %d request(s) refused: %s", label, len(group), e)
            yield group, classify(e, runner.is_out_of_memory)
            continue
        except Exception as e:  # one failed group must not fail the others
            if recovery.is_sticky(e):  # nothing can run on this device any more: fail fast, no cleanup
                trace = traceback.format_exc()
                log.error("%s: a call of %d request(s) broke the device:\n%s", label, len(group), trace)
                fault = f"{type(e).__name__}: {e}"
                message = f"{label} is being reloaded after a device fault ({fault}); retry in a few seconds"
                for rest in [group, *pending]:
                    yield rest, Failure("unavailable", Status.UNAVAILABLE, message, broken=fault)
                return
            runner.free_memory()
            if runner.is_out_of_memory(e) and len(group) > 1:
                half = len(group) // 2
                log.warning("%s: out of memory with %d request(s); retrying as two halves", label, len(group))
                pending[:0] = [group[:half], group[half:]]
                continue
            log.error("%s: batch of %d request(s) failed:\n%s", label, len(group), traceback.format_exc())
            yield group, classify(e, runner.is_out_of_memory)
            continue
        seconds = time.monotonic() - start
        if cost is not None:
            cost.observe(group, seconds)
        log.info(
            "%s: %d request(s), %d image(s) in one call, %.2fs",
            label,
            len(group),
            sum(len(j.seeds) for j in group),
            seconds,
        )
        yield group, results


def _all_gone(group: List[Job]) -> Callable[[], bool]:
    return lambda: all(job.gone() for job in group)


def steps_run(args: Dict[str, Any]) -> int:
    """Denoising steps a call runs: img2img pipelines run the last steps x strength of the schedule."""
    steps = args["num_inference_steps"]
    if "strength" in args:
        return max(1, int(steps * args["strength"]))
    return steps


def default_side(spec: ModelSpec) -> int:
    """The side of the model's usual request: 512 pixels out, or for the upscaler 128 in (512 out)."""
    return 128 if spec.name == "sd_upscale" else 512


def warmup_job(spec: ModelSpec, side: Optional[int] = None, steps: int = 2, seed: int = 0) -> Job:
    """A request at the model's defaults that runs `steps` denoising steps, at `side` pixels (the input
    side for image models; default: default_side): compiles kernels at load, times the model."""
    args = spec.validate_args({"seed": seed})
    side = side or default_side(spec)
    inputs = {
        name: Image.new("L" if name == "mask_image" else "RGB", (side, side), 128)
        for name in spec.image_inputs
    }
    if "height" in args:
        args.update(height=side, width=side)
    args["num_inference_steps"] = math.ceil(
        steps / args.get("strength", 1.0)
    )  # img2img runs steps x strength
    return Job(0, "", "", inputs, args, [seed], output_size(spec, args, inputs))


def run(runner, group: List[Job], should_stop: Optional[Callable[[], bool]] = None) -> List[List[Any]]:
    """One pipeline call for the group; returns each job's images in order.

    `should_stop` is asked between denoising steps; when it says so the call raises Interrupted.
    """
    expand = [(job, seed) for job in group for seed in job.seeds]
    outputs = runner(
        group[0].args,
        prompts=[job.prompt for job, _ in expand],
        negative_prompts=[job.negative_prompt for job, _ in expand],
        seeds=[seed for _, seed in expand],
        images={name: [job.images[name] for job, _ in expand] for name in group[0].images},
        should_stop=should_stop,
    )
    per_job, start = [], 0
    for job in group:
        per_job.append(outputs[start : start + len(job.seeds)])
        start += len(job.seeds)
    return per_job
