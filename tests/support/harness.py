"""Runs the real Pulumi program for a stack under mocks and records every resource.

No CLI, plugin, cloud or network is involved: the stack file's config is fed to
the SDK as the engine would, `__main__.py` runs unchanged, and a recording
monitor keeps each registration's inputs AND resource options (protect,
dependencies, parent, provider, retainOnDelete, ...), which `Mocks.new_resource`
alone cannot see (docs/reference/toolchain.md#mock-resource-options).
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import config as runtime_config
from pulumi.runtime import mocks
from pulumi.runtime.settings import get_root_resource, set_root_resource

from stacks.schema import PROJECT

ROOT = Path(__file__).resolve().parents[2]
MOCK_SECRET = "mock-secret-value"


def ints(value: Any) -> Any:
    """Protobuf Structs carry every number as a float; turn integral ones back into ints."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {k: ints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [ints(v) for v in value]
    return value


@dataclass
class Resource:
    """One registered resource: what the program passed in, and how."""

    type: str
    name: str
    inputs: dict[str, Any]
    custom: bool
    urn: str = ""
    parent: str = ""
    provider: str = ""
    protect: bool = False
    retain_on_delete: bool = False
    delete_before_replace: bool = False
    dependencies: list[str] = field(default_factory=list)
    ignore_changes: list[str] = field(default_factory=list)
    additional_secret_outputs: list[str] = field(default_factory=list)


class StackMocks(pulumi.runtime.Mocks):
    """Echo inputs back as outputs, with the few computed outputs the program reads."""

    def __init__(self, resources: dict[tuple[str, str], Resource]) -> None:
        self.resources = resources

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        inputs = ints(dict(args.inputs))
        self.resources[(args.typ, args.name)] = Resource(
            args.typ, args.name, inputs, bool(args.custom)
        )
        state = {**inputs, **computed_outputs(args.typ, args.name, inputs)}
        return f"{args.name}-id", state

    def call(
        self, args: pulumi.runtime.MockCallArgs
    ) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
        # No check failures: the MockMonitor iterates this list, so it must not be None.
        return invoke_result(args.token, ints(dict(args.args))), []


