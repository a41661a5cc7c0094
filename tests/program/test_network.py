"""The VPC: subnet plan, NAT per mode, load balancer tags, S3 endpoint; existing VPCs untouched.

This module: the Pulumi program under mocks. The other layers' tests of the same code:
tests/unit/test_network.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.harness import StackRun, run_stack
from tests.support.platform_checks import config_key, mock_id, stack_variant

# Per stack file: VPC CIDR, AZs, NAT gateways expected (single -> 1, perAz -> one per AZ).
STACKS = {
    "dev": ("10.20.0.0/16", ["us-east-1a", "us-east-1b"], 1),
    "staging": ("10.30.0.0/16", ["us-east-1a", "us-east-1b"], 1),
    "prod": ("10.40.0.0/16", ["us-east-1a", "us-east-1b", "us-east-1c"], 3),
}


# (private, public) CIDR per AZ, worked out by hand: 2 or 3 AZs cut the /16 into four /18s; the
# first ones are private, the last is cut into /22s for the public subnets (docs/platform.md).
SUBNET_CIDRS = {
    "dev": [("10.20.0.0/18", "10.20.192.0/22"), ("10.20.64.0/18", "10.20.196.0/22")],
    "staging": [("10.30.0.0/18", "10.30.192.0/22"), ("10.30.64.0/18", "10.30.196.0/22")],
    "prod": [
        ("10.40.0.0/18", "10.40.192.0/22"),
        ("10.40.64.0/18", "10.40.196.0/22"),
        ("10.40.128.0/18", "10.40.200.0/22"),
    ],
}


@pytest.fixture(scope="module", params=list(STACKS))
def run(request: pytest.FixtureRequest) -> StackRun:
    return run_stack(request.param)


def subnets(run: StackRun, role: str) -> dict[str, dict[str, Any]]:
    found = {
        r.inputs["availabilityZone"]: r.inputs
        for r in run.of_type("aws:ec2/subnet:Subnet")
        if r.name.startswith(f"network-{role}-")
    }
    return dict(sorted(found.items()))


def test_one_vpc_with_the_configured_cidr(run: StackRun) -> None:
    cidr, _, _ = STACKS[run.stack]
    (vpc,) = run.of_type("aws:ec2/vpc:Vpc")
    assert vpc.inputs["cidrBlock"] == cidr
    assert vpc.inputs["enableDnsHostnames"] is True


def test_a_private_and_a_public_subnet_per_zone(run: StackRun) -> None:
    _, zones, _ = STACKS[run.stack]
    assert list(subnets(run, "private")) == zones
    assert list(subnets(run, "public")) == zones
    assert len(run.of_type("aws:ec2/subnet:Subnet")) == 2 * len(zones)


def test_subnet_cidrs_of_each_stack(run: StackRun) -> None:
    private = [s["cidrBlock"] for s in subnets(run, "private").values()]
    public = [s["cidrBlock"] for s in subnets(run, "public").values()]
    assert list(zip(private, public, strict=True)) == SUBNET_CIDRS[run.stack]


def test_subnets_carry_the_load_balancer_discovery_tags(run: StackRun) -> None:
    cluster = run.one("aws:eks/cluster:Cluster", "eks-cluster").inputs["name"]
    for subnet in subnets(run, "public").values():
        assert subnet["tags"]["kubernetes.io/role/elb"] == "1"
        assert "kubernetes.io/role/internal-elb" not in subnet["tags"]
        assert subnet["tags"][f"kubernetes.io/cluster/{cluster}"] == "shared"
        assert subnet["mapPublicIpOnLaunch"] is False
    for subnet in subnets(run, "private").values():
        assert subnet["tags"]["kubernetes.io/role/internal-elb"] == "1"
        assert "kubernetes.io/role/elb" not in subnet["tags"]


def test_nat_gateways_per_mode(run: StackRun) -> None:
    _, zones, nat_count = STACKS[run.stack]
    nats = run.of_type("aws:ec2/natGateway:NatGateway")
    assert len(nats) == nat_count
    assert len(run.of_type("aws:ec2/eip:Eip")) == nat_count
    public_ids = {mock_id(f"network-public-{az}") for az in zones}
    assert {n.inputs["subnetId"] for n in nats} <= public_ids


def test_each_private_zone_routes_through_a_nat(run: StackRun) -> None:
    _, zones, nat_count = STACKS[run.stack]
    for az in zones:
        table = run.one("aws:ec2/routeTable:RouteTable", f"network-private-rt-{az}")
        (route,) = table.inputs["routes"]
        assert route["cidrBlock"] == "0.0.0.0/0"
        # perAz: the zone's own NAT (an AZ outage cuts no other zone off); single: the first.
        expected = az if nat_count > 1 else zones[0]
        assert route["natGatewayId"] == mock_id(f"network-nat-{expected}")
        association = run.one(
            "aws:ec2/routeTableAssociation:RouteTableAssociation", f"network-private-rta-{az}"
        )
        assert association.inputs["subnetId"] == mock_id(f"network-private-{az}")


def test_public_subnets_route_to_the_internet_gateway(run: StackRun) -> None:
    table = run.one("aws:ec2/routeTable:RouteTable", "network-public-rt")
    assert table.inputs["routes"] == [
        {"cidrBlock": "0.0.0.0/0", "gatewayId": mock_id("network-igw")}
    ]


def test_s3_gateway_endpoint_on_the_private_route_tables(run: StackRun) -> None:
    _, zones, _ = STACKS[run.stack]
    (endpoint,) = run.of_type("aws:ec2/vpcEndpoint:VpcEndpoint")
    assert endpoint.inputs["serviceName"] == "com.amazonaws.us-east-1.s3"
    assert endpoint.inputs["vpcEndpointType"] == "Gateway"
    assert sorted(endpoint.inputs["routeTableIds"]) == sorted(
        mock_id(f"network-private-rt-{az}") for az in zones
    )


@pytest.fixture(scope="module")
def existing_network_run(tmp_path_factory: pytest.TempPathFactory) -> StackRun:
    def edit(config: dict[str, Any]) -> None:
        config[config_key("network")] = {
            "mode": "existing",
            "vpcId": "vpc-0existing",
            "privateSubnetIds": {"us-east-1a": "subnet-0a", "us-east-1b": "subnet-0b"},
            "publicSubnetIds": {"us-east-1a": "subnet-1a", "us-east-1b": "subnet-1b"},
        }

    path: Path = stack_variant(tmp_path_factory.mktemp("net"), "dev", "existingnet", edit)
    return run_stack("existingnet", path)


def test_existing_network_creates_no_network_resources(existing_network_run: StackRun) -> None:
    made = {r.type for r in existing_network_run.resources}
    for kind in ("vpc:Vpc", "subnet:Subnet", "natGateway:NatGateway", "vpcEndpoint:VpcEndpoint"):
        assert f"aws:ec2/{kind}" not in made


def test_existing_network_subnets_reach_the_cluster_and_nodes(
    existing_network_run: StackRun,
) -> None:
    cluster = existing_network_run.one("aws:eks/cluster:Cluster", "eks-cluster")
    assert cluster.inputs["vpcConfig"]["subnetIds"] == ["subnet-0a", "subnet-0b"]
    group = existing_network_run.one("aws:eks/nodeGroup:NodeGroup", "gpu-l40s-ng")
    assert group.inputs["subnetIds"] == ["subnet-0a", "subnet-0b"]
