"""The Triton shell: the one module that imports pb_utils. It turns Triton's requests into plain ones for
the model's core (sdmme.serving.core) and its answers into InferenceResponses; every model.py
subclasses `DiffusionModel`, and its config.pbtxt's `kind` parameter says what it is."""

from __future__ import annotations

import json
import locale
import logging
import os
import sys
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

from sdmme.serving import recovery  # noqa: E402
from sdmme.serving.core import Answer, Model, Request  # noqa: E402
from sdmme.serving.outcomes import Status  # noqa: E402

log = logging.getLogger("sdmme")


def _response(answer: Answer):
    if answer.failure is None:
        tensors = [
            pb_utils.Tensor(name, np.array([values], dtype=np.object_).reshape(1, -1))
            for name, values in answer.outputs.items()
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)
    status = answer.failure.status
    code = None if status is Status.INTERNAL else getattr(pb_utils.TritonError, status.name, None)
    message = answer.failure.message
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class DiffusionModel:
    def initialize(self, args):
        if not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        config = json.loads(args["model_config"])
        name = args["model_name"]  # the model's own name (the TargetModel under SageMaker)
        self.model = Model.load(
            # args["model_repository"] is the model's own folder, also under SageMaker where the name differs.
            Path(args["model_repository"]),
            {k: v["string_value"] for k, v in config.get("parameters", {}).items()},
            args["model_instance_kind"],
            args["model_instance_device_id"],
            name,
            args["model_instance_name"],
            pb_utils,
        )
        self.guard = recovery.Guard(name, pb_utils).start()
        self.model.on_broken = self.guard.declare_broken

    def execute(self, requests):
        """Each request is answered through its own response sender as soon as its group is done."""
        senders = [request.get_response_sender() for request in requests]
        plain = [
            Request(
                inputs={t.name(): t.as_numpy() for t in request.inputs()},
                requested=set(request.requested_output_names()),
                id=request.request_id(),
                cancelled=request.is_cancelled,
            )
            for request in requests
        ]

        def send(index: int, answer: Answer) -> None:
            senders[index].send(_response(answer), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        self.model.execute(plain, send)
        return None

    def finalize(self):
        self.guard.stop()
        self.model.unload()
