"""How a new VPC is cut into subnets: pure, so the settings rules and the Network component
share one plan."""

from __future__ import annotations

import ipaddress
import math

# AWS requires subnets of at least /28.
_SMALLEST_SUBNET = 28
# Public subnets hold only NAT gateways and load balancer ENIs: 1/16 of a private subnet's size.
_PUBLIC_SHRINK_BITS = 4


def private_prefix(cidr: str, zones: int) -> int:
    """Prefix length of each AZ's private subnet: the VPC cut into 2^ceil(log2(zones + 1)) slices."""
    return ipaddress.ip_network(cidr).prefixlen + math.ceil(math.log2(zones + 1))


def build_subnet_cidrs(cidr: str, zones: int) -> list[tuple[str, str]]:
    """(private, public) CIDRs per AZ. Pods take their IPs from the private subnets (VPC CNI), so
    those get equal, large slices of the VPC; the last slice is cut into the small public ones.

    10.0.0.0/16 with 2 or 3 AZs: private /18s at 10.0.0.0, 10.0.64.0, (10.0.128.0); public /22s
    at 10.0.192.0, 10.0.196.0, (10.0.200.0).
    """
    vpc = ipaddress.ip_network(cidr)
    slices = list(vpc.subnets(new_prefix=private_prefix(cidr, zones)))
    public_prefix = slices[0].prefixlen + _PUBLIC_SHRINK_BITS
    if public_prefix > _SMALLEST_SUBNET:
        raise ValueError(
            f"{cidr} is too small for {zones} AZs (public subnets would be /{public_prefix})"
        )
    public = list(slices[-1].subnets(new_prefix=public_prefix))
    return [(str(slices[i]), str(public[i])) for i in range(zones)]
