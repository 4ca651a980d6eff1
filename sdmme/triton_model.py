"""The one TritonPythonModel implementation; each model.py subclasses it and names its spec."""

from __future__ import annotations

import gc
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from sdmme import batching, images, pipelines
from sdmme.spec import MODELS, InvalidInput

log = logging.getLogger("sdmme")


def _error(message: str, code=None):
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


class DiffusionModel:
    spec_name: str  # set by each model.py

    def initialize(self, args):
        if not log.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        self.spec = MODELS[self.spec_name]
        device, dtype = pipelines.device_for(args["model_instance_kind"], args["model_instance_device_id"])
        self.device = device
        # args["model_repository"] is the model's own folder, also under SageMaker where the name differs.
        weights = Path(args["model_repository"]) / args["model_version"] / "weights"
        start = time.monotonic()
        try:
            self.runner = pipelines.Runner(pipelines.load(self.spec, weights, device, dtype))
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:
            # SageMaker answers a load failure saying "out of memory" with 507: it evicts models, retries.
            raise RuntimeError(f"out of memory loading {self.spec.name}: {e}") from e
        log.info("%s (%s): ready in %.1fs", self.spec.name, args["model_name"], time.monotonic() - start)

    def execute(self, requests):
        responses = [None] * len(requests)
        jobs = []
        for i, request in enumerate(requests):
            inputs = {t.name(): t.as_numpy() for t in request.inputs()}
            try:
                jobs.append(batching.parse(self.spec, i, inputs))
            except InvalidInput as e:
                responses[i] = _error(str(e), pb_utils.TritonError.INVALID_ARG)
        for group, outcome in batching.execute(self.runner, jobs, self.spec.name):
            if isinstance(outcome, Exception):
                if isinstance(outcome, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                    message = "out of memory; retry with fewer images or a smaller size"
                else:
                    message = f"generation failed: {type(outcome).__name__}: {outcome}"
                for job in group:
                    responses[job.index] = _error(message)
                continue
            for job, generated in zip(group, outcome):
                encoded = [
                    images.encode(im, job.args["output_format"], job.args["quality"]) for im in generated
                ]
                tensor = pb_utils.Tensor("generated_image", np.array([encoded], dtype=np.object_))
                responses[job.index] = pb_utils.InferenceResponse(output_tensors=[tensor])
        return responses

    def finalize(self):
        del self.runner
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("%s: unloaded", self.spec.name)
