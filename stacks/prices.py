"""AWS on-demand list prices (USD) that scripts/cost.py multiplies by a stack's inventory.

Public list prices for us-east-1 (N. Virginia), Linux, on-demand, without Savings Plans,
Reserved Instances, Spot or Capacity Block discounts, taxes or enterprise agreements.
SOURCE names the pages they belong to. None of them was read off those pages: they were
written from memory, without network access, to reflect the prices in force on AS_OF
(after the June 2025 cut of up to 45 % on P5). So AS_OF is the date the figures are
meant for, not the date anyone checked them: refresh every number against the pages in
SOURCE (or `aws pricing get-products --service-code AmazonEC2 ...`) and set AS_OF to the
day you did.

A type missing here makes the estimate refuse rather than guess: add its hourly price.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Final

REGION: Final = "us-east-1"
AS_OF: Final = "2025-06-15"
EC2_PRICING_PAGE: Final = "https://aws.amazon.com/ec2/pricing/on-demand/"
SOURCE: Final = (
    EC2_PRICING_PAGE,
    "https://aws.amazon.com/eks/pricing/",
    "https://aws.amazon.com/vpc/pricing/",
    "https://aws.amazon.com/elasticloadbalancing/pricing/",
    "https://aws.amazon.com/ebs/pricing/",
)

# AWS's pricing calculator and price pages count a month as 730 hours (8,760 h / 12).
HOURS_PER_MONTH: Final = 730

# EC2 on-demand, USD per instance-hour.
INSTANCE_HOURLY: Final[Mapping[str, Decimal]] = MappingProxyType(
    {
        # g6e, NVIDIA L40S
        "g6e.xlarge": Decimal("1.861"),
        "g6e.2xlarge": Decimal("2.24208"),
        "g6e.4xlarge": Decimal("3.00424"),
        "g6e.8xlarge": Decimal("4.52856"),
        "g6e.12xlarge": Decimal("10.49264"),
        "g6e.16xlarge": Decimal("7.57719"),
        "g6e.24xlarge": Decimal("15.06559"),
        "g6e.48xlarge": Decimal("30.13118"),
        # g6, NVIDIA L4
        "g6.xlarge": Decimal("0.8048"),
        "g6.2xlarge": Decimal("0.9776"),
        "g6.4xlarge": Decimal("1.3232"),
        "g6.8xlarge": Decimal("2.0144"),
        "g6.12xlarge": Decimal("4.6016"),
        "g6.48xlarge": Decimal("13.3504"),
        # g5, NVIDIA A10G
        "g5.xlarge": Decimal("1.006"),
        "g5.2xlarge": Decimal("1.212"),
        "g5.4xlarge": Decimal("1.624"),
        "g5.8xlarge": Decimal("2.448"),
        "g5.12xlarge": Decimal("5.672"),
        "g5.48xlarge": Decimal("16.288"),
        # p5 and p5en, NVIDIA H100 and H200, after the June 2025 reduction
        "p5.48xlarge": Decimal("55.04"),
        "p5en.48xlarge": Decimal("63.296"),
        # CPU types for the system node group
        "m7i.large": Decimal("0.1008"),
        "m7i.xlarge": Decimal("0.2016"),
        "m7i.2xlarge": Decimal("0.4032"),
        "m7i.4xlarge": Decimal("0.8064"),
        "m6i.xlarge": Decimal("0.192"),
        "m6i.2xlarge": Decimal("0.384"),
        "m6i.4xlarge": Decimal("0.768"),
        "c7i.2xlarge": Decimal("0.357"),
        "r7i.2xlarge": Decimal("0.5292"),
    }
)

# EKS control plane, standard support (extended support is $0.60/h).
EKS_CLUSTER_HOURLY: Final = Decimal("0.10")
# NAT gateway: per hour, and per GB it processes.
NAT_GATEWAY_HOURLY: Final = Decimal("0.045")
NAT_GATEWAY_PER_GB: Final = Decimal("0.045")
# Every public IPv4 address (a NAT gateway's Elastic IP), in use or not.
PUBLIC_IPV4_HOURLY: Final = Decimal("0.005")
# Network Load Balancer: per hour; LCUs ($0.006 per NLB LCU-hour) are usage, not estimated.
NLB_HOURLY: Final = Decimal("0.0225")
# gp3 storage per GB-month; the baseline 3,000 IOPS and 125 MB/s are included.
EBS_GP3_GB_MONTH: Final = Decimal("0.08")
