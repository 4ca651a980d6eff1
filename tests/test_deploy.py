"""make deploy / make teardown against moto's SageMaker API (a real HTTP server)."""

import json
import subprocess
import sys

import boto3
import pytest
from helpers import ROOT, remove_bucket

from deploy.aws import containers, sagemaker, upload
from deploy.aws.upload import ENV_KEY, PYTHON_KEY, SHA_KEY

BUCKET, PREFIX, ROLE = "deploy-models", "sd/v2", "arn:aws:iam::123456789012:role/sd-mme"
# moto's SageMaker API refuses ml.g5.* (the real default); any type it knows exercises the same calls.
MOTO_INSTANCE = "ml.m5.xlarge"


@pytest.fixture()
def archives(aws):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for model in ("sd_base", "sd_depth"):
        s3.put_object(
            Bucket=BUCKET,
            Key=f"{PREFIX}/{model}.tar.gz",
            Body=b"archive",
            Metadata={SHA_KEY: "0", PYTHON_KEY: containers.python_for(containers.DEFAULT_TAG)},
        )
    yield s3
    remove_bucket(s3, BUCKET)


def settings(**changes):
    values = dict(
        name="sd-test",
        bucket=BUCKET,
        prefix=PREFIX,
        role_arn=ROLE,
        region="us-east-1",
        instance_type=MOTO_INSTANCE,
    )
    values.update(changes)
    return sagemaker.Settings(**values)


def test_image_table():
    assert containers.python_for("24.09") == "3.10" and containers.python_for("24.11") == "3.12"
    assert containers.python_for("23.02") == "3.8" and containers.python_for("25.04") == "3.12"
    assert containers.image_uri("eu-west-1") == (
        "763104351884.dkr.ecr.eu-west-1.amazonaws.com/sagemaker-tritonserver:25.04-py3"
    )
    # regions whose registry is not the deep-learning-containers account, and the China partition
    assert containers.image_uri("af-south-1").startswith("626614931356.dkr.ecr.af-south-1.amazonaws.com/")
    assert containers.image_uri("ap-east-1").startswith("871362719292.dkr.ecr.ap-east-1.amazonaws.com/")
    assert containers.image_uri("me-south-1").startswith("217643126080.dkr.ecr.me-south-1.amazonaws.com/")
    assert containers.image_uri("cn-north-1", "24.05") == (
        "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/sagemaker-tritonserver:24.05-py3"
    )
    with pytest.raises(ValueError, match="not published in xx-east-9 .* regions: af-south-1"):
        containers.image_uri("xx-east-9")
    assert sagemaker.Settings("n", "b", "p", "r", "us-east-1").instance_type == "ml.g5.xlarge"


def test_deploy_update_autoscale_and_teardown(archives, capsys):
    sm = boto3.client("sagemaker")
    first = sagemaker.deploy(settings(), poll=0)
    endpoint = sm.describe_endpoint(EndpointName="sd-test")
    assert (
        endpoint["EndpointStatus"] == "InService"
        and endpoint["EndpointConfigName"] == first["endpoint_config"]
    )
    container = sm.describe_model(ModelName=first["model"])["PrimaryContainer"]
    assert container["Mode"] == "MultiModel" and container["ModelDataUrl"] == f"s3://{BUCKET}/{PREFIX}/"
    assert container["Image"].endswith("sagemaker-tritonserver:25.04-py3")
    assert container["Environment"]["SAGEMAKER_TRITON_SHM_DEFAULT_BYTE_SIZE"] == "16777216"
    assert container["Environment"]["SDMME_ADAPTERS"] == f"s3://{BUCKET}/{PREFIX}/adapters/"  # make upload's
    assert "SAGEMAKER_TRITON_ALLOW_METRICS" not in container["Environment"]  # as SageMaker: off

    update = settings(instance_count=2, min_instances=1, max_instances=3, metrics=True)  # METRICS=1
    second = sagemaker.deploy(update, poll=0.1)
    endpoint = sm.describe_endpoint(EndpointName="sd-test")
    assert endpoint["EndpointConfigName"] == second["endpoint_config"] != first["endpoint_config"]
    environment = sm.describe_model(ModelName=second["model"])["PrimaryContainer"]["Environment"]
    assert environment["SAGEMAKER_TRITON_ALLOW_METRICS"] == "true"
    assert 23000 <= int(environment["SAGEMAKER_TRITON_METRICS_PORT"]) <= 23999
    assert "endpoint sd-test: Updating" in capsys.readouterr().err  # waited through the update
    variant = sm.describe_endpoint_config(EndpointConfigName=second["endpoint_config"])["ProductionVariants"][
        0
    ]
    assert variant["InitialInstanceCount"] == 2
    names = [c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]]
    assert first["endpoint_config"] not in names  # the replaced configuration and model are removed
    aas = boto3.client("application-autoscaling")
    target = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"][0]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 3)
    policy = aas.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"][0]
    assert policy["PolicyType"] == "TargetTrackingScaling"

    sagemaker.teardown("sd-test", "us-east-1")
    assert not sm.list_endpoints()["Endpoints"]
    assert not [
        c
        for c in sm.list_endpoint_configs()["EndpointConfigs"]
        if c["EndpointConfigName"].startswith("sd-test")
    ]
    assert not [m for m in sm.list_models()["Models"] if m["ModelName"].startswith("sd-test")]
    assert not aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]


