"""What each request did and what each model costs, for an operator who cannot see inside an MME.

SageMaker's own metrics for a multi-model endpoint are per instance, never per model. Each model here
writes one JSON line per request to its process's stderr (tritonserver's log; CloudWatch Logs on
SageMaker, whose Logs Insights reads the fields of a JSON line) and publishes Prometheus metrics on
Triton's metrics port beside Triton's own `nv_inference_*` (pb_utils.MetricFamily), labelled with
the model's name: under SageMaker that is the TargetModel.

`Telemetry` is the one entry point: the model tells it the phases of its load, each pipeline call and
each answered request. Nothing it does can fail a request: a metric that cannot be written is a log
line, once.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Optional, Tuple

from sdmme.settings import Group, Setting

log = logging.getLogger("sdmme")

SETTINGS = Group(
    "telemetry",
    (
        Setting(
            "request_log",
            bool,
            True,
            "One JSON line per request on stderr: model, outcome, sizes, times (docs/operating.md).",
        ),
        Setting(
            "log_prompts",
            bool,
            False,
            "Put the prompt and negative prompt in the request's log line (they may be personal).",
        ),
        Setting(
            "metrics",
            bool,
            True,
            "Publish the model's metrics (sdmme_*) on Triton's metrics port (docs/operating.md).",
        ),
    ),
)

# Where an adapter a call used came from: already loaded on the device (a hit), the model's folder or
# the disk cache of an S3 store, or fetched from S3 for this call.
ADAPTER_SOURCES = ("device", "disk", "s3")
LOAD_PHASES = ("weights", "to_device", "settings", "compile_cache", "warmup", "calibrate", "total")

# Each metric write is a round trip to tritonserver (40-160 us each, measured here): what is not per
# request (memory, telemetry's own time) is published at most this often.
PUBLISH_EVERY_S = 5.0
SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)
STEP_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
GROUP_SIZES = (1, 2, 3, 4, 5, 6, 7, 8)


@dataclass(frozen=True)
class Family:
    """One metric family as Triton publishes it; `labels` in the order the model sets them."""

    name: str
    kind: str  # COUNTER, GAUGE or HISTOGRAM (pb_utils.MetricFamily's kinds)
    help: str
    labels: Tuple[str, ...]
    buckets: Tuple[float, ...] = ()


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "sdmme_requests_total",
            "COUNTER",
            "Requests the model answered, by outcome: ok or the error's class",
            ("model", "kind", "outcome"),
        ),
        Family("sdmme_images_total", "COUNTER", "Images returned to callers", ("model",)),
        Family(
            "sdmme_denoising_steps_total",
            "COUNTER",
            "Denoising steps run (one step of a call covers its whole batch)",
            ("model",),
        ),
        Family(
            "sdmme_request_seconds",
            "HISTOGRAM",
            "From the start of the execute() that got the request to its answer (Triton's queue before "
            "that: nv_inference_queue_duration_us)",
            ("model",),
            SECONDS,
        ),
        Family(
            "sdmme_queue_seconds",
            "HISTOGRAM",
            "Inside execute(), waiting for the pipeline calls before the request's own",
            ("model",),
            SECONDS,
        ),
        Family(
            "sdmme_step_seconds",
            "HISTOGRAM",
            "Seconds per denoising step of a pipeline call (the call's time over its steps)",
            ("model",),
            STEP_SECONDS,
        ),
        Family("sdmme_group_size", "HISTOGRAM", "Requests per pipeline call", ("model",), GROUP_SIZES),
        Family(
            "sdmme_adapter_uses_total",
            "COUNTER",
            "Adapters a pipeline call used, by source: device (already loaded: a hit), disk, s3 (fetched)",
            ("model", "source"),
        ),
        Family(
            "sdmme_telemetry_seconds_total",
            "COUNTER",
            "Seconds the model spent writing its request lines and metrics (what they cost)",
            ("model",),
        ),
        Family(
            "sdmme_load_seconds",
            "GAUGE",
            "The instance's last load, by phase: " + ", ".join(LOAD_PHASES),
            ("model", "instance", "phase"),
        ),
        Family(
            "sdmme_gpu_memory_bytes",
            "GAUGE",
            "GPU memory of the instance's process, by pool: allocated (tensors), reserved (held)",
            ("model", "instance", "pool"),
        ),
        Family(
            "sdmme_host_memory_bytes",
            "GAUGE",
            "Resident host memory of the instance's process",
            ("model", "instance"),
        ),
    )
}


class Metrics:
    """The families above through pb_utils, one Metric per label set, made on first use."""

    def __init__(self, pb_utils):
        self.pb_utils = pb_utils
        self.families: Dict[str, Any] = {}
        self.metrics: Dict[Tuple[str, Tuple[str, ...]], Any] = {}
        self.failed = False

    def _metric(self, name: str, labels: Tuple[str, ...]):
        key = (name, labels)
        if key not in self.metrics:
            family = FAMILIES[name]
            if name not in self.families:
                kind = getattr(self.pb_utils.MetricFamily, family.kind)
                self.families[name] = self.pb_utils.MetricFamily(
                    name=name, description=family.help, kind=kind
                )
            named = dict(zip(family.labels, labels))
            if family.buckets:
                self.metrics[key] = self.families[name].Metric(labels=named, buckets=list(family.buckets))
            else:
                self.metrics[key] = self.families[name].Metric(labels=named)
        return self.metrics[key]

    def _do(self, op: str, name: str, labels: Tuple[str, ...], value: float) -> None:
        try:
            getattr(self._metric(name, labels), op)(value)
        except Exception as e:  # a metric is never worth a request
            if not self.failed:
                self.failed = True
                log.warning(
                    "metrics: %s of %s failed (%s: %s); later failures are not logged",
                    op,
                    name,
                    type(e).__name__,
                    e,
                )

    def add(self, name: str, labels: Tuple[str, ...], value: float = 1.0) -> None:
        if value:
            self._do("increment", name, labels, value)

    def observe(self, name: str, labels: Tuple[str, ...], value: float) -> None:
        self._do("observe", name, labels, value)

    def set(self, name: str, labels: Tuple[str, ...], value: float) -> None:
        self._do("set", name, labels, value)


def gpu_memory(device) -> Optional[Dict[str, int]]:
    """The process's GPU memory by pool; None off CUDA."""
    if device.type != "cuda":
        return None
    import torch

    return {
        "allocated": torch.cuda.memory_allocated(device),
        "reserved": torch.cuda.memory_reserved(device),
    }


