"""A model's whole request path without Triton (sdmme.serving.core): parse, validate, budget, group, run,
encode, answer and telemetry, on the tiny pipelines. The same core serves inside tritonserver, where the
server tests prove the shell around it."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil

import numpy as np
import pytest
from helpers import b64, picture, with_parameters
from PIL import Image

from bench.loras import write_adapter
from sdmme import model_folder
from sdmme.serving import recovery
from sdmme.serving.core import Model, Request
from sdmme.serving.outcomes import Status
from sdmme.spec import BASE64, FILES, WARNINGS


def tensor(value) -> np.ndarray:
    return np.array([[value.encode() if isinstance(value, str) else value]], dtype=np.object_)


def request(prompt="a lighthouse", outputs=(), **gen_args) -> Request:
    inputs = {"prompt": tensor(prompt), "gen_args": tensor(json.dumps(gen_args))}
    return Request(inputs, set(outputs), id=prompt[:20])


def execute(model: Model, requests) -> dict:
    answers = {}
    model.execute(requests, lambda index, answer: answers.setdefault(index, answer))
    assert sorted(answers) == list(range(len(requests))), "every request is answered once"
    return answers


class Lines(logging.Handler):
    """The request log's JSON lines, as they are written."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture()
def lines():
    handler, logger = Lines(), logging.getLogger("sdmme.requests")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def load(tiny_repository, tmp_path, model="sd_base", **parameters) -> Model:
    folder = tmp_path / model
    shutil.copytree(tiny_repository / model, folder)
    with_parameters(folder, parameters)
    config = (folder / model_folder.CONFIG).read_text()
    return Model.load(folder, model_folder.parameters_in(config), "CPU", "0", model)


def test_a_mixed_execute_answers_each_request_as_its_own(tiny_repository, tmp_path, lines):
    model = load(tiny_repository, tmp_path)
    fast = {"num_inference_steps": 2, "height": 64, "width": 64}
    answers = execute(
        model,
        [
            request("one", seed=1, **fast),
            request("two", outputs=(FILES, WARNINGS), seed=2, output_format="png", **fast),
            request("bad", steps=3),
            request("x" * 400, seed=4, **fast),
            request("adapter", lora="nowhere", **fast),
        ],
    )
    assert answers[0].outcome == "ok" and set(answers[0].outputs) == {BASE64}
    jpeg = Image.open(io.BytesIO(base64.b64decode(answers[0].outputs[BASE64][0])))
    assert jpeg.format == "JPEG" and jpeg.size == (64, 64)
    assert set(answers[1].outputs) == {FILES, WARNINGS} and answers[1].outputs[WARNINGS] == []
    assert Image.open(io.BytesIO(answers[1].outputs[FILES][0])).format == "PNG"
    refused = answers[2].failure
    assert refused.status is Status.INVALID_ARG and "unknown gen_args key(s) steps" in refused.message
    assert answers[3].outcome == "ok" and b"tokens; the text encoder reads the first 77" in b"".join(
        execute(model, [request("x" * 400, outputs=(WARNINGS,), **fast)])[0].outputs[WARNINGS]
    )
    unknown = answers[4].failure
    assert unknown.outcome == "invalid_input" and "unknown adapter nowhere" in unknown.message
    by_id = {line["id"]: line for line in lines}
    assert by_id["one"]["outcome"] == "ok" and by_id["one"]["group"] == 3  # one, two, the long one: a call
    assert (by_id["one"]["width"], by_id["one"]["height"], by_id["one"]["images"]) == (64, 64, 1)
    assert by_id["bad"]["outcome"] == "invalid_input" and "steps" not in by_id["bad"]  # never decoded
    assert by_id["adapter"]["outcome"] == "invalid_input" and "prompt" not in by_id["one"]


def test_a_request_over_its_budget_or_whose_caller_left_runs_nothing(tiny_repository, tmp_path, lines):
    model = load(tiny_repository, tmp_path, time_budget_s="2")
    gone = request("gone", num_inference_steps=2, height=64, width=64)
    gone.cancelled = lambda: True
    answers = execute(model, [request("long", num_inference_steps=150, height=1024, width=1024), gone])
    over = answers[0].failure
    assert over.outcome == "over_budget" and over.status is Status.INVALID_ARG
    assert "must finish within 2s" in over.message and "lower num_inference_steps" in over.message
    assert answers[1].outcome == "cancelled" and answers[1].failure.status is Status.CANCELLED
    assert [line["outcome"] for line in lines] == ["over_budget", "cancelled"]
    assert lines[1]["pipeline_s"] is None  # nothing ran for it


