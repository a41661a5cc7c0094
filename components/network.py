"""The VPC the cluster runs in: a new one (subnets, NAT, S3 endpoint) or an existing one by id."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_aws as aws

from components.render.eks_spec import s3_gateway_service_name
from stacks.naming import TYPE_PREFIX
from stacks.schema import NetworkSettings
from stacks.subnet_plan import build_subnet_cidrs

TYPE = f"{TYPE_PREFIX}:platform:Network"
# Load balancer subnet discovery (AWS Load Balancer Controller and the in-tree controller).
PUBLIC_ELB_TAG = "kubernetes.io/role/elb"
INTERNAL_ELB_TAG = "kubernetes.io/role/internal-elb"


@dataclass(frozen=True, kw_only=True)
class NetworkArgs:
    settings: NetworkSettings
    region: str
    # Subnets are tagged kubernetes.io/cluster/<name>: shared for load balancer discovery.
    cluster_name: str
    tags: Mapping[str, str]


class Network(pulumi.ComponentResource):
    """Private subnets for nodes, public subnets for NAT and internet-facing load balancers."""

    vpc_id: pulumi.Output[str]
    private_subnets: dict[str, pulumi.Output[str]]  # AZ -> subnet id
    public_subnets: dict[str, pulumi.Output[str]]
    nat_gateway_count: int

    def __init__(
        self, name: str, args: NetworkArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(TYPE, name, None, opts)
        self._name, self._args = name, args
        n = args.settings
        if n.mode == "existing":
            assert n.vpc_id is not None  # the settings rules require it
            self.vpc_id = pulumi.Output.from_input(n.vpc_id)
            self.private_subnets = {
                az: pulumi.Output.from_input(s) for az, s in n.private_subnet_ids.items()
            }
            self.public_subnets = {
                az: pulumi.Output.from_input(s) for az, s in n.public_subnet_ids.items()
            }
            self.nat_gateway_count = 0
        else:
            self._create()
        self.register_outputs(
            {
                "vpc_id": self.vpc_id,
                "private_subnets": self.private_subnets,
                "public_subnets": self.public_subnets,
            }
        )

    def _create(self) -> None:
        name, n = self._name, self._args.settings
        vpc = aws.ec2.Vpc(
            f"{name}-vpc",
            cidr_block=n.cidr,
            enable_dns_hostnames=True,
            enable_dns_support=True,
            tags=self._tags("vpc"),
            opts=self._child(),
        )
        self.vpc_id = vpc.id
        igw = aws.ec2.InternetGateway(
            f"{name}-igw", vpc_id=vpc.id, tags=self._tags("igw"), opts=self._child()
        )
        cidrs = build_subnet_cidrs(n.cidr, len(n.availability_zones))
        private: dict[str, aws.ec2.Subnet] = {}
        public: dict[str, aws.ec2.Subnet] = {}
        for az, (private_cidr, public_cidr) in zip(n.availability_zones, cidrs, strict=True):
            private[az] = self._subnet(vpc, az, private_cidr, public=False)
            public[az] = self._subnet(vpc, az, public_cidr, public=True)
        self.private_subnets = {az: s.id for az, s in private.items()}
        self.public_subnets = {az: s.id for az, s in public.items()}
        self._create_public_routes(vpc, igw, public)
        nats = self._create_nat_gateways(public, igw)
        self.nat_gateway_count = len(nats)
        tables = self._create_private_routes(vpc, private, nats)
        if n.s3_endpoint:
            aws.ec2.VpcEndpoint(
                f"{name}-s3",
                vpc_id=vpc.id,
                service_name=s3_gateway_service_name(self._args.region),
                vpc_endpoint_type="Gateway",
                route_table_ids=[t.id for t in tables],
                tags=self._tags("s3"),
                opts=self._child(),
            )

    def _child(self, **kwargs: Any) -> pulumi.ResourceOptions:
        return pulumi.ResourceOptions(parent=self, **kwargs)

    def _tags(self, role: str, **extra: str) -> dict[str, str]:
        return {**self._args.tags, "Name": f"{self._args.cluster_name}-{role}", **extra}

    def _subnet(self, vpc: aws.ec2.Vpc, az: str, cidr: str, *, public: bool) -> aws.ec2.Subnet:
        role = "public" if public else "private"
        elb_tag = PUBLIC_ELB_TAG if public else INTERNAL_ELB_TAG
        cluster_tag = f"kubernetes.io/cluster/{self._args.cluster_name}"
        return aws.ec2.Subnet(
            f"{self._name}-{role}-{az}",
            vpc_id=vpc.id,
            availability_zone=az,
            cidr_block=cidr,
            # Nothing that needs a public address launches here: NAT gateways and NLBs bring theirs.
            map_public_ip_on_launch=False,
            tags=self._tags(f"{role}-{az}", **{elb_tag: "1", cluster_tag: "shared"}),
            opts=self._child(),
        )

    def _create_public_routes(
        self, vpc: aws.ec2.Vpc, igw: aws.ec2.InternetGateway, public: Mapping[str, aws.ec2.Subnet]
    ) -> None:
        table = aws.ec2.RouteTable(
            f"{self._name}-public-rt",
            vpc_id=vpc.id,
            routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", gateway_id=igw.id)],
            tags=self._tags("public"),
            opts=self._child(),
        )
        for az, subnet in public.items():
            aws.ec2.RouteTableAssociation(
                f"{self._name}-public-rta-{az}",
                subnet_id=subnet.id,
                route_table_id=table.id,
                opts=self._child(),
            )

    def _create_nat_gateways(
        self, public: Mapping[str, aws.ec2.Subnet], igw: aws.ec2.InternetGateway
    ) -> dict[str, aws.ec2.NatGateway]:
        """One NAT per AZ (an AZ outage leaves the others online) or a single one (dev)."""
        zones = list(public) if self._args.settings.nat_gateways == "perAz" else list(public)[:1]
        nats: dict[str, aws.ec2.NatGateway] = {}
        for az in zones:
            # A NAT gateway's address is only reachable once the VPC has its internet gateway.
            eip = aws.ec2.Eip(
                f"{self._name}-nat-eip-{az}",
                domain="vpc",
                tags=self._tags(f"nat-{az}"),
                opts=self._child(depends_on=[igw]),
            )
            nats[az] = aws.ec2.NatGateway(
                f"{self._name}-nat-{az}",
                allocation_id=eip.id,
                subnet_id=public[az].id,
                tags=self._tags(f"nat-{az}"),
                opts=self._child(depends_on=[igw]),
            )
        return nats

    def _create_private_routes(
        self,
        vpc: aws.ec2.Vpc,
        private: Mapping[str, aws.ec2.Subnet],
        nats: Mapping[str, aws.ec2.NatGateway],
    ) -> list[aws.ec2.RouteTable]:
        """A route table per AZ, so switching single -> perAz NAT changes routes, not tables."""
        first = next(iter(nats.values()))
        tables: list[aws.ec2.RouteTable] = []
        for az, subnet in private.items():
            nat = nats.get(az, first)
            table = aws.ec2.RouteTable(
                f"{self._name}-private-rt-{az}",
                vpc_id=vpc.id,
                routes=[aws.ec2.RouteTableRouteArgs(cidr_block="0.0.0.0/0", nat_gateway_id=nat.id)],
                tags=self._tags(f"private-{az}"),
                opts=self._child(),
            )
            aws.ec2.RouteTableAssociation(
                f"{self._name}-private-rta-{az}",
                subnet_id=subnet.id,
                route_table_id=table.id,
                opts=self._child(),
            )
            tables.append(table)
        return tables
