"""Clients for the four models: Triton HTTP (`TritonClient`) and SageMaker endpoints (`EndpointClient`).

Each transport's client imports its library (tritonclient, boto3) when first named, so `client.base`
needs Pillow alone: bench/served.py runs on a GPU machine that has neither.
"""

import importlib

from client.base import Client, ModelError

_TRANSPORTS = {"EndpointClient": "client.endpoint", "TritonClient": "client.triton"}
__all__ = ["Client", "EndpointClient", "ModelError", "TritonClient"]


def __getattr__(name: str):
    if name in _TRANSPORTS:
        return getattr(importlib.import_module(_TRANSPORTS[name]), name)
    raise AttributeError(f"module 'client' has no attribute {name!r}")