def test_slim_archives_need_the_image_that_carries_their_environment(archives):
    python = containers.python_for(containers.DEFAULT_TAG)
    archives.put_object(
        Bucket=BUCKET,
        Key=f"{PREFIX}/my_style.tar.gz",
        Body=b"x",
        Metadata={SHA_KEY: "1", PYTHON_KEY: python, ENV_KEY: "/opt/sdmme/sd_env"},
    )
    with pytest.raises(sagemaker.DeployError, match="(?s)no image was given.*my_style.tar.gz .*make image"):
        sagemaker.deploy(settings(), poll=0)
    assert not boto3.client("sagemaker").list_models()["Models"]  # nothing was created
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sdmme:25.04"
    created = sagemaker.deploy(settings(image_uri=image), poll=0)
    container = boto3.client("sagemaker").describe_model(ModelName=created["model"])["PrimaryContainer"]
    assert container["Image"] == image
    sagemaker.teardown("sd-test", "us-east-1")


def test_deploy_refuses_archives_with_another_python(archives):
    archives.put_object(
        Bucket=BUCKET, Key=f"{PREFIX}/sd_upscale.tar.gz", Body=b"x", Metadata={PYTHON_KEY: "3.11"}
    )
    with pytest.raises(sagemaker.DeployError) as e:
        sagemaker.deploy(settings(), poll=0)
    message = str(e.value)
    assert "runs Python 3.12" in message and "sd_upscale.tar.gz: environment Python 3.11" in message
    assert "Fix:" in message
    assert not boto3.client("sagemaker").list_models()["Models"]  # nothing was created


def test_deploy_refuses_an_empty_prefix(aws):
    boto3.client("s3").create_bucket(Bucket="empty-models")
    with pytest.raises(sagemaker.DeployError, match="no model archives under s3://empty-models/none/"):
        sagemaker.deploy(settings(bucket="empty-models", prefix="none"), poll=0)


def test_iam_policy_reads_only_the_prefix():
    out = subprocess.run(
        [sys.executable, "-m", "deploy.aws.sagemaker", "iam-policy", "--bucket", "b", "--prefix", "p/q"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    statements = {s["Sid"]: s for s in json.loads(out)["Statement"]}
    read = statements["ReadModelArchivesAndAdapters"]
    # adapters are under the prefix (s3://b/p/q/adapters/<model>/), read and listed by the same grants
    assert read["Resource"] == ["arn:aws:s3:::b/p/q/*"] and read["Action"] == ["s3:GetObject"]
    assert upload.adapters_root("b", "p/q").startswith("s3://b/p/q/")
    assert statements["ListModelPrefix"]["Condition"]["StringLike"]["s3:prefix"] == ["p/q/*"]
    assert not any("s3:PutObject" in s["Action"] for s in statements.values())


def test_endpoints_sharing_a_name_prefix_never_touch_each_other(archives):
    sm = boto3.client("sagemaker")
    ours = sagemaker.deploy(settings(name="sd-mme"), poll=0)
    theirs = sagemaker.deploy(settings(name="sd-mme-staging"), poll=0)
    again = sagemaker.deploy(settings(name="sd-mme"), poll=0.1)  # removes sd-mme's old model and config only
    configs = {c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]}
    assert theirs["endpoint_config"] in configs and ours["endpoint_config"] not in configs
    sagemaker.teardown("sd-mme", "us-east-1")
    assert [e["EndpointName"] for e in sm.list_endpoints()["Endpoints"]] == ["sd-mme-staging"]
    assert {m["ModelName"] for m in sm.list_models()["Models"]} == {theirs["model"]}
    assert {c["EndpointConfigName"] for c in sm.list_endpoint_configs()["EndpointConfigs"]} == {
        theirs["endpoint_config"]
    }
    assert again["model"] != theirs["model"]
    sagemaker.teardown("sd-mme-staging", "us-east-1")


def autoscaled_to(count: int) -> None:
    """What Application Auto Scaling does to a busy endpoint: more instances than configured."""
    from moto.sagemaker.models import sagemaker_backends

    endpoint = sagemaker_backends["123456789012"]["us-east-1"].endpoints["sd-test"]
    endpoint.production_variants[0].update(CurrentInstanceCount=count, DesiredInstanceCount=count)


def test_redeploying_an_autoscaled_endpoint_follows_the_api_rules(archives, capsys):
    sm, aas = boto3.client("sagemaker"), boto3.client("application-autoscaling")
    sagemaker.deploy(settings(instance_count=1, min_instances=1, max_instances=4), poll=0)
    autoscaled_to(3)
    sagemaker.deploy(settings(instance_count=1), poll=0.1)  # new model, same type
    variant = sm.describe_endpoint(EndpointName="sd-test")["ProductionVariants"][0]
    assert variant["DesiredInstanceCount"] == 3  # not reset to INSTANCE_COUNT
    assert "autoscaled instance count kept" in capsys.readouterr().err

    # the real API refuses a new instance type while the variant is a scalable target...
    config = sm.describe_endpoint(EndpointName="sd-test")["EndpointConfigName"]
    variants = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
    sm.create_endpoint_config(
        EndpointConfigName="sd-test-manual",
        ProductionVariants=[dict(variants[0], InstanceType="ml.c5.xlarge")],
    )
    with pytest.raises(sm.exceptions.ClientError, match="must be deregistered as scalable targets"):
        sm.update_endpoint(EndpointName="sd-test", EndpointConfigName="sd-test-manual")
    sm.delete_endpoint_config(EndpointConfigName="sd-test-manual")
    # ...so deploy deregisters, updates, and registers the old bounds again
    sagemaker.deploy(settings(instance_type="ml.c5.xlarge"), poll=0.1)
    assert "autoscaling removed for the update, restored after" in capsys.readouterr().err
    config = sm.describe_endpoint(EndpointName="sd-test")["EndpointConfigName"]
    assert sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"][0][
        "InstanceType"
    ] == ("ml.c5.xlarge")
    target = aas.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"][0]
    assert (target["MinCapacity"], target["MaxCapacity"]) == (1, 4)
    sagemaker.teardown("sd-test", "us-east-1")
