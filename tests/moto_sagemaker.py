"""UpdateEndpoint, which moto's SageMaker API lacks, emulated after the real API.

Real behaviour kept: the endpoint and the new configuration must exist, the endpoint must be InService,
and the endpoint answers `Updating` for a while before it is `InService` on the new configuration.
"""

from __future__ import annotations

import threading

from moto.core.responses import ActionResult
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.models import FakeEndpoint, SageMakerModelBackend
from moto.sagemaker.responses import SageMakerResponse

UPDATE_SECONDS = 0.5


def _backend_update_endpoint(self: SageMakerModelBackend, endpoint_name: str, endpoint_config_name: str):
    endpoint = self.endpoints.get(endpoint_name)
    if endpoint is None:
        arn = FakeEndpoint.arn_formatter(endpoint_name, self.account_id, self.region_name)
        raise ValidationError(message=f"Could not find endpoint '{arn}'.")
    if endpoint.endpoint_status != "InService":
        raise ValidationError(message=f"Cannot update in-progress endpoint '{endpoint.arn}'.")
    config = self.describe_endpoint_config(endpoint_config_name)  # raises ValidationError when missing
    endpoint.endpoint_status = "Updating"

    def finish() -> None:
        endpoint.endpoint_config_name = endpoint_config_name
        endpoint.production_variants = endpoint._process_production_variants(config["ProductionVariants"])
        endpoint.endpoint_status = "InService"

    threading.Timer(UPDATE_SECONDS, finish).start()
    return endpoint


def _response_update_endpoint(self: SageMakerResponse) -> ActionResult:
    endpoint = self.sagemaker_backend.update_endpoint(
        self._get_param("EndpointName"), self._get_param("EndpointConfigName")
    )
    return ActionResult({"EndpointArn": endpoint.arn})


def install() -> None:
    SageMakerModelBackend.update_endpoint = _backend_update_endpoint
    SageMakerResponse.update_endpoint = _response_update_endpoint
