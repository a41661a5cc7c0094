"""The VPC: subnet plan, NAT per mode, load balancer tags, S3 endpoint; existing VPCs untouched."""

from __future__ import annotations

import ipaddress
import itertools

import pytest

from stacks.subnet_plan import build_subnet_cidrs


def test_subnet_plan_for_two_and_three_zones() -> None:
    assert build_subnet_cidrs("10.0.0.0/16", 2) == [
        ("10.0.0.0/18", "10.0.192.0/22"),
        ("10.0.64.0/18", "10.0.196.0/22"),
    ]
    assert build_subnet_cidrs("10.0.0.0/16", 3)[2] == ("10.0.128.0/18", "10.0.200.0/22")
    # 4 AZs need a fifth slice for the public subnets: eighths of the VPC.
    assert build_subnet_cidrs("10.0.0.0/16", 4)[3] == ("10.0.96.0/19", "10.0.230.0/23")


@pytest.mark.parametrize("prefix", [16, 18, 20])
@pytest.mark.parametrize("zones", [2, 3, 4, 6])
def test_subnets_never_overlap_and_stay_inside_the_vpc(prefix: int, zones: int) -> None:
    vpc = ipaddress.IPv4Network(f"10.0.0.0/{prefix}")
    plan = build_subnet_cidrs(str(vpc), zones)
    nets = [ipaddress.IPv4Network(c) for pair in plan for c in pair]
    assert len(nets) == 2 * zones
    assert all(n.subnet_of(vpc) for n in nets)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(nets, 2))


def test_a_vpc_too_small_for_public_subnets_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_subnet_cidrs("10.0.0.0/26", 3)
