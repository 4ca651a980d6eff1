"""`make deploy` / `make teardown`: the SageMaker model, endpoint configuration and endpoint of the MME.

Models and endpoint configurations are immutable in SageMaker: each deploy creates new ones named
`<name>-<timestamp>-<4 hex>` and points the endpoint at them (create, or update in place), then removes the
ones the endpoint no longer uses. Every archive under the prefix is checked before anything is created.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import boto3

from deploy.aws import containers, upload
from deploy.aws.upload import ENV_KEY, PYTHON_KEY
from deploy.local.mme.frontend import ALLOW_METRICS, METRICS_PORT
from sdmme import adapters

VARIANT = "AllTraffic"
TAG = "sdmme-endpoint"  # on every model, configuration and endpoint deploy creates: the endpoint name
# The Python backend's shared memory, as SageMaker's Triton container reads it for every model.
ENVIRONMENT = {
    "SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE": "16777216",
    "SAGEMAKER_TRITON_SHM_GROWTH_BYTE_SIZE": "1048576",
    "SAGEMAKER_TRITON_PING_MODE": "live",
}


# make deploy METRICS=1: SageMaker's Triton launcher then starts the metrics port, in the port range
# SageMaker allows a container (23000-23999); only processes inside the container can reach it.
METRICS_ENVIRONMENT = {ALLOW_METRICS: "true", METRICS_PORT: "23000"}


class DeployError(Exception):
    pass


@dataclass
class Settings:
    name: str
    bucket: str
    prefix: str
    role_arn: str
    region: str
    image_tag: str = containers.DEFAULT_TAG
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    min_instances: Optional[int] = None  # autoscaling when both are set
    max_instances: Optional[int] = None
    invocations_per_instance: float = 20.0  # target-tracking target, per instance per minute
    image_uri: Optional[str] = None  # an image of `make image` (slim archives); default SageMaker's own
    metrics: bool = False  # Triton's metrics port on inside the container (docs/operating.md)

    @property
    def model_data_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}/"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_archives(s3, settings: Settings) -> List[str]:
    """Each archive's env Python (recorded at packaging) must equal the image's."""
    wanted = containers.python_for(settings.image_tag)
    prefix = settings.prefix.strip("/") + "/"
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket, Prefix=prefix)
        for o in page.get("Contents", [])
        if o["Key"].endswith(".tar.gz")
    ]
    if not keys:
        raise DeployError(
            f"no model archives under {settings.model_data_url}: run `make package upload` first"
        )
    problems, slim = [], []
    for key in keys:
        metadata = s3.head_object(Bucket=settings.bucket, Key=key)["Metadata"]
        python = metadata.get(PYTHON_KEY)
        if python != wanted:
            problems.append(f"{key}: environment Python {python or 'unknown (not uploaded by make upload)'}")
        if metadata.get(ENV_KEY, "bundled") != "bundled":
            slim.append(f"{key} (environment at {metadata[ENV_KEY]})")
    if slim and not settings.image_uri:
        raise DeployError(
            "slim archives run in an environment baked into the image, but no image was given:\n  "
            + "\n  ".join(slim)
            + "\nFix: `make image IMAGE_URI=...` (docker/Dockerfile), then `make deploy IMAGE_URI=...`; or "
            "`make package upload` self-contained archives."
        )
    if problems:
        raise DeployError(
            f"sagemaker-tritonserver:{settings.image_tag}-py3 runs Python {wanted}, but:\n  "
            + "\n  ".join(problems)
            + f"\nFix: build the environment for Python {wanted} (python={wanted} in environment.yml, "
            "`make env ENV_BUILDER=conda`), then `make package upload`; or use an image tag with that Python."
        )
    return [key[len(prefix) :] for key in keys]


def wait_in_service(sm, name: str, poll: float = 30.0, timeout: float = 3600.0) -> None:
    start = time.monotonic()
    last = None
    while True:
        description = sm.describe_endpoint(EndpointName=name)
        status = description["EndpointStatus"]
        if status != last:
            say(f"endpoint {name}: {status} ({time.monotonic() - start:.0f}s)")
            last = status
        if status == "InService":
            return
        if status in ("Failed", "RollingBack", "OutOfService"):
            raise DeployError(
                f"endpoint {name} is {status}: {description.get('FailureReason', 'no reason given')}"
            )
        if time.monotonic() - start > timeout:
            raise DeployError(f"endpoint {name} still {status} after {timeout:.0f}s")
        time.sleep(poll)


def deploy(settings: Settings, session: Optional[boto3.Session] = None, poll: float = 30.0) -> Dict[str, str]:
    session = session or boto3.Session(region_name=settings.region)
    s3, sm = session.client("s3"), session.client("sagemaker")
    models = check_archives(s3, settings)
    say(f"{len(models)} archive(s) under {settings.model_data_url}: {', '.join(models)}")
    # The time says when; the random part keeps two deploys in one second apart (SageMaker names are unique).
    stamp = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    model_name = config_name = f"{settings.name}-{stamp}"
    image = settings.image_uri or containers.image_uri(settings.region, settings.image_tag)
    sm.create_model(
        ModelName=model_name,
        ExecutionRoleArn=settings.role_arn,
        PrimaryContainer={
            "Image": image,
            "Mode": "MultiModel",
            "ModelDataUrl": settings.model_data_url,
            # Every model's adapters are under the prefix, where make upload puts them: live at once.
            "Environment": {
                **ENVIRONMENT,
                adapters.STORES_ENV: upload.adapters_root(settings.bucket, settings.prefix),
                **(METRICS_ENVIRONMENT if settings.metrics else {}),
            },
        },
        Tags=[{"Key": TAG, "Value": settings.name}],
    )
    say(f"model {model_name}: {image}, MultiModel, {settings.model_data_url}")
    sm.create_endpoint_config(
        EndpointConfigName=config_name,
        ProductionVariants=[
            {
                "VariantName": VARIANT,
                "ModelName": model_name,
                "InstanceType": settings.instance_type,
                "InitialInstanceCount": settings.instance_count,
            }
        ],
        Tags=[{"Key": TAG, "Value": settings.name}],
    )
    say(f"endpoint configuration {config_name}: {settings.instance_count} x {settings.instance_type}")
    previous = _endpoint(sm, settings.name)
    aas = session.client("application-autoscaling")
    if previous:
        _update(sm, aas, settings, previous, config_name)
    else:
        sm.create_endpoint(
            EndpointName=settings.name,
            EndpointConfigName=config_name,
            Tags=[{"Key": TAG, "Value": settings.name}],
        )
        say(f"creating endpoint {settings.name}")
    wait_in_service(sm, settings.name, poll)
    if settings.min_instances is not None and settings.max_instances is not None:
        autoscale(aas, settings)
    serving = sm.describe_endpoint(EndpointName=settings.name)["EndpointConfigName"]
    if serving != config_name:  # never delete what the endpoint may still be using
        raise DeployError(f"endpoint {settings.name} reports {serving}, not {config_name}; nothing removed")
    _remove_unused(sm, settings.name, keep_config=config_name, keep_model=model_name)
    return {"endpoint": settings.name, "endpoint_config": config_name, "model": model_name}


def _update(sm, aas, settings: Settings, previous: dict, config_name: str) -> None:
    """Update in place, following the real API's rules for autoscaled endpoints: the instance count
    autoscaling set is kept (RetainAllVariantProperties), and a new instance type needs the variant
    deregistered as a scalable target first (registered again after, with these or the old bounds)."""
    name = settings.name
    old_config = sm.describe_endpoint_config(EndpointConfigName=previous["EndpointConfigName"])
    old_type = old_config["ProductionVariants"][0].get("InstanceType")
    target = _scalable_target(aas, name)
    if target and old_type != settings.instance_type:
        _deregister(aas, name)
        say(f"{old_type} -> {settings.instance_type}: autoscaling removed for the update, restored after")
        if settings.min_instances is None:
            settings.min_instances, settings.max_instances = target["MinCapacity"], target["MaxCapacity"]
    retain = bool(target) and old_type == settings.instance_type
    sm.update_endpoint(EndpointName=name, EndpointConfigName=config_name, RetainAllVariantProperties=retain)
    kept = "; autoscaled instance count kept" if retain else ""
    say(f"updating endpoint {name} (was {previous['EndpointConfigName']}){kept}")


def _scalable_target(aas, name: str) -> Optional[dict]:
    resource = f"endpoint/{name}/variant/{VARIANT}"
    targets = aas.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])
    return (targets["ScalableTargets"] or [None])[0]


def _deregister(aas, name: str) -> None:
    aas.deregister_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=f"endpoint/{name}/variant/{VARIANT}",
        ScalableDimension="sagemaker:variant:DesiredInstanceCount",
    )


def autoscale(aas, settings: Settings) -> None:
    resource = f"endpoint/{settings.name}/variant/{VARIANT}"
    aas.register_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=resource,
        ScalableDimension="sagemaker:variant:DesiredInstanceCount",
        MinCapacity=settings.min_instances,
        MaxCapacity=settings.max_instances,
    )
    aas.put_scaling_policy(
        PolicyName=f"{settings.name}-invocations",
        ServiceNamespace="sagemaker",
        ResourceId=resource,
        ScalableDimension="sagemaker:variant:DesiredInstanceCount",
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": settings.invocations_per_instance,
            "PredefinedMetricSpecification": {
                "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
            },
            "ScaleInCooldown": 600,
            "ScaleOutCooldown": 300,
        },
    )
    say(
        f"autoscaling {resource}: {settings.min_instances}-{settings.max_instances} instances, "
        f"target {settings.invocations_per_instance:g} invocations per instance per minute"
    )


def _endpoint(sm, name: str) -> Optional[dict]:
    try:
        return sm.describe_endpoint(EndpointName=name)
    except sm.exceptions.ClientError as e:
        if "Could not find" in str(e) or e.response["Error"]["Code"] in (
            "ValidationException",
            "ResourceNotFound",
        ):
            return None
        raise


def _owned(sm, name: str) -> Dict[str, List[str]]:
    """Models and endpoint configurations deploy created for this endpoint: named `<name>-<stamp>`
    exactly (not `<name>-staging-<stamp>`, another endpoint's) and tagged with this endpoint's name."""
    pattern = re.compile(re.escape(name) + r"-\d{8}-\d{6}(-[0-9a-f]{4})?")  # earlier deploys: no suffix

    def ours(arn: str) -> bool:
        tags = sm.list_tags(ResourceArn=arn).get("Tags", [])
        return {"Key": TAG, "Value": name} in tags

    configs = [
        c["EndpointConfigName"]
        for page in sm.get_paginator("list_endpoint_configs").paginate(NameContains=f"{name}-")
        for c in page["EndpointConfigs"]
        if pattern.fullmatch(c["EndpointConfigName"]) and ours(c["EndpointConfigArn"])
    ]
    models = [
        m["ModelName"]
        for page in sm.get_paginator("list_models").paginate(NameContains=f"{name}-")
        for m in page["Models"]
        if pattern.fullmatch(m["ModelName"]) and ours(m["ModelArn"])
    ]
    return {"configs": configs, "models": models}


def _remove_unused(
    sm, name: str, keep_config: Optional[str] = None, keep_model: Optional[str] = None
) -> None:
    owned = _owned(sm, name)
    for config in owned["configs"]:
        if config != keep_config:
            sm.delete_endpoint_config(EndpointConfigName=config)
            say(f"deleted endpoint configuration {config}")
    for model in owned["models"]:
        if model != keep_model:
            sm.delete_model(ModelName=model)
            say(f"deleted model {model}")


def teardown(name: str, region: str, session: Optional[boto3.Session] = None) -> None:
    session = session or boto3.Session(region_name=region)
    sm, aas = session.client("sagemaker"), session.client("application-autoscaling")
    if _scalable_target(aas, name):
        _deregister(aas, name)
        say(f"removed autoscaling of endpoint/{name}/variant/{VARIANT}")
    if _endpoint(sm, name):
        sm.delete_endpoint(EndpointName=name)
        say(f"deleted endpoint {name}")
    _remove_unused(sm, name)


def iam_policy(bucket: str, prefix: str) -> dict:
    """Least privilege for the endpoint's execution role: read the one S3 prefix (plus what any SageMaker
    endpoint needs: pull the image, write its logs and metrics)."""
    prefix = prefix.strip("/")
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ReadModelArchivesAndAdapters",
                "Effect": "Allow",
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{prefix}/*"],
            },
            {
                "Sid": "ListModelPrefix",
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [f"arn:aws:s3:::{bucket}"],
                "Condition": {"StringLike": {"s3:prefix": [f"{prefix}/*"]}},
            },
            {
                "Sid": "PullTritonImage",
                "Effect": "Allow",
                "Action": ["ecr:GetAuthorizationToken", "ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
                "Resource": "*",
            },
            {
                "Sid": "LogsAndMetrics",
                "Effect": "Allow",
                "Action": [
                    "logs:CreateLogGroup",
                    "logs:CreateLogStream",
                    "logs:PutLogEvents",
                    "cloudwatch:PutMetricData",
                ],
                "Resource": "*",
            },
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("deploy", help="create or update the endpoint")
    up.add_argument("--bucket", required=True)
    up.add_argument("--prefix", default="sd-mme/models")
    up.add_argument("--role-arn", required=True, help="execution role (see `iam-policy` for its permissions)")
    up.add_argument("--image-tag", default=containers.DEFAULT_TAG)
    up.add_argument("--image-uri", help="an image of `make image` (needed by slim archives)")
    up.add_argument("--instance-type", default="ml.g5.xlarge")
    up.add_argument("--instance-count", type=int, default=1)
    up.add_argument("--min-instances", type=int)
    up.add_argument("--max-instances", type=int)
    up.add_argument("--invocations-per-instance", type=float, default=20.0)
    up.add_argument("--metrics", action="store_true", help="Triton's metrics port on in the container")
    down = sub.add_parser("teardown", help="delete what deploy created")
    policy = sub.add_parser("iam-policy", help="print the execution role's least-privilege policy")
    policy.add_argument("--bucket", required=True)
    policy.add_argument("--prefix", default="sd-mme/models")
    for p in (up, down):
        p.add_argument("--name", default="sd-mme")
        p.add_argument("--region", default=boto3.Session().region_name or "us-east-1")
    args = parser.parse_args()
    try:
        if args.command == "deploy":
            settings = Settings(
                args.name,
                args.bucket,
                args.prefix,
                args.role_arn,
                args.region,
                args.image_tag,
                args.instance_type,
                args.instance_count,
                args.min_instances,
                args.max_instances,
                args.invocations_per_instance,
                args.image_uri,
                args.metrics,
            )
            print(json.dumps(deploy(settings), indent=1))
        elif args.command == "teardown":
            teardown(args.name, args.region)
        else:
            print(json.dumps(iam_policy(args.bucket, args.prefix), indent=1))
    except DeployError as e:
        raise SystemExit(f"make {args.command}: {e}") from None


if __name__ == "__main__":
    main()