def _request_logger() -> logging.Logger:
    """The request lines alone on their lines, bare JSON: CloudWatch Logs Insights discovers the fields
    of an event that is JSON, not of one behind a prefix."""
    logger = logging.getLogger("sdmme.requests")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def _quiet(method):
    """Telemetry never fails the work it describes: a fault of its own is a log line. It also times
    itself (Telemetry.spent), so that what it costs is measured where it is spent."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        except Exception:
            log.exception("telemetry: %s failed", method.__name__)
        finally:
            self.spent += time.perf_counter() - start

    return wrapper


class Telemetry:
    """One model instance's request log and metrics: `spec` is its kind (sdmme.spec.ModelSpec),
    `settings` (pipelines.Settings) say what is on (request_log, log_prompts, metrics); `pb_utils` None
    (outside Triton) means no metrics."""

    def __init__(self, name: str, spec, instance: str, settings, pb_utils=None):
        self.name, self.spec, self.kind, self.instance = name, spec, spec.name, instance
        self.request_log = _request_logger() if settings.request_log else None
        self.log_prompts = settings.log_prompts
        self.metrics = Metrics(pb_utils) if settings.metrics and pb_utils is not None else None
        self.phases: Dict[str, float] = {}
        self.spent = 0.0  # seconds inside telemetry since it was last published
        self.published = time.monotonic()  # when the memory gauges and `spent` were last published
        self._sources: Dict[str, str] = {}  # adapters of the call being answered -> where they came from

    # Load ------------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times one phase of the load (LOAD_PHASES)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.monotonic() - start

    @_quiet
    def loaded(self, seconds: float, device) -> None:
        self.phases["total"] = seconds
        if self.metrics is not None:
            for phase, value in self.phases.items():
                self.metrics.set("sdmme_load_seconds", (self.name, self.instance, phase), value)
        self._memory(device)

    def _memory(self, device) -> None:
        """The instance's memory gauges, as they are now (after a load, after each execute())."""
        if self.metrics is None:
            return
        from sdmme.serving import host_memory

        self.metrics.set("sdmme_host_memory_bytes", (self.name, self.instance), host_memory.resident())
        for pool, value in (gpu_memory(device) or {}).items():
            self.metrics.set("sdmme_gpu_memory_bytes", (self.name, self.instance, pool), value)

    # Requests --------------------------------------------------------------------------------------
    @_quiet
    def adapter_used(self, name: str, source: str) -> None:
        """sdmme.adapters calls this for each adapter a call activates (ADAPTER_SOURCES)."""
        self._sources[name] = source
        if self.metrics is not None:
            self.metrics.add("sdmme_adapter_uses_total", (self.name, source))

    @_quiet
    def call(self, group: List[Any], seconds: float, steps: int) -> None:
        """A pipeline call ran `steps` denoising steps for `group` (batching.Job) in `seconds`."""
        if self.metrics is None:
            return
        labels = (self.name,)
        self.metrics.add("sdmme_denoising_steps_total", labels, steps)
        self.metrics.observe("sdmme_step_seconds", labels, seconds / max(1, steps))
        self.metrics.observe("sdmme_group_size", labels, len(group))

    def group_done(self) -> None:
        """A call's requests are answered: the next call's adapters start afresh."""
        self._sources = {}

    @_quiet
    def request(
        self,
        outcome: str,
        started: float,
        job=None,
        request_id: str = "",
        error: str = "",
        encode_s: float = 0.0,
    ) -> None:
        """One request answered (sdmme.serving.outcomes.OUTCOMES) by the execute() that started at
        `started` (time.monotonic(): its time counts from there); `job` (batching.Job) when decoded."""
        now = time.monotonic()
        request_s = now - started
        queue_s = (job.started - started) if job is not None and job.started is not None else None
        if self.metrics is not None:
            labels = (self.name,)
            self.metrics.add("sdmme_requests_total", (self.name, self.kind, outcome))
            self.metrics.observe("sdmme_request_seconds", labels, request_s)
            if queue_s is not None:
                self.metrics.observe("sdmme_queue_seconds", labels, queue_s)
            if outcome == "ok":
                self.metrics.add("sdmme_images_total", labels, len(job.seeds))
        if self.request_log is None:
            return
        line: Dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": "request",
            "model": self.name,
            "kind": self.kind,
            "id": request_id or None,
            "outcome": outcome,
            "error": error[:500] or None,
        }
        if job is not None:
            width, height = job.size
            lora = job.args.get("lora") or ()
            line.update(
                adapters=[f"{name}@{scale:g}" for name, scale in lora],
                adapters_from=_slowest([self._sources.get(name) for name, _ in lora]),
                steps=job.args.get("num_inference_steps"),
                width=width,
                height=height,
                images=len(job.seeds),
                group=job.group_size or None,
                queue_s=_round(queue_s),
                pipeline_s=_round(job.pipeline_s) if job.started is not None else None,
                encode_s=_round(encode_s) if outcome == "ok" else None,
            )
            if self.log_prompts:
                line.update(prompt=job.prompt, negative_prompt=job.negative_prompt)
        line["request_s"] = _round(request_s)
        # ASCII: the backend stub's stderr is ASCII (the C locale), where other characters would be
        # written as Python's \x escapes and break the JSON; \u escapes are JSON (lone surrogates too).
        self.request_log.info(json.dumps(line))

    @_quiet
    def executed(self, device) -> None:
        """An execute() returned: at most every PUBLISH_EVERY_S, the memory gauges follow what it left
        and telemetry's own time is published (this call's own time in the next publication)."""
        if self.metrics is None or time.monotonic() < self.published + PUBLISH_EVERY_S:
            return
        self.published = time.monotonic()
        self._memory(device)
        spent, self.spent = self.spent, 0.0
        self.metrics.add("sdmme_telemetry_seconds_total", (self.name,), spent)


def _slowest(sources: List[Optional[str]]) -> Optional[str]:
    """The slowest place the call's adapters came from (s3 over disk over device); None without any."""
    known = [s for s in sources if s in ADAPTER_SOURCES]
    return max(known, key=ADAPTER_SOURCES.index) if known else None


def _round(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds, 4)
