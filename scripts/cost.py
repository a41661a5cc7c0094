"""Monthly on-demand cost estimate of a stack, and the delta against another stack or version.

  python -m scripts.cost --stack dev                         estimate of Pulumi.dev.yaml
  python -m scripts.cost --stack prod --against staging      prod next to staging
  git show origin/main:Pulumi.prod.yaml > /tmp/base.yaml
  python -m scripts.cost --stack prod --base-file /tmp/base.yaml --markdown   (the PR comment)

Prices come from stacks/prices.py (AWS public on-demand list prices for us-east-1, written
from memory and unchecked: the output says so, with the pages to refresh them from); a
month is 730 hours. Counted: GPU and system nodes (at desired size, and at max size as a
ceiling), the EKS control plane, NAT gateways and their public IPv4 addresses, the
gateway's NLB, and gp3 volumes (node roots, Redis, Prometheus, Grafana, web UI, weight
PVCs). Not counted, and said so in the output: data processed by NAT (unless --nat-gb),
NLB LCUs, data transfer, CloudWatch, ECR/S3 storage, and any discount (Spot, Savings
Plans, Capacity Blocks are priced on-demand).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from stacks import prices
from stacks.parse import SettingsError
from stacks.schema import Settings
from stacks.settings import load_stack_file, stack_file

CENT = Decimal("0.01")


class CostError(ValueError):
    """The estimate cannot be made (unknown price, other region); the message says why."""


@dataclass(frozen=True)
class Line:
    """One billed item: what it is, how many, and its monthly cost at desired and max size."""

    item: str
    quantity: str
    unit_price: str
    monthly: Decimal
    ceiling: Decimal  # with every node group at its max size


@dataclass(frozen=True)
class Estimate:
    label: str
    lines: tuple[Line, ...]
    assumptions: tuple[str, ...]

    @property
    def monthly(self) -> Decimal:
        return sum((line.monthly for line in self.lines), Decimal(0))

    @property
    def ceiling(self) -> Decimal:
        return sum((line.ceiling for line in self.lines), Decimal(0))


def estimate(settings: Settings, label: str, nat_gb: Decimal = Decimal(0)) -> Estimate:
    """Price a stack's inventory; raise CostError for a region or type with no price."""
    if settings.region != prices.REGION:
        raise CostError(
            f"the price table is for {prices.REGION}; {label} runs in {settings.region} "
            "(add that region's prices to stacks/prices.py)"
        )
    lines = [
        *_node_lines(settings),
        *_network_lines(settings, nat_gb),
        *_volume_lines(settings),
    ]
    return Estimate(label, tuple(lines), _assumptions(nat_gb))


def _hourly(instance_type: str, key: str) -> Decimal:
    price = prices.INSTANCE_HOURLY.get(instance_type)
    if price is None:
        raise CostError(
            f"{key}={instance_type}: no price in stacks/prices.py; add its on-demand hourly "
            f"price for {prices.REGION} from {prices.EC2_PRICING_PAGE}"
        )
    return price


def _hours(hourly: Decimal, count: int) -> Decimal:
    return hourly * prices.HOURS_PER_MONTH * count


def _node_lines(s: Settings) -> Iterable[Line]:
    for i, g in enumerate(s.gpu_node_groups):
        yield _node_line(
            f"GPU nodes {g.name}",
            f"gpuNodeGroups[{i}].instanceType",
            g.instance_type,
            (g.desired_size, g.max_size),
            f" {g.capacity_type}",
        )
    n = s.system_nodes
    yield _node_line(
        "system nodes", "systemNodes.instanceType", n.instance_type, (n.desired_size, n.max_size)
    )
    if s.cluster.mode == "new":
        fixed = _hours(prices.EKS_CLUSTER_HOURLY, 1)
        yield Line("EKS control plane", "1", f"${prices.EKS_CLUSTER_HOURLY}/h", fixed, fixed)


def _node_line(
    item: str, key: str, instance_type: str, sizes: tuple[int, int], detail: str = ""
) -> Line:
    """A node group at its desired size, and at its max size for the ceiling."""
    hourly = _hourly(instance_type, key)
    desired, most = sizes
    return Line(
        item,
        f"{desired} (max {most}) x {instance_type}{detail}",
        f"${hourly}/h",
        _hours(hourly, desired),
        _hours(hourly, most),
    )


