"""Request parsing and grouping, without a server (the server tests cover the same through Triton)."""

import json
import time

import numpy as np
import pytest
import torch
from helpers import b64, picture
from PIL import Image

from sdmme.pipeline.runner import is_out_of_memory
from sdmme.serving import batching, budget, recovery
from sdmme.serving.outcomes import Failure
from sdmme.spec import MODELS, InvalidInput


def tensor(value) -> np.ndarray:
    return np.array([[value.encode() if isinstance(value, str) else value]], dtype=np.object_)


def job(index, prompt="p", model="sd_base", **gen_args):
    inputs = {"prompt": tensor(prompt), "gen_args": tensor(json.dumps(gen_args))}
    if model != "sd_base":
        inputs["image"] = tensor(b64(picture(64, 64)))
    return batching.parse(MODELS[model], index, inputs, min_side=16)


def test_parse_fills_defaults_and_seeds():
    j = job(0, seed=7, num_images_per_prompt=3)
    assert j.seeds == [7, 8, 9] and j.args["num_inference_steps"] == 50 and j.negative_prompt == ""
    assert len(job(0).seeds) == 1  # random seed when none given


def test_parse_rejects_batched_request():
    with pytest.raises(InvalidInput, match=r"shape \[1, 1\]\), got shape \[2, 1\]"):
        batching.parse(MODELS["sd_base"], 0, {"prompt": np.array([[b"a"], [b"b"]], dtype=np.object_)}, 16)


def test_inpaint_size_defaults_to_image_size():
    inputs = {
        "prompt": tensor("p"),
        "image": tensor(b64(picture(96, 72))),
        "mask_image": tensor(b64(picture(96, 72))),
    }
    parsed = batching.parse(MODELS["sd_inpaint"], 0, inputs, min_side=16)
    assert (parsed.args["width"], parsed.args["height"]) == (96, 72)
    assert parsed.images["mask_image"].mode == "L"


def test_plan_groups_compatible_and_caps_images():
    jobs = [
        job(0, seed=1),
        job(1, num_inference_steps=3),
        job(2, seed=2, output_format="png"),
        job(3, num_images_per_prompt=4),
        job(4, num_images_per_prompt=4),
    ]
    groups = [[j.index for j in g] for g in batching.plan(jobs, max_images=8)]
    # seed and output encoding do not split a group; steps do; 1 + 1 + 4 + 4 images > 8 splits the last
    assert groups == [[0, 2, 3], [4], [1]]


class FakeRunner:
    """Stands in for the pipeline (not for Triton): fails any call whose prompts include 'boom', and
    runs out of memory (as torch reports it) above `fits` images in one call."""

    def __init__(self, fits: int = 99):
        self.calls, self.fits, self.freed = [], fits, 0

    def __call__(self, args, prompts, negative_prompts, seeds, images, should_stop=None):
        self.calls.append(prompts)
        for _ in range(args["num_inference_steps"]):  # the denoising steps
            if should_stop is not None and should_stop():
                raise batching.Interrupted
        if "boom" in prompts:
            raise RuntimeError("exploded")
        if "fault" in prompts:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if len(seeds) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [Image.new("RGB", (8, 8), (seed % 256, 0, 0)) for seed in seeds]

    def free_memory(self):
        self.freed += 1

    is_out_of_memory = staticmethod(is_out_of_memory)


def test_execute_isolates_a_failing_group_and_splits_images_back():
    runner = FakeRunner()
    jobs = [
        job(0, "a", seed=1, num_images_per_prompt=2),
        job(1, "boom", num_inference_steps=3),
        job(2, "c", seed=5),
    ]
    outcomes = {tuple(j.index for j in g): r for g, r in batching.execute(runner, jobs)}
    failed = outcomes[(1,)]
    assert isinstance(failed, Failure) and failed.outcome == "internal" and "exploded" in failed.message
    first, third = outcomes[(0, 2)]
    assert [im.getpixel((0, 0))[0] for im in first] == [1, 2] and [
        im.getpixel((0, 0))[0] for im in third
    ] == [5]
    assert runner.calls[0] == ["a", "a", "c"]


