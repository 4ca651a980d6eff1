"""UpdateEndpoint, which moto's SageMaker API lacks, emulated after the real API.

Real behaviour kept: the endpoint and the new configuration must exist, the endpoint must be InService,
and the endpoint answers `Updating` for a while before it is `InService` on the new configuration. A
variant registered as an Application Auto Scaling target cannot change instance type (the real API
refuses: deregister it first). With RetainAllVariantProperties the variants keep their current
instance counts (what autoscaling set); without it they take the new configuration's.
"""

from __future__ import annotations

import threading

from moto.core.responses import ActionResult
from moto.sagemaker.exceptions import ValidationError
from moto.sagemaker.models import FakeEndpoint, SageMakerModelBackend
from moto.sagemaker.responses import SageMakerResponse

UPDATE_SECONDS = 0.5


def _scalable_variants(account_id: str, region: str, endpoint_name: str) -> set:
    from moto.applicationautoscaling.models import applicationautoscaling_backends

    targets = applicationautoscaling_backends[account_id][region].targets
    prefix = f"endpoint/{endpoint_name}/variant/"
    return {
        resource[len(prefix) :]
        for dimension in targets.values()
        for resource in dimension
        if resource.startswith(prefix)
    }


def _backend_update_endpoint(
    self: SageMakerModelBackend, endpoint_name: str, endpoint_config_name: str, retain: bool = False
):
    endpoint = self.endpoints.get(endpoint_name)
    if endpoint is None:
        arn = FakeEndpoint.arn_formatter(endpoint_name, self.account_id, self.region_name)
        raise ValidationError(message=f"Could not find endpoint '{arn}'.")
    if endpoint.endpoint_status != "InService":
        raise ValidationError(message=f"Cannot update in-progress endpoint '{endpoint.arn}'.")
    config = self.describe_endpoint_config(endpoint_config_name)  # raises ValidationError when missing
    old_types = {
        v["VariantName"]: v.get("InstanceType")
        for v in self.describe_endpoint_config(endpoint.endpoint_config_name)["ProductionVariants"]
    }
    scaled = _scalable_variants(self.account_id, self.region_name, endpoint_name)
    changed = sorted(
        v["VariantName"]
        for v in config["ProductionVariants"]
        if v["VariantName"] in scaled and v.get("InstanceType") != old_types.get(v["VariantName"])
    )
    if changed:
        raise ValidationError(
            message=f'The variant(s) "{changed}" must be deregistered as scalable targets with AWS '
            "Application Auto Scaling before they can be removed or have their instance type updated."
        )
    current = {v["VariantName"]: v for v in endpoint.production_variants}
    endpoint.endpoint_status = "Updating"

    def finish() -> None:
        endpoint.endpoint_config_name = endpoint_config_name
        variants = endpoint._process_production_variants(config["ProductionVariants"])
        for variant in variants if retain else []:
            old = current.get(variant["VariantName"], {})
            for key in ("CurrentInstanceCount", "DesiredInstanceCount"):
                if key in old:
                    variant[key] = old[key]
        endpoint.production_variants = variants
        endpoint.endpoint_status = "InService"

    threading.Timer(UPDATE_SECONDS, finish).start()
    return endpoint


def _response_update_endpoint(self: SageMakerResponse) -> ActionResult:
    endpoint = self.sagemaker_backend.update_endpoint(
        self._get_param("EndpointName"),
        self._get_param("EndpointConfigName"),
        bool(self._get_param("RetainAllVariantProperties")),
    )
    return ActionResult({"EndpointArn": endpoint.arn})


def install() -> None:
    SageMakerModelBackend.update_endpoint = _backend_update_endpoint
    SageMakerResponse.update_endpoint = _response_update_endpoint