def test_a_device_fault_answers_503_now_and_after_and_asks_for_a_reload(
    tiny_repository, tmp_path, monkeypatch
):
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(recovery.FAULTS_ENV, str(faults))
    model = load(tiny_repository, tmp_path)
    declared = []
    model.on_broken = declared.append
    (faults / "sd_base").touch()
    fast = {"num_inference_steps": 2, "height": 64, "width": 64}
    first = execute(model, [request("a", **fast), request("b", num_inference_steps=3)])
    assert {a.outcome for a in first.values()} == {"unavailable"}
    assert all(
        a.failure.status is Status.UNAVAILABLE and "retry" in a.failure.message for a in first.values()
    )
    assert len(declared) == 1 and "illegal memory access" in declared[0]
    [later] = execute(model, [request("c", **fast)]).values()  # nothing runs on that device again
    assert later.outcome == "unavailable" and "being reloaded after a device fault" in later.failure.message


def test_a_truncated_adapter_file_fails_alone_and_the_model_keeps_serving(tiny_repository, tmp_path):
    """An adapter's file cut short while the model serves (an interrupted copy over it): its loaded copy
    is in memory, never a mapping of the file, so it serves as checked; reloaded from the cut file it is a
    400 naming it, and the model and its other adapters serve on (it was 500s for every caller)."""
    model = load(tiny_repository, tmp_path, max_adapters="1")
    store = tmp_path / "sd_base" / "adapters"
    store.mkdir()
    weights = model_folder.weights_dir(tmp_path / "sd_base")
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_adapter(weights, store / f"{name}.safetensors", 2, seed)
    fast = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 5, "output_format": "png"}
    with_a = execute(model, [request(lora="a", **fast)])[0]
    path = store / "a.safetensors"
    data = path.read_bytes()
    model.runner.adapters.max_resident = 2  # a stays loaded while b loads
    assert execute(model, [request(lora="b", **fast)])[0].outcome == "ok"
    path.write_bytes(data[: len(data) // 2])
    again = execute(model, [request(lora="a", **fast)])[0]
    assert again.outcome == "ok" and again.outputs == with_a.outputs  # what was checked is what serves
    model.runner.adapters.max_resident = 1
    execute(model, [request(lora="c", **fast)])  # a and b go; a's next use reads the cut file
    answers = execute(model, [request(lora="a", **fast), request(**fast), request(lora="b", **fast)])
    refused = answers[0].failure
    assert refused.status is Status.INVALID_ARG and "adapter a in" in refused.message
    assert "truncated or corrupt" in refused.message
    assert answers[1].outcome == "ok" and answers[2].outcome == "ok"


def test_make_adapter_writes_a_file_any_user_can_read_as_its_record(tmp_path):
    """make adapter's writer (sdmme.adapters.files.write) gives the file its record's mode: safetensors
    writes 0600, which a server running as another user cannot read."""
    from sdmme.tools import weights

    weights.fill(tmp_path, "sd_base", "tiny")
    weights_folder = model_folder.weights_dir(tmp_path / "sd_base")
    record_path = tmp_path / "ink.json"
    old = os.umask(0o022)
    try:
        write_adapter(weights_folder, tmp_path / "ink.safetensors", 2, 1)
    finally:
        os.umask(old)
    mode = (tmp_path / "ink.safetensors").stat().st_mode & 0o777
    assert mode == record_path.stat().st_mode & 0o777 == 0o644


def test_every_request_gets_an_answer_when_the_core_itself_fails(tiny_repository, tmp_path, monkeypatch):
    model = load(tiny_repository, tmp_path)

    def broken_encode(*args, **kwargs):
        raise KeyError("a fault of ours")

    monkeypatch.setattr(model, "_encode", broken_encode)
    answers = execute(model, [request(num_inference_steps=2, height=64, width=64), request(steps=1)])
    assert answers[1].outcome == "invalid_input"
    assert answers[0].outcome == "internal" and "internal error: KeyError" in answers[0].failure.message


def test_an_image_model_decodes_its_images_and_answers_at_their_size(tiny_repository, tmp_path):
    model = load(tiny_repository, tmp_path, "sd_inpaint")
    inputs = {
        "prompt": tensor("a"),
        "image": tensor(b64(picture(96, 72))),
        "mask_image": tensor(b64(picture(96, 72, mode="L"))),
        "gen_args": tensor(json.dumps({"num_inference_steps": 2})),
    }
    [answer] = execute(model, [Request(inputs)]).values()
    image = Image.open(io.BytesIO(base64.b64decode(answer.outputs[BASE64][0])))
    assert image.size == (96, 72)
    inputs["mask_image"] = tensor(b64(picture(64, 64, mode="L")))
    [refused] = execute(model, [Request(inputs)]).values()
    assert "mask_image must have the size of image" in refused.failure.message