def _network_lines(s: Settings, nat_gb: Decimal) -> Iterable[Line]:
    nats = _nat_gateways(s)
    if nats:
        nat = _hours(prices.NAT_GATEWAY_HOURLY, nats)
        ips = _hours(prices.PUBLIC_IPV4_HOURLY, nats)
        yield Line("NAT gateways", str(nats), f"${prices.NAT_GATEWAY_HOURLY}/h", nat, nat)
        yield Line("NAT public IPv4", str(nats), f"${prices.PUBLIC_IPV4_HOURLY}/h", ips, ips)
        if nat_gb:
            data = nat_gb * prices.NAT_GATEWAY_PER_GB
            yield Line(
                "NAT data processing",
                f"{nat_gb} GB",
                f"${prices.NAT_GATEWAY_PER_GB}/GB",
                data,
                data,
            )
    nlb = _hours(prices.NLB_HOURLY, 1)
    yield Line("gateway NLB", f"1 {s.gateway.scheme}", f"${prices.NLB_HOURLY}/h", nlb, nlb)
    if s.gateway.scheme == "internet-facing":
        # An internet-facing NLB holds one public IPv4 address per subnet (AZ) it spans.
        azs = len(s.network.availability_zones or s.network.public_subnet_ids)
        ips = _hours(prices.PUBLIC_IPV4_HOURLY, azs)
        yield Line("NLB public IPv4", str(azs), f"${prices.PUBLIC_IPV4_HOURLY}/h", ips, ips)


def _nat_gateways(s: Settings) -> int:
    if s.network.mode != "new":
        return 0  # an existing VPC's NAT is paid for by whoever owns it
    return len(s.network.availability_zones) if s.network.nat_gateways == "perAz" else 1


def _volume_lines(s: Settings) -> Iterable[Line]:
    gib = prices.EBS_GP3_GB_MONTH
    roots = [(g.name, g.disk_gib, g.desired_size, g.max_size) for g in s.gpu_node_groups]
    n = s.system_nodes
    roots.append(("system", n.disk_gib, n.desired_size, n.max_size))
    desired = sum(size * count for _, size, count, _ in roots)
    ceiling = sum(size * most for _, size, _, most in roots)
    parts = " + ".join(f"{name} {count}x{size}" for name, size, count, _ in roots)
    yield Line(
        "EBS gp3 node roots",
        f"{parts} = {desired} GiB (max {ceiling})",
        f"${gib}/GB-mo",
        gib * desired,
        gib * ceiling,
    )
    volumes: list[tuple[str, int]] = []
    if s.redis.enabled:
        volumes.append(("Redis", s.redis.volume_gib))
    if s.monitoring.enabled:
        volumes += [
            ("Prometheus", s.monitoring.volume_gib),
            ("Grafana", s.monitoring.grafana_volume_gib),
        ]
    if s.webui.enabled:
        volumes.append(("web UI", s.webui.volume_gib))
    for name, size in volumes:
        yield Line(f"EBS gp3 {name} volume", f"{size} GiB", f"${gib}/GB-mo", gib * size, gib * size)
    for d in s.serving.deployments:
        if d.weights.cache != "pvc":
            continue
        # One claim per pod: every node of every group caches its own copy.
        pods, most = d.replicas * d.nodes_per_group, d.autoscaling.max_replicas * d.nodes_per_group
        size = d.weights.pvc_size_gib
        yield Line(
            f"EBS gp3 weights {d.name}",
            f"{pods} (max {most}) x {size} GiB",
            f"${gib}/GB-mo",
            gib * size * pods,
            gib * size * most,
        )


def _assumptions(nat_gb: Decimal) -> tuple[str, ...]:
    nat = (
        f"NAT data processing: {nat_gb} GB at ${prices.NAT_GATEWAY_PER_GB}/GB"
        if nat_gb
        else f"NAT data processing excluded (${prices.NAT_GATEWAY_PER_GB}/GB; a cold 471 GB "
        "model download through NAT costs about $21; pass --nat-gb to include traffic)"
    )
    return (
        f"AWS on-demand list prices, {prices.REGION}, meant as of {prices.AS_OF} but written "
        f"from memory and never checked against {', '.join(prices.SOURCE)}: refresh "
        "stacks/prices.py from those pages before relying on the totals",
        f"{prices.HOURS_PER_MONTH} hours a month; spot and capacity-block groups priced on-demand",
        nat,
        "NLB LCUs, data transfer, CloudWatch, ECR and S3 storage excluded",
    )


# --- rendering ------------------------------------------------------------------------------------


def money(value: Decimal) -> str:
    return f"${value.quantize(CENT, ROUND_HALF_UP):,}"


def signed(value: Decimal) -> str:
    rounded = value.quantize(CENT, ROUND_HALF_UP)
    if rounded == 0:
        return "$0.00"
    return f"{'+' if rounded > 0 else '-'}{money(abs(rounded))}"


def render_text(e: Estimate) -> str:
    rows = [
        (line.item, line.quantity, line.unit_price, money(line.monthly), money(line.ceiling))
        for line in e.lines
    ]
    rows.append(("total", "", "", money(e.monthly), money(e.ceiling)))
    header = ("item", "quantity", "price", "monthly", "at max size")
    return f"Monthly cost of {e.label}\n{_table(header, rows)}\n{_notes(e.assumptions)}"


