"""The one TritonPythonModel implementation; each model.py subclasses it, config.pbtxt names its kind."""

from __future__ import annotations

import base64
import json
import locale
import logging
import os
import sys
import time
from pathlib import Path

import sdmme

os.environ.setdefault("OMP_WAIT_POLICY", sdmme.OMP_WAIT_POLICY)  # before torch; the operator's value wins

# The backend stub's embedded Python starts in the C locale, so open() without an encoding reads ASCII:
# torch.compile failed there reading its UTF-8 templates (UnicodeDecodeError). UTF-8 as everywhere else.
if locale.getpreferredencoding(False).lower() not in ("utf-8", "utf8"):
    for name in ("C.UTF-8", "C.utf8", "en_US.UTF-8"):
        try:
            locale.setlocale(locale.LC_CTYPE, name)
            break
        except locale.Error:
            continue

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from sdmme import (  # noqa: E402
    adapters,
    batching,
    budget,
    compile_artifacts,
    host_memory,
    images,
    pipelines,
    recovery,
    telemetry,
)
from sdmme.spec import (  # noqa: E402
    BASE64,
    FILES,
    KIND_PARAMETER,
    MODELS,
    OUTPUTS,
    WARNINGS,
    InvalidInput,
    ModelSpec,
    caller_safe,
)

log = logging.getLogger("sdmme")


def _refusal(outcome: str, message: str):
    """A caller's 400 whose status no text from the caller can change (behind SageMaker too), as
    (response, outcome, message) for execute()'s answer."""
    message = caller_safe(message)
    return _error(message, pb_utils.TritonError.INVALID_ARG), outcome, message


def _error(message: str, code=None):
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def check_config(spec: ModelSpec, config: dict) -> None:
    """The config.pbtxt Triton loaded must declare the spec's contract; say what differs if not."""
    problems = []
    if config.get("max_batch_size", 0) < 1:
        problems.append("max_batch_size must be at least 1 (requests are [1, 1] tensors, batched)")
    declared = {i["name"]: i for i in config.get("input", [])}
    for name in spec.inputs:
        item = declared.pop(name, None)
        if item is None:
            problems.append(f"input {name} is missing")
            continue
        if item.get("data_type") != "TYPE_STRING":
            problems.append(f"input {name} must be TYPE_STRING, is {item.get('data_type')}")
        optional = name not in spec.required_inputs
        if bool(item.get("optional", False)) != optional:
            problems.append(f"input {name} must {'' if optional else 'not '}be optional")
    problems += [f"input {name} is not in the spec" for name in declared]
    outputs = {o["name"]: o for o in config.get("output", [])}
    for name in OUTPUTS:
        if outputs.get(name, {}).get("data_type") != "TYPE_STRING":
            problems.append(f"output {name} (TYPE_STRING) is missing")
    if problems:
        raise ValueError(
            f"config.pbtxt of {config.get('name')} disagrees with the {spec.name} spec (sdmme/spec.py): "
            + "; ".join(problems)
        )


def kind_of(config: dict) -> ModelSpec:
    """The spec of the kind config.pbtxt declares (parameters: kind)."""
    kind = config.get("parameters", {}).get(KIND_PARAMETER, {}).get("string_value")
    if kind not in MODELS:
        raise ValueError(
            f"config.pbtxt of {config.get('name')} must declare its kind, one of {', '.join(MODELS)}: "
            f'parameters: {{ key: "{KIND_PARAMETER}" value: {{ string_value: "sd_base" }} }}'
            + (f" (it says {kind!r})" if kind is not None else "")
        )
    return MODELS[kind]


