"""Clients for the four models: Triton HTTP (`TritonClient`) and SageMaker endpoints (`EndpointClient`)."""

from client.base import Client, ModelError
from client.endpoint import EndpointClient
from client.triton import TritonClient

__all__ = ["Client", "EndpointClient", "ModelError", "TritonClient"]