def render_delta_text(base: Estimate, head: Estimate) -> str:
    rows = [(item, money(b), money(h), signed(h - b)) for item, b, h in _pairs(base, head)]
    rows.append(
        ("total", money(base.monthly), money(head.monthly), signed(head.monthly - base.monthly))
    )
    header = ("item", base.label, head.label, "delta")
    ceiling = f"At max size: {money(base.ceiling)} -> {money(head.ceiling)} ({signed(head.ceiling - base.ceiling)})"
    return f"Monthly cost, {base.label} -> {head.label}\n{_table(header, rows)}\n{ceiling}\n{_notes(head.assumptions)}"


def render_markdown(e: Estimate) -> str:
    lines = [
        f"#### Monthly cost of `{e.label}`: {money(e.monthly)} (at max size {money(e.ceiling)})",
        "",
        "| item | quantity | price | monthly | at max size |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    lines += [
        f"| {x.item} | {x.quantity} | {x.unit_price} | {money(x.monthly)} | {money(x.ceiling)} |"
        for x in e.lines
    ]
    lines.append(f"| **total** | | | **{money(e.monthly)}** | **{money(e.ceiling)}** |")
    return "\n".join([*lines, "", _markdown_notes(e.assumptions)])


def render_delta_markdown(base: Estimate, head: Estimate) -> str:
    delta = head.monthly - base.monthly
    lines = [
        f"#### Monthly cost: {signed(delta)} ({money(base.monthly)} -> {money(head.monthly)})",
        "",
        f"| item | {base.label} | {head.label} | delta |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {item} | {money(b)} | {money(h)} | {signed(h - b)} |"
        for item, b, h in _pairs(base, head)
        if b != h
    ]
    lines.append(
        f"| **total** | **{money(base.monthly)}** | **{money(head.monthly)}** | **{signed(delta)}** |"
    )
    lines += [
        "",
        f"At max size: {money(base.ceiling)} -> {money(head.ceiling)} "
        f"({signed(head.ceiling - base.ceiling)}). Unchanged items are not listed.",
    ]
    return "\n".join([*lines, "", _markdown_notes(head.assumptions)])


def _pairs(base: Estimate, head: Estimate) -> list[tuple[str, Decimal, Decimal]]:
    """(item, base monthly, head monthly) over the items of both, in head's order first."""
    b = {line.item: line.monthly for line in base.lines}
    h = {line.item: line.monthly for line in head.lines}
    items = list(h) + [item for item in b if item not in h]
    return [(item, b.get(item, Decimal(0)), h.get(item, Decimal(0))) for item in items]


def _table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    # Text left-aligned in the first column, figures right-aligned in the others.
    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )

    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def _notes(assumptions: Sequence[str]) -> str:
    return "\n".join(f"  - {a}" for a in assumptions)


def _markdown_notes(assumptions: Sequence[str]) -> str:
    body = "\n".join(f"- {a}" for a in assumptions)
    return f"<details><summary>Assumptions</summary>\n\n{body}\n\n</details>"


# --- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.cost",
        description=(__doc__ or "").split("\n\n")[0],
        epilog=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--stack", required=True, help="stack to estimate (Pulumi.STACK.yaml)")
    parser.add_argument("--file", type=Path, help="read the stack from this file instead")
    base = parser.add_mutually_exclusive_group()
    base.add_argument("--against", metavar="STACK", help="show the delta from this other stack")
    base.add_argument(
        "--base-file",
        type=Path,
        metavar="PATH",
        help="show the delta from this version of the stack file (e.g. from git)",
    )
    parser.add_argument("--markdown", action="store_true", help="Markdown (for PR comments)")
    parser.add_argument(
        "--nat-gb",
        type=_gigabytes,
        default=Decimal(0),
        metavar="GB",
        help="GB a month through NAT, to price data processing (default: excluded)",
    )
    return parser


def _gigabytes(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except ArithmeticError:
        value = Decimal("NaN")
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GB >= 0 (e.g. 500)")
    return value


def _load(path: Path, label: str, nat_gb: Decimal) -> Estimate:
    return estimate(load_stack_file(path), label, nat_gb)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    head_file = args.file or stack_file(args.stack)
    try:
        head = _load(head_file, args.stack, args.nat_gb)
        if args.against:
            base = _load(stack_file(args.against), args.against, args.nat_gb)
        elif args.base_file:
            base = _load(args.base_file, f"{args.stack} (base)", args.nat_gb)
        else:
            print(render_markdown(head) if args.markdown else render_text(head))
            return 0
    except (SettingsError, CostError) as err:
        print(f"cost: {err}", file=sys.stderr)
        return 1
    print(render_delta_markdown(base, head) if args.markdown else render_delta_text(base, head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
