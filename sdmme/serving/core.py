"""A model's work, without Triton: plain requests in, plain answers out.

`Model.load` loads a model folder (sdmme.loader) and measures it for its time budget; `Model.execute`
takes the requests Triton's batcher handed over and answers each as soon as its group is done: parse
and validate (a bad one is refused alone), budget, group, run, encode, answer, with telemetry's log
line and metrics written just before each answer goes out. The Triton shell (sdmme.triton_model) only
converts: pb_utils tensors to `Request`, `Answer` to an InferenceResponse. Tests drive this module with
tiny pipelines and no server.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set

import numpy as np

from sdmme import loader
from sdmme.pipeline import compile_artifacts, runner
from sdmme.serving import batching, budget, host_memory, images, telemetry
from sdmme.serving.outcomes import Failure, Status, refused
from sdmme.spec import BASE64, FILES, OUTPUTS, WARNINGS, InvalidInput

log = logging.getLogger("sdmme")


@dataclass
class Request:
    """One request as Triton handed it over: its inputs (name -> numpy array), the outputs it asked for
    (none named: base64 alone, as the AWS sample expects), its id, and whether its caller gave up."""

    inputs: Mapping[str, np.ndarray]
    requested: Set[str] = field(default_factory=set)
    id: str = ""
    cancelled: Callable[[], bool] = lambda: False

    def outputs(self) -> Set[str]:
        """The outputs to send: base64 alone when it named none or all (Triton then lists all)."""
        names = set(self.requested)
        if not names or names == set(OUTPUTS):
            return {BASE64}
        return names if names & {BASE64, FILES} else names | {BASE64}


@dataclass
class Answer:
    """What a request gets: its outputs (name -> list of bytes), or a failure."""

    outputs: Dict[str, List[bytes]] = field(default_factory=dict)
    failure: Optional[Failure] = None

    @property
    def outcome(self) -> str:
        return "ok" if self.failure is None else self.failure.outcome


Send = Callable[[int, Answer], None]  # (index of the request in execute()'s list, its answer)


class Model:
    """One model instance: its loaded pipeline, budget and telemetry."""

    def __init__(self, name: str, loaded: loader.Loaded, telemetry_: telemetry.Telemetry, cost=None):
        self.name, self.loaded, self.spec = name, loaded, loaded.spec
        self.runner = loaded.runner
        self.telemetry = telemetry_
        self.budget = loaded.settings.time_budget_s
        self.cost = cost  # budget.CostModel when the model has a time budget
        self.compiles = loaded.settings.compile != "none"
        self.broken: Optional[str] = None  # a device fault: nothing runs here any more
        self.on_broken: Callable[[str], None] = lambda reason: None

    @classmethod
    def load(
        cls,
        folder: Path,
        parameters: Mapping[str, str],
        instance_kind: str = "CPU",
        device_id: str = "0",
        name: Optional[str] = None,
        instance: str = "",
        pb_utils=None,
    ) -> Model:
        """The model in `folder` with its config.pbtxt `parameters`, on the device of a Triton instance
        of `instance_kind`; `pb_utils` (inside Triton) publishes its metrics."""
        name = name or folder.name
        start = time.monotonic()
        spec, device, settings = loader.prepare(parameters, instance_kind, device_id, name)
        record = telemetry.Telemetry(name, spec, instance, settings, pb_utils)
        before = host_memory.resident()
        try:
            loaded = loader.load(spec, folder, device, settings, name, record.phase)
            cost = None
            if settings.time_budget_s:
                with record.phase("calibrate"):
                    cost = budget.calibrate(loaded.runner, spec)
        except Exception as e:
            if runner.is_out_of_memory(e):
                # SageMaker answers a load failure saying "out of memory" with 507: it evicts models, retries.
                raise RuntimeError(f"out of memory loading {name}: {e}") from e
            raise
        if loaded.runner.adapters is not None:
            loaded.runner.adapters.on_use = record.adapter_used
        record.loaded(time.monotonic() - start, loaded.device)
        log.info(
            "%s (%s): ready in %.1fs (%s), %s",
            name,
            spec.name,
            time.monotonic() - start,
            ", ".join(f"{k} {v:.1f}s" for k, v in record.phases.items() if k != "total"),
            host_memory.summary(before),
        )
        return cls(name, loaded, record, cost)

    def execute(self, requests: Sequence[Request], send: Send) -> None:
        """Answers every request through `send`, each as soon as its group is done; a fault of ours
        still answers every request not yet answered."""
        started = time.monotonic()  # requests may have queued before: Triton's queue policy bounds it
        answered = [False] * len(requests)

        def answer(index: int, reply: Answer, job: Optional[batching.Job] = None, encode_s: float = 0.0):
            """Log and count the answer, then send it: a caller who has it finds it counted."""
            error = "" if reply.failure is None else reply.failure.message
            self.telemetry.request(reply.outcome, started, job, requests[index].id, error, encode_s)
            send(index, reply)
            answered[index] = True

        if self.broken is not None:  # never touch a broken device again
            failure = self._broken_failure(self.broken)
            for i in range(len(requests)):
                answer(i, Answer(failure=failure))
            return
        try:
            jobs = []
            for i, request in enumerate(requests):
                job = self._parse(i, request, started)
                if isinstance(job, Failure):
                    answer(i, Answer(failure=job))
                else:
                    jobs.append(job)
            compiled = compile_artifacts.compiled_graphs()["compiled"] if self.compiles else 0
            for group, outcome in batching.execute(self.runner, jobs, self.name, self.cost):
                if self.compiles:
                    width, height = group[0].size
                    what = f"a call of {sum(len(j.seeds) for j in group)} image(s) at {width}x{height}"
                    compiled = compile_artifacts.log_new_graphs(self.name, compiled, what)
                if isinstance(outcome, Failure):
                    if outcome.broken is not None and self.broken is None:
                        self.broken = outcome.broken
                        self.on_broken(outcome.broken)
                    for job in group:
                        answer(job.index, Answer(failure=outcome), job)
                else:
                    self.telemetry.call(group, group[0].pipeline_s, batching.steps_run(group[0].args))
                    for job, generated in zip(group, outcome):
                        encoding = time.monotonic()
                        reply = self._encode(job, generated, requests[job.index].outputs())
                        answer(job.index, reply, job, time.monotonic() - encoding)
                self.telemetry.group_done()
        except Exception as e:  # a fault of ours: every request still gets its answer
            log.exception("%s: execute failed", self.name)
            failure = Failure("internal", Status.INTERNAL, f"internal error: {type(e).__name__}: {e}")
            for i, done in enumerate(answered):
                if not done:
                    answer(i, Answer(failure=failure))
        self.telemetry.executed(self.loaded.device)

    def _parse(self, index: int, request: Request, started: float):
        """The request's Job, or the Failure that refuses it here."""
        try:
            job = batching.parse(self.spec, index, request.inputs, self.runner.min_image_side)
        except InvalidInput as e:
            return refused("invalid_input", str(e))
        except Exception as e:  # whatever a caller sends fails that request alone
            log.exception("%s: request %d could not be parsed", self.name, index)
            return refused(
                "invalid_input", f"request could not be decoded: {type(e).__name__}: {str(e)[:300]}"
            )
        for name, text in (("prompt", job.prompt), ("negative_prompt", job.negative_prompt)):
            tokens, window = self.runner.prompt_tokens(text), self.runner.prompt_window
            if tokens > window:
                job.warnings.append(
                    f"{name} has {tokens} tokens; the text encoder reads the first {window} "
                    "(start and end markers included) and ignores the rest"
                )
        if self.cost is not None:
            try:
                budget.check(self.cost, self.budget, job)
            except InvalidInput as e:
                return refused("over_budget", str(e))
            job.deadline = started + self.budget
        job.cancelled = request.cancelled
        for warning in job.warnings:
            log.info("%s: request %d: %s", self.name, index, warning)
        return job

    def _encode(self, job: batching.Job, generated, wanted: Set[str]) -> Answer:
        try:
            files = [images.encode(im, job.args["output_format"], job.args["quality"]) for im in generated]
        except Exception as e:
            log.exception("%s: encoding request %d's images failed", self.name, job.index)
            return Answer(
                failure=refused(
                    "invalid_input",
                    f"the generated image could not be encoded as {job.args['output_format']} "
                    f"({type(e).__name__}: {e}); try another output_format",
                )
            )
        outputs = {}
        if BASE64 in wanted:
            outputs[BASE64] = [base64.b64encode(f) for f in files]
        if FILES in wanted:
            outputs[FILES] = files
        if WARNINGS in wanted:
            outputs[WARNINGS] = [w.encode() for w in job.warnings]
        return Answer(outputs)

    def _broken_failure(self, reason: str) -> Failure:
        message = f"{self.name} is being reloaded after a device fault ({reason}); retry in a few seconds"
        return Failure("unavailable", Status.UNAVAILABLE, message, broken=reason)

    def unload(self) -> None:
        device = self.loaded.device
        del self.runner, self.loaded
        if self.broken is None:  # a broken device fails every call, a cleanup one too
            runner.free_memory(device)
        log.info("%s: unloaded", self.name)
