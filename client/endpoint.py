"""SageMaker endpoints through boto3 `invoke_endpoint` with `TargetModel` (the AWS sample's call)."""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Dict, Optional

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from client.base import Client, ModelError, Result, binary_request, images_from_binary_response

log = logging.getLogger("client")
# Triton's binary tensor extension through SageMaker; the JSON header's size goes in the content type.
BINARY_JSON = "application/vnd.sagemaker-triton.binary+json"
# A cold model is downloaded and loaded on its first request: wait, then retry what says "not yet".
RETRYABLE = {
    "ModelNotReadyException",
    "ServiceUnavailable",
    "ThrottlingException",
    "InternalDependencyException",
}


class EndpointClient(Client):
    def __init__(
        self,
        endpoint_name: str,
        endpoint_url: Optional[str] = None,
        region: Optional[str] = None,
        retries: int = 5,
        read_timeout: float = 900.0,
        binary: bool = False,
        model_version: Optional[str] = None,
    ):
        config = Config(read_timeout=read_timeout, retries={"max_attempts": 3, "mode": "adaptive"})
        session = boto3.Session(region_name=region)
        if endpoint_url:
            # A local endpoint (the local MME) checks no signature: it needs no AWS account set up.
            region = session.region_name or "us-east-1"
            if session.get_credentials() is None:
                config = config.merge(Config(signature_version=UNSIGNED))
        self.runtime = session.client(
            "sagemaker-runtime", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self.endpoint_name, self.retries, self.binary = endpoint_name, retries, binary
        self.suffix = f"-{model_version}.tar.gz" if model_version else ".tar.gz"  # as `make upload VERSION=`

    def infer(self, model: str, body: Dict[str, Any]) -> Dict[str, Any]:
        response = self._invoke(model, json.dumps(body).encode(), "application/json")
        return json.loads(response["Body"].read())

    def infer_binary(self, model: str, body: Dict[str, Any]) -> Result:
        data, header_size = binary_request(body)
        response = self._invoke(model, data, f"{BINARY_JSON};json-header-size={header_size}")
        content_type = response.get("ContentType", "")
        match = re.search(r"json-header-size=(\d+)", content_type)
        return images_from_binary_response(response["Body"].read(), int(match.group(1)) if match else None)

    def _invoke(self, model: str, data: bytes, content_type: str) -> Dict[str, Any]:
        attempt = 0
        while True:
            try:
                return self.runtime.invoke_endpoint(
                    EndpointName=self.endpoint_name,
                    TargetModel=f"{model}{self.suffix}",
                    ContentType=content_type,
                    Accept=content_type.split(";")[0],
                    Body=data,
                )
            except ClientError as e:
                code = e.response["Error"]["Code"]
                if code == "ModelError":
                    status = int(e.response.get("OriginalStatusCode") or 500)
                    raise ModelError(status, e.response.get("OriginalMessage") or str(e)) from None
                if code in RETRYABLE and attempt < self.retries:
                    delay = min(2**attempt, 30)
                    log.warning("%s from %s, retrying in %ds", code, model, delay)
                    time.sleep(delay)
                    attempt += 1
                    continue
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
                raise ModelError(status, f"{code}: {e.response['Error'].get('Message', '')}") from None
