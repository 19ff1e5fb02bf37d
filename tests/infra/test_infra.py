"""infra/: the files users apply to real clusters parse, and mean what they say."""

import json
import re

import boto3
import yaml

from pipeline.config import load_config
from tests.conftest import BUCKET, REPO

INFRA = REPO / "infra"


def test_the_400m_run_config_is_a_valid_clipline_config():
    config = load_config(INFRA / "run-400m.yaml")
    assert config.out.startswith("s3://") and config.shard.samples_per_shard == 10_000
    assert config.filter.rules().caption_junk


def test_cluster_launcher_and_rayjob_describe_cpu_and_gpu_workers_with_token_auth():
    cluster = yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())
    assert {"head", "cpu-worker", "gpu-worker"} <= set(cluster["available_node_types"])
    assert any("RAY_AUTH_MODE=token" in o for o in cluster["docker"]["run_options"])
    job = yaml.safe_load((INFRA / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("python -m pipeline run --config")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert "nvidia.com/gpu" in groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    env = {
        e["name"] for e in job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "AWS_ACCESS_KEY_ID"} <= env
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "ARG RAY_IMAGE=rayproject/ray:2.60.0-py311" in dockerfile and "FROM ${RAY_IMAGE}" in dockerfile
    assert 'if [ "$VARIANT" = gpu ]' in dockerfile and "-t clipline:gpu" in dockerfile
    # every image the cluster files run is one the Dockerfile builds: clipline:latest (CPU) or clipline:gpu
    images = re.findall(
        r"image:\s*(\S+)", (INFRA / "ray-cluster-aws.yaml").read_text() + (INFRA / "rayjob.yaml").read_text()
    )
    assert images and {i.rsplit("/", 1)[-1] for i in images} == {"clipline:latest", "clipline:gpu"}
    assert cluster["available_node_types"]["gpu-worker"]["docker"]["worker_image"].endswith("clipline:gpu")


def test_the_lifecycle_rule_is_accepted_by_the_s3_endpoint(s3):
    rule = json.loads((INFRA / "s3-lifecycle.json").read_text())
    client = boto3.client("s3", endpoint_url=s3, region_name="us-east-1")
    client.put_bucket_lifecycle_configuration(Bucket=BUCKET, LifecycleConfiguration=rule)
    got = client.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]
    assert got[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 2
    client.delete_bucket_lifecycle(Bucket=BUCKET)