def test_a_sticky_device_error_fails_every_group_left_without_running_or_cleaning_up():
    runner = FakeRunner()
    jobs = [job(0, "fault"), job(1, "b", num_inference_steps=3), job(2, "c", num_inference_steps=4)]
    outcomes = list(batching.execute(runner, jobs))
    assert len(runner.calls) == 1 and runner.freed == 0  # nothing more runs on a broken device
    assert sorted(j.index for group, _ in outcomes for j in group) == [0, 1, 2]
    assert all(isinstance(outcome, Failure) and outcome.broken for _, outcome in outcomes)
    assert all(outcome.outcome == "unavailable" and outcome.status.value == 503 for _, outcome in outcomes)
    assert "illegal memory access" in outcomes[0][1].broken and "retry" in outcomes[0][1].message
    assert not recovery.is_sticky(torch.cuda.OutOfMemoryError("CUDA out of memory"))


def test_out_of_memory_splits_the_group_before_failing_anyone():
    runner = FakeRunner(fits=2)
    jobs = [job(i, f"p{i}", seed=i) for i in range(4)] + [job(4, "big", seed=9, num_images_per_prompt=3)]
    outcomes = {tuple(j.index for j in g): r for g, r in batching.execute(runner, jobs)}
    # 7 images do not fit: halves of the group are retried until each fits, or is one request too big
    assert [len(c) for c in runner.calls] == [7, 2, 5, 1, 4, 1, 3]
    failed = {k: isinstance(v, Failure) for k, v in outcomes.items()}
    assert failed == {(0, 1): False, (2,): False, (3,): False, (4,): True}
    assert outcomes[(4,)].outcome == "out_of_memory" and runner.freed == 4


def test_out_of_memory_is_told_apart_from_other_errors():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"))
    assert not is_out_of_memory(ValueError("out of memory"))  # a caller's text is not an OOM
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_callers_who_are_gone_cost_nothing():
    runner = FakeRunner()
    gone, waiting = job(0, "a", seed=1), job(1, "b", seed=2)
    gone.cancelled = lambda: True
    outcomes = list(batching.execute(runner, [gone, waiting]))
    assert outcomes[0][1].outcome == "cancelled" and [j.index for j in outcomes[0][0]] == [0]
    assert [j.index for j in outcomes[1][0]] == [1] and runner.calls == [["b"]]


def test_a_call_stops_between_steps_once_every_caller_is_gone():
    runner = FakeRunner()
    first, second = job(0, "a", num_inference_steps=20), job(1, "b", num_inference_steps=20)
    asked = []
    first.cancelled = second.cancelled = lambda: len(asked.append(1) or asked) > 6
    [(group, outcome)] = list(batching.execute(runner, [first, second]))
    assert outcome.outcome == "cancelled" and len(group) == 2 and len(asked) < 20
    assert outcome.message == "the caller gave up; the call was stopped"


def test_a_group_that_cannot_finish_by_its_deadline_is_answered_at_once():
    runner = FakeRunner()
    late = job(0, "a", num_inference_steps=9, height=512, width=512)  # 2.6 megapixel-steps
    late.deadline = time.monotonic() + 5
    cost = budget.CostModel(MODELS["sd_base"], rate=4.0)  # about 10 s
    [(group, outcome)] = list(batching.execute(runner, [late], cost=cost))
    assert outcome.outcome == "busy" and outcome.status.value == 503 and runner.calls == []
    cost.rate = 0.4  # about 1 s
    [(group, outcome)] = list(batching.execute(runner, [late], cost=cost))
    assert not isinstance(outcome, Failure)
    assert cost.rate < 0.4  # the best seen: the fake runner took far less


def test_a_request_over_its_budget_is_refused_saying_what_to_lower():
    cost = budget.CostModel(MODELS["sd_base"], rate=1.0)
    budget.check(cost, 45, job(0, num_inference_steps=50, height=512, width=512))  # about 13 s
    with pytest.raises(
        InvalidInput, match=r"would take about 53s on this instance \(4 image\(s\), 50 steps, 512x512\)"
    ):
        budget.check(cost, 45, job(0, num_inference_steps=50, height=512, width=512, num_images_per_prompt=4))
