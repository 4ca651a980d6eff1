"""Triton's own HTTP/REST API, through tritonclient.http."""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from client.base import BASE64, FILES, Client, ModelError, binary_inputs


class TritonClient(Client):
    """Not thread-safe (tritonclient's gevent HTTP client is not): use one per process, or raw HTTP."""

    def __init__(self, url: str = "127.0.0.1:8000", timeout: float = 600.0, binary: bool = False):
        self.triton = httpclient.InferenceServerClient(
            url, connection_timeout=timeout, network_timeout=timeout
        )
        self.binary = binary

    def infer_binary(self, model: str, body: Dict[str, Any]) -> List[bytes]:
        outputs = [httpclient.InferRequestedOutput(FILES, binary_data=True)]
        try:
            result = self.triton.infer(model, binary_inputs(body), outputs=outputs)
        except InferenceServerException as e:
            raise ModelError(int(e.status() or 500), e.message()) from None
        return list(result.as_numpy(FILES).reshape(-1))

    def infer(self, model: str, body: Dict[str, Any]) -> Dict[str, Any]:
        inputs = []
        for item in body["inputs"]:
            tensor = httpclient.InferInput(item["name"], item["shape"], item["datatype"])
            tensor.set_data_from_numpy(
                np.array(item["data"], dtype=np.object_).reshape(item["shape"]), binary_data=False
            )
            inputs.append(tensor)
        outputs = [httpclient.InferRequestedOutput(BASE64, binary_data=False)]
        try:
            return self.triton.infer(model, inputs, outputs=outputs).get_response()
        except InferenceServerException as e:
            raise ModelError(int(e.status() or 500), e.message()) from None
