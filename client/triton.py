"""Triton's own HTTP/REST API, through tritonclient.http."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from client.base import (
    Client,
    ModelError,
    Result,
    binary_inputs,
    binary_outputs,
    images_from_result,
)
from sdmme.spec import BASE64


class TritonClient(Client):
    """Not thread-safe (tritonclient's gevent HTTP client is not): use one per process, or raw HTTP."""

    def __init__(self, url: str = "127.0.0.1:8000", timeout: float = 600.0, binary: bool = False):
        self.triton = httpclient.InferenceServerClient(
            url, connection_timeout=timeout, network_timeout=timeout
        )
        self.binary = binary

    def close(self) -> None:
        """Its connections, now rather than when collected (from a thread, gevent's finaliser complains)."""
        self.triton.close()

    def infer_binary(self, model: str, body: Dict[str, Any]) -> Result:
        try:
            result = self.triton.infer(model, binary_inputs(body), outputs=binary_outputs())
        except InferenceServerException as e:
            raise ModelError(int(e.status() or 500), e.message()) from None
        return images_from_result(result)

    def infer(self, model: str, body: Dict[str, Any]) -> Dict[str, Any]:
        inputs = []
        for item in body["inputs"]:
            tensor = httpclient.InferInput(item["name"], item["shape"], item["datatype"])
            tensor.set_data_from_numpy(
                np.array(item["data"], dtype=np.object_).reshape(item["shape"]), binary_data=False
            )
            inputs.append(tensor)
        names = [o["name"] for o in body.get("outputs", [{"name": BASE64}])]
        outputs = [httpclient.InferRequestedOutput(name, binary_data=False) for name in names]
        try:
            return self.triton.infer(model, inputs, outputs=outputs).get_response()
        except InferenceServerException as e:
            raise ModelError(int(e.status() or 500), e.message()) from None
