"""Why a request ended as it did, decided once where it ended: its outcome (what telemetry counts), the
status its caller gets and the message.

A failure is classified where it happens (a caller's input, a group that cannot finish in time, callers
who gave up, a device that broke, a store that did not answer, memory, a fault of ours); everything
after that (the answer, the log line, the metrics) reads the `Failure`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from sdmme.adapters.store import StoreError
from sdmme.spec import InvalidInput, caller_safe

# Why a request ended as it did: "ok", or the class of its error (the reason an operator filters on).
OUTCOMES = {
    "ok": "answered with its images",
    "invalid_input": "a 400 naming the input (bad value, bad image, unknown adapter, ...)",
    "over_budget": "refused up front: it could not finish within time_budget_s even alone",
    "busy": "answered at once: queued work left it no time to finish by its deadline",
    "too_late": "its deadline passed while it waited; nothing was run for it",
    "cancelled": "its caller gave up (gRPC cancellation); nothing more was run for it",
    "out_of_memory": "did not fit in memory even alone",
    "unavailable": "the adapter store did not answer, or the device broke (retry)",
    "internal": "a fault of ours (the log has its trace)",
}


class Status(enum.Enum):
    """What the caller is told; the names are Triton's error codes (pb_utils.TritonError)."""

    INVALID_ARG = 400
    UNAVAILABLE = 503
    CANCELLED = 499
    INTERNAL = 500


@dataclass(frozen=True)
class Failure:
    outcome: str  # one of OUTCOMES
    status: Status
    message: str
    broken: Optional[str] = None  # the device fault, when nothing can run on this model's device again


def refused(outcome: str, message: str) -> Failure:
    """A caller's 400, whose status no text from the caller can change (behind SageMaker too)."""
    return Failure(outcome, Status.INVALID_ARG, caller_safe(message))


def classify(error: BaseException, is_out_of_memory) -> Failure:
    """A pipeline call's exception, as the requests it failed are answered."""
    if isinstance(error, InvalidInput):  # an adapter that is unknown or cannot be used here
        return refused("invalid_input", str(error))
    if isinstance(error, StoreError):
        return Failure("unavailable", Status.UNAVAILABLE, caller_safe(str(error)))
    if is_out_of_memory(error):
        return Failure(
            "out_of_memory", Status.INTERNAL, "out of memory; retry with fewer images or a smaller size"
        )
    return Failure("internal", Status.INTERNAL, f"generation failed: {type(error).__name__}: {error}")
