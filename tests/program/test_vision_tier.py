"""The vision tier under Pulumi's mocks: staging turns it on for qwen3-vl-2b, dev and prod do not.

What AWS gets (an encrypted EFS file system reachable on NFS from the cluster security group
only, a mount target per private subnet, the EFS CSI add-on with its IRSA role) and what the
cluster gets (the ReadWriteMany claim, the connector ConfigMap, the encoder tier, its expiry
job, PodMonitor and ScaledObject), in the order they need each other."""

from __future__ import annotations

import pytest

from tests.support.harness import MOCK_CLUSTER_SECURITY_GROUP, StackRun, run_stack

EFS = "aws:efs/fileSystem:FileSystem"
ENCODER = "qwen3-vl-2b-encoder"


@pytest.fixture(scope="module")
def staging() -> StackRun:
    return run_stack("staging")


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_stacks_without_the_block_get_nothing_of_it(stack: str) -> None:
    run = run_stack(stack)
    assert run.of_type(EFS) == []
    assert not [r for r in run.kubernetes() if "encoder" in r.name or "vision" in r.name]


def test_efs_is_encrypted_and_reachable_only_from_the_nodes(staging: StackRun) -> None:
    (fs,) = staging.of_type(EFS)
    assert fs.inputs["encrypted"] is True
    assert fs.inputs["throughputMode"] == "elastic"
    group = staging.one("aws:ec2/securityGroup:SecurityGroup", "vision-cache-efs-sg")
    (rule,) = group.inputs["ingress"]
    assert (rule["protocol"], rule["fromPort"], rule["toPort"]) == ("tcp", 2049, 2049)
    assert rule["securityGroups"] == [MOCK_CLUSTER_SECURITY_GROUP]
    assert "cidrBlocks" not in rule
    mounts = staging.of_type("aws:efs/mountTarget:MountTarget")
    assert len(mounts) == 2  # one per private subnet (two AZs)


def test_the_csi_driver_is_an_eks_addon_with_its_own_role(staging: StackRun) -> None:
    addon = staging.one("aws:eks/addon:Addon", "vision-cache-aws-efs-csi-driver")
    assert addon.inputs["addonName"] == "aws-efs-csi-driver"
    assert addon.inputs["serviceAccountRoleArn"] == "arn:aws:mock:::Role/vision-cache-efs-csi-role"
    policy = staging.one(
        "aws:iam/rolePolicyAttachment:RolePolicyAttachment", "vision-cache-efs-csi-policy"
    )
    assert policy.inputs["policyArn"].endswith(":policy/service-role/AmazonEFSCSIDriverPolicy")
    role = staging.one("aws:iam/role:Role", "vision-cache-efs-csi-role")
    assert (
        "system:serviceaccount:kube-system:efs-csi-controller-sa" in role.inputs["assumeRolePolicy"]
    )


def test_the_claim_is_read_write_many_on_efs_after_the_driver(staging: StackRun) -> None:
    claim = staging.one("kubernetes:core/v1:PersistentVolumeClaim", "vision-cache-claim")
    assert claim.inputs["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim.inputs["spec"]["storageClassName"] == "efs-vision-cache"
    addon = staging.one("aws:eks/addon:Addon", "vision-cache-aws-efs-csi-driver")
    assert addon.urn in claim.dependencies
    sc = staging.one("kubernetes:storage.k8s.io/v1:StorageClass", "vision-cache-storage-class")
    assert sc.inputs["provisioner"] == "efs.csi.aws.com"
    assert sc.inputs["parameters"]["provisioningMode"] == "efs-ap"


def test_the_encoder_tier_waits_for_the_cache_and_the_connector(staging: StackRun) -> None:
    deployment = staging.one("kubernetes:apps/v1:Deployment", f"{ENCODER}-deployment")
    for name in ("vision-cache-claim", "vision-cache-connector"):
        needed = next(r for r in staging.kubernetes() if r.name == name)
        assert needed.urn in deployment.dependencies
    # KEDA scales it on its own queue; Pulumi leaves the replica count alone
    assert deployment.ignore_changes == ["spec.replicas"]
    scaled = staging.one("kubernetes:keda.sh/v1alpha1:ScaledObject", f"{ENCODER}-scaledobject")
    assert scaled.inputs["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": ENCODER,
    }
    trigger = scaled.inputs["spec"]["triggers"][0]["metadata"]["query"]
    assert trigger == 'sum(vllm:num_requests_waiting{job="vllm-encoder",deployment="qwen3-vl-2b"})'
    staging.one("kubernetes:monitoring.coreos.com/v1:PodMonitor", f"{ENCODER}-podmonitor")
    staging.one("kubernetes:batch/v1:CronJob", f"{ENCODER}-expiry")


def test_the_connector_configmap_holds_the_module_the_engines_import(staging: StackRun) -> None:
    configmap = staging.one("kubernetes:core/v1:ConfigMap", "vision-cache-connector")
    assert list(configmap.inputs["data"]) == ["qwen_vl_ec_connector.py"]
    assert "class AtomicFileECConnector(" in configmap.inputs["data"]["qwen_vl_ec_connector.py"]