class DiffusionModel:
    def initialize(self, args):
        if not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        config = json.loads(args["model_config"])
        self.spec = kind_of(config)
        self.name = args["model_name"]  # the model's own name (the TargetModel under SageMaker)
        check_config(self.spec, config)
        device, defaults = pipelines.device_for(args["model_instance_kind"], args["model_instance_device_id"])
        parameters = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        settings = pipelines.Settings.from_parameters(parameters, defaults)
        self.device = device
        # args["model_repository"] is the model's own folder, also under SageMaker where the name differs.
        folder = Path(args["model_repository"])
        weights = folder / args["model_version"] / "weights"
        start = time.monotonic()
        self.budget = settings.time_budget_s
        self.compiles = settings.compile != "none"
        self.telemetry = telemetry.Telemetry(
            self.name, self.spec, args["model_instance_name"], settings, pb_utils
        )
        phase = self.telemetry.phase
        try:
            before = host_memory.resident()
            host_memory.check(
                self.name, weights, settings.torch_dtype(device), settings.host_memory_reserve_gib
            )
            if settings.compile != "none":  # before anything compiles: the graphs then come from them
                with phase("compile_cache"):
                    compile_artifacts.load(folder, device, settings.compile, self.name)
            pipeline = pipelines.load(self.spec, weights, device, settings, phase)
            served = adapters.for_model(folder, settings, pipeline)
            if served is not None:
                served.on_use = self.telemetry.adapter_used
            self.runner = recovery.with_fault_hook(
                pipelines.Runner(pipeline, served, sync_free=settings.sync_free), self.name
            )
            if settings.compile != "none":
                warm = time.monotonic()
                with phase("warmup"):
                    batching.run(self.runner, [batching.warmup_job(self.spec)])
                graphs = compile_artifacts.compiled_graphs()
                log.info(
                    "%s: compiled and warmed up in %.1fs (%d graph(s) from the compile cache, %d compiled)",
                    self.name,
                    time.monotonic() - warm,
                    graphs["from cache"],
                    graphs["compiled"],
                )
            if self.budget:
                with phase("calibrate"):
                    self.cost = budget.calibrate(self.runner, self.spec)
            else:
                self.cost = None
        except Exception as e:
            if pipelines.is_out_of_memory(e):
                # SageMaker answers a load failure saying "out of memory" with 507: it evicts models, retries.
                raise RuntimeError(f"out of memory loading {self.name}: {e}") from e
            raise
        self.guard = recovery.Guard(self.name, pb_utils).start()
        self.telemetry.loaded(time.monotonic() - start, device)
        log.info(
            "%s (%s): ready in %.1fs (%s), %s",
            self.name,
            self.spec.name,
            time.monotonic() - start,
            ", ".join(f"{k} {v:.1f}s" for k, v in self.telemetry.phases.items() if k != "total"),
            host_memory.summary(before),
        )

    def _parse(self, index: int, request):
        """(job, None), or (None, (response, outcome, message)) for a request refused here."""
        try:
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            job = batching.parse(self.spec, index, inputs, self.runner.min_image_side)
        except InvalidInput as e:
            return None, _refusal("invalid_input", str(e))
        except Exception as e:  # whatever a caller sends fails that request alone
            log.exception("%s: request %d could not be parsed", self.name, index)
            message = f"request could not be decoded: {type(e).__name__}: {str(e)[:300]}"
            return None, _refusal("invalid_input", message)
        for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            tokens = self.runner.prompt_tokens(text)
            window = self.runner.prompt_window
            if tokens > window:
                job.warnings.append(
                    f"{name} has {tokens} tokens; the text encoder reads the first {window} "
                    "(start and end markers included) and ignores the rest"
                )
        if self.cost is not None:
            try:
                budget.check(self.cost, self.budget, job)
            except InvalidInput as e:
                return None, _refusal("over_budget", str(e))
            job.deadline = self.started + self.budget
        job.cancelled = request.is_cancelled
        for warning in job.warnings:
            log.info("%s: request %d: %s", self.name, index, warning)
        return job, None

    def _respond(self, job, generated, requested):
        """(response, outcome, error message)."""
        try:
            files = [images.encode(im, job.args["output_format"], job.args["quality"]) for im in generated]
        except Exception as e:
            log.exception("%s: encoding request %d's images failed", self.name, job.index)
            return _refusal(
                "invalid_input",
                f"the generated image could not be encoded as {job.args['output_format']} "
                f"({type(e).__name__}: {e}); try another output_format",
            )
        tensors = []
        if BASE64 in requested:
            tensors.append(
                pb_utils.Tensor(BASE64, np.array([[base64.b64encode(f) for f in files]], np.object_))
            )
        if FILES in requested:
            tensors.append(pb_utils.Tensor(FILES, np.array([files], dtype=np.object_)))
        if WARNINGS in requested:
            warnings = np.array([[w.encode() for w in job.warnings]], dtype=np.object_).reshape(1, -1)
            tensors.append(pb_utils.Tensor(WARNINGS, warnings))
        return pb_utils.InferenceResponse(output_tensors=tensors), "ok", ""

    @staticmethod
    def _requested(request) -> set:
        """The outputs a request asked for; base64 alone when it named none (Triton then lists all),
        as the AWS sample expects."""
        names = set(request.requested_output_names())
        if not names or names == set(OUTPUTS):
            return {BASE64}
        return names if names & {BASE64, FILES} else names | {BASE64}

    def execute(self, requests):
        """Each request is answered through its own response sender as soon as its group is done."""
        self.started = time.monotonic()  # requests may have queued before: Triton's queue policy bounds it
        self.telemetry.begin(self.started)
        senders = [request.get_response_sender() for request in requests]
        ids = [request.request_id() for request in requests]
        answered = [False] * len(requests)

        def answer(index: int, result, job=None, encode_s: float = 0.0) -> None:
            """Log and count `result` (response, outcome, error message), then send it: a caller who
            has an answer finds it counted."""
            response, outcome, message = result
            self.telemetry.request(outcome, job, ids[index], message, encode_s)
            senders[index].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            answered[index] = True

        if self.guard.broken is not None:  # never touch a broken device again
            for i in range(len(requests)):
                answer(i, self._broken())
            return None
        try:
            requested = [self._requested(r) for r in requests]
            jobs = []
            for i, request in enumerate(requests):
                job, refusal = self._parse(i, request)
                if refusal is not None:
                    answer(i, refusal)
                else:
                    jobs.append(job)
            compiled = compile_artifacts.compiled_graphs()["compiled"] if self.compiles else 0
            for group, outcome in batching.execute(self.runner, jobs, self.name, self.cost):
                if self.compiles:
                    width, height = batching.output_size(self.spec, group[0].args, group[0].images)
                    images = sum(len(job.seeds) for job in group)
                    what = f"a call of {images} image(s) at {width}x{height}"
                    compiled = compile_artifacts.log_new_graphs(self.name, compiled, what)
                if isinstance(outcome, recovery.Broken):
                    self.guard.declare_broken(str(outcome))
                    for job in group:
                        answer(job.index, self._broken(), job)
                elif isinstance(outcome, Exception):
                    for job in group:
                        answer(job.index, self._failure(outcome, job), job)
                else:
                    self.telemetry.call(group, group[0].pipeline_s, batching.steps_run(group[0].args))
                    for job, generated in zip(group, outcome):
                        encoding = time.monotonic()
                        result = self._respond(job, generated, requested[job.index])
                        answer(job.index, result, job, time.monotonic() - encoding)
                self.telemetry.group_done()
        except Exception as e:  # a fault of ours: every request still gets its answer
            log.exception("%s: execute failed", self.name)
            for i, done in enumerate(answered):
                if not done:
                    message = f"internal error: {type(e).__name__}: {e}"
                    answer(i, (_error(message), "internal", message))
        self.telemetry.executed(self.device)
        return None

    def _broken(self):
        message = (
            f"{self.name} is being reloaded after a device fault ({self.guard.broken}); "
            "retry in a few seconds"
        )
        return _error(message, pb_utils.TritonError.UNAVAILABLE), "unavailable", message

    @staticmethod
    def _failure(outcome: Exception, job):
        """(response, outcome, error message) for a group that failed with `outcome`."""
        if isinstance(outcome, batching.Gone):
            reason = "too_late" if time.monotonic() > job.deadline else "cancelled"
            code = getattr(pb_utils.TritonError, "CANCELLED", None)
            return _error(str(outcome), code), reason, str(outcome)
        if isinstance(outcome, batching.TooLate):
            return _error(str(outcome), pb_utils.TritonError.UNAVAILABLE), "busy", str(outcome)
        if isinstance(outcome, InvalidInput):  # an adapter that is unknown or cannot be used here
            return _refusal("invalid_input", str(outcome))
        if isinstance(outcome, adapters.StoreError):
            message = caller_safe(str(outcome))
            return _error(message, pb_utils.TritonError.UNAVAILABLE), "unavailable", message
        if pipelines.is_out_of_memory(outcome):
            message = "out of memory; retry with fewer images or a smaller size"
            return _error(message), "out_of_memory", message
        message = f"generation failed: {type(outcome).__name__}: {outcome}"
        return _error(message), "internal", message

    def finalize(self):
        self.guard.stop()
        del self.runner
        if self.guard.broken is None:  # a broken device fails every call, a cleanup one too
            pipelines.free_memory(self.device)
        log.info("%s: unloaded", self.name)
