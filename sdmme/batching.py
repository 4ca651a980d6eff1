"""From Triton requests to pipeline calls: decode and check each request, then group compatible ones.

Kept free of Triton imports: inputs arrive as a name -> numpy array mapping (None when absent).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import traceback
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
from PIL import Image

from sdmme import images
from sdmme.spec import InvalidInput, ModelSpec

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


def _gen_args(text: Optional[str]) -> Dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"gen_args is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"gen_args must be a JSON object, got {type(value).__name__}")
    return value


def parse(spec: ModelSpec, index: int, inputs: Mapping[str, Optional[np.ndarray]]) -> Job:
    prompt = _text("prompt", inputs.get("prompt"), required=True)
    negative = _text("negative_prompt", inputs.get("negative_prompt")) or ""
    args = spec.validate_args(_gen_args(_text("gen_args", inputs.get("gen_args"))))
    decoded = {}
    for name in spec.image_inputs:
        mode = "L" if name == "mask_image" else "RGB"
        decoded[name] = images.decode(
            name, _text(name, inputs.get(name), required=True), spec.max_image_pixels, mode
        )
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
    seed = args["seed"] if args["seed"] is not None else secrets.randbelow(2**32)
    seeds = [(seed + i) % 2**32 for i in range(args["num_images_per_prompt"])]
    return Job(index, prompt, negative, decoded, args, seeds)


def plan(jobs: List[Job], max_images: int = MAX_IMAGES_PER_CALL) -> List[List[Job]]:
    """Group jobs by key (first-come order kept), splitting groups so a call makes <= max_images."""
    groups: Dict[tuple, List[List[Job]]] = {}
    for job in jobs:
        chunks = groups.setdefault(job.group_key(), [[]])
        if sum(len(j.seeds) for j in chunks[-1]) + len(job.seeds) > max_images:
            chunks.append([])
        chunks[-1].append(job)
    return [chunk for chunks in groups.values() for chunk in chunks]


def execute(
    runner, jobs: List[Job], label: str = ""
) -> Iterator[Tuple[List[Job], Union[List[List[Any]], Exception]]]:
    """Run every group; yields (group, images per job) or (group, the exception that failed it alone).

    A group that runs out of memory is split in halves, which are retried, before anyone fails: only a
    request that does not fit on its own gets the out-of-memory error. Memory is freed after a failure.
    """
    pending = plan(jobs)
    while pending:
        group = pending.pop(0)
        start = time.monotonic()
        try:
            results = run(runner, group)
        except Exception as e:  # one failed group must not fail the others
            runner.free_memory()
            if runner.is_out_of_memory(e) and len(group) > 1:
                half = len(group) // 2
                log.warning("%s: out of memory with %d request(s); retrying as two halves", label, len(group))
                pending[:0] = [group[:half], group[half:]]
                continue
            log.error("%s: batch of %d request(s) failed:\n%s", label, len(group), traceback.format_exc())
            yield group, e
            continue
        log.info(
            "%s: %d request(s), %d image(s) in one call, %.2fs",
            label,
            len(group),
            sum(len(j.seeds) for j in group),
            time.monotonic() - start,
        )
        yield group, results


def warmup_job(spec: ModelSpec) -> Job:
    """A request at the model's defaults (2 steps), to compile kernels at load instead of on a caller."""
    args = spec.validate_args({"num_inference_steps": 2, "seed": 0})
    side = 128 if spec.name == "sd_upscale" else 512
    inputs = {
        name: Image.new("L" if name == "mask_image" else "RGB", (side, side), 128)
        for name in spec.image_inputs
    }
    if inputs and "height" in args:
        args["height"] = args["height"] or side
        args["width"] = args["width"] or side
    if "strength" in args:
        args["num_inference_steps"] = max(2, math.ceil(2 / args["strength"]))
    return Job(0, "", "", inputs, args, [0])


def run(runner, group: List[Job]) -> List[List[Any]]:
    """One pipeline call for the group; returns each job's images in order."""
    expand = [(job, seed) for job in group for seed in job.seeds]
    outputs = runner(
        group[0].args,
        prompts=[job.prompt for job, _ in expand],
        negative_prompts=[job.negative_prompt for job, _ in expand],
        seeds=[seed for _, seed in expand],
        images={name: [job.images[name] for job, _ in expand] for name in group[0].images},
    )
    per_job, start = [], 0
    for job in group:
        per_job.append(outputs[start : start + len(job.seeds)])
        start += len(job.seeds)
    return per_job