def computed_outputs(typ: str, name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Outputs the cloud would compute that the program uses (ARNs, endpoints, ids)."""
    computed: dict[str, Any] = {"arn": f"arn:aws:mock:::{typ.split(':')[-1]}/{name}"}
    if typ == "random:index/randomPassword:RandomPassword":
        # Rendered files (Redis ACL hashes, connection URLs) need a value to compute from.
        computed["result"] = mock_password(name)
    return computed | eks_outputs(typ, name, inputs) | service_outputs(typ, inputs)


def mock_password(name: str) -> str:
    """What the mocks generate for the RandomPassword named `name` (tests recompute from it)."""
    return f"mock{name.replace('-', '')}"


MOCK_ACCOUNT = "123456789012"
MOCK_CLUSTER_CA = "bW9jay1jbHVzdGVyLWNh"  # base64("mock-cluster-ca")
MOCK_CLUSTER_SECURITY_GROUP = "sg-0mockcluster"
MOCK_EXISTING_CLUSTER_VERSION = "1.33"


def mock_cluster_endpoint(cluster: str) -> str:
    return f"https://{cluster}.mock.eks.amazonaws.com"


def mock_oidc_issuer(cluster: str) -> str:
    return f"https://oidc.eks.mock.amazonaws.com/id/{cluster}"


def mock_asg_name(node_group: str) -> str:
    return f"eks-{node_group}-asg"


def eks_outputs(typ: str, name: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """What EKS and EC2 compute for the platform's resources (endpoint, CA, OIDC issuer, ASG)."""
    if typ == "aws:eks/cluster:Cluster":
        cluster = inputs.get("name", name)
        return {
            "endpoint": mock_cluster_endpoint(cluster),
            "certificateAuthority": {"data": MOCK_CLUSTER_CA},
            "identities": [{"oidcs": [{"issuer": mock_oidc_issuer(cluster)}]}],
            "vpcConfig": {
                **inputs.get("vpcConfig", {}),
                "clusterSecurityGroupId": MOCK_CLUSTER_SECURITY_GROUP,
            },
        }
    if typ == "aws:eks/nodeGroup:NodeGroup":
        return {
            "nodeGroupName": f"{name}-mock",
            "resources": [{"autoscalingGroups": [{"name": mock_asg_name(name)}]}],
        }
    if typ == "aws:ec2/launchTemplate:LaunchTemplate":
        return {"latestVersion": 1}
    if typ == "aws:ec2/placementGroup:PlacementGroup":
        return {"name": inputs.get("name", name)}  # auto-named after the resource
    return {}


def mock_load_balancer_host(service: str) -> str:
    return f"{service}.elb.mock.amazonaws.com"


def service_outputs(typ: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The DNS name the cloud controller publishes for a LoadBalancer Service."""
    if typ != "kubernetes:core/v1:Service" or inputs.get("spec", {}).get("type") != "LoadBalancer":
        return {}
    host = mock_load_balancer_host(inputs["metadata"]["name"])
    return {"status": {"loadBalancer": {"ingress": [{"hostname": host}]}}}


def invoke_result(token: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Answers to data-source invokes."""
    if token == "aws:eks/getCluster:getCluster":  # cluster.mode existing
        cluster = args["name"]
        return {
            "name": cluster,
            "endpoint": mock_cluster_endpoint(cluster),
            "certificateAuthorities": [{"data": MOCK_CLUSTER_CA}],
            "identities": [{"oidcs": [{"issuer": mock_oidc_issuer(cluster)}]}],
            "vpcConfig": {"clusterSecurityGroupId": MOCK_CLUSTER_SECURITY_GROUP},
            "version": MOCK_EXISTING_CLUSTER_VERSION,
        }
    if token == "aws:iam/getOpenIdConnectProvider:getOpenIdConnectProvider":
        issuer = str(args["url"]).removeprefix("https://")
        return {"arn": f"arn:aws:iam::{MOCK_ACCOUNT}:oidc-provider/{issuer}", "url": args["url"]}
    return {}


class RecordingMonitor(mocks.MockMonitor):
    """A MockMonitor that also keeps the resource options of every registration."""

    def __init__(self, mocks_: StackMocks, options: dict[tuple[str, str], dict[str, Any]]) -> None:
        super().__init__(mocks_)
        self.options = options

    def RegisterResource(self, request: Any) -> Any:
        self.options[(request.type, request.name)] = {
            "parent": request.parent,
            "provider": request.provider,
            "protect": request.protect,
            "retain_on_delete": request.retainOnDelete,
            "delete_before_replace": request.deleteBeforeReplace,
            "dependencies": list(request.dependencies),
            "ignore_changes": list(request.ignoreChanges),
            "additional_secret_outputs": list(request.additionalSecretOutputs),
        }
        response = super().RegisterResource(request)
        self.options[(request.type, request.name)]["urn"] = response.urn
        return response


def engine_config(stack_file: Path) -> tuple[dict[str, str], list[str]]:
    """The config map and secret keys the engine would hand the program for this file."""
    document = yaml.safe_load(stack_file.read_text())
    config: dict[str, str] = {}
    secret_keys: list[str] = []
    for key, value in document["config"].items():
        if isinstance(value, Mapping) and set(value) == {"secure"}:
            config[key] = MOCK_SECRET
            secret_keys.append(key)
        else:
            config[key] = value if isinstance(value, str) else json.dumps(value)
    return config, secret_keys


@dataclass
class StackRun:
    """Every resource one run of the program registered, and its exports."""

    stack: str
    resources: list[Resource]
    outputs: dict[str, Any]

    def of_type(self, typ: str) -> list[Resource]:
        return [r for r in self.resources if r.type == typ]

    def one(self, typ: str, name: str) -> Resource:
        matches = [r for r in self.resources if r.type == typ and r.name == name]
        assert len(matches) == 1, f"expected one {typ} named {name}, found {len(matches)}"
        return matches[0]

    def kubernetes(self) -> Iterator[Resource]:
        return (
            r
            for r in self.resources
            if r.type.startswith("kubernetes:")
            and r.custom
            and not r.type.startswith("kubernetes:helm.sh")
        )


def run_stack(stack: str, stack_file: Path | None = None) -> StackRun:
    """Run __main__.py for `stack` under mocks and return what it registered."""
    stack_file = stack_file or ROOT / f"Pulumi.{stack}.yaml"
    found: dict[tuple[str, str], Resource] = {}
    options: dict[tuple[str, str], dict[str, Any]] = {}
    stack_mocks = StackMocks(found)
    # set_mocks keeps an existing root Stack, and with it the previous run's exports.
    set_root_resource(None)  # type: ignore[arg-type]
    pulumi.runtime.set_mocks(
        stack_mocks,
        project=PROJECT,
        stack=stack,
        preview=False,
        monitor=RecordingMonitor(stack_mocks, options),
    )
    config, secret_keys = engine_config(stack_file)
    runtime_config.set_all_config(config, secret_keys)
    exported: dict[str, Any] = {}

    @pulumi.runtime.test
    def program() -> pulumi.Output[Any]:
        runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")
        root = get_root_resource()
        names = dict(getattr(root, "outputs", {}))
        return pulumi.Output.all(**names).apply(exported.update)

    program()
    for key, resource in found.items():
        for attr, value in options.get(key, {}).items():
            setattr(resource, attr, value)
    return StackRun(stack, list(found.values()), ints(exported))
