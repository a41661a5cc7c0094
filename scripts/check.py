"""Validate a stack file without the Pulumi engine and print its settings and capacity plan.

    python -m scripts.check Pulumi.dev.yaml        (or: make check STACK=dev)

Exit status 0 when the file is valid, 1 with every problem listed when it is not. Warnings
(placeholder digests and revisions) are printed; in a prod stack they fail the check, as prod
cannot be deployed with them. Run it in pull requests before any
preview: it needs no cloud account and no Pulumi CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stacks.parse import SettingsError
from stacks.planner import format_bytes, plan_for, plan_request, plan_table
from stacks.rules import warnings
from stacks.rules.vision import encoder_plan
from stacks.schema import Settings
from stacks.settings import load_stack_file, stack_file
from stacks.vision_plan import vision_table


def summary(s: Settings) -> str:
    """The resolved settings, one line per component, for humans."""
    groups = ", ".join(
        f"{g.name}={g.instance_type} x{g.min_size}-{g.max_size}{' EFA@' + str(g.availability_zone) if g.efa else ''}"
        for g in s.gpu_node_groups
    )
    lines = [
        f"stack {s.stack} ({s.environment}) in {s.region}, protect={str(s.protect).lower()}",
        f"  network   {s.network.mode} {s.network.cidr if s.network.mode == 'new' else s.network.vpc_id}"
        f" AZs {', '.join(s.network.availability_zones or tuple(s.network.private_subnet_ids))}"
        f" NAT {s.network.nat_gateways}",
        f"  cluster   {s.cluster.mode} {s.cluster.name} (Kubernetes {s.cluster.version})",
        f"  system    {s.system_nodes.instance_type} x{s.system_nodes.min_size}-{s.system_nodes.max_size}",
        f"  gpu       {groups}",
        f"  gateway   {s.gateway.replicas} replicas, {s.gateway.load_balancing}, "
        f"body <= {s.gateway.client_max_body_size_mib} MiB, read timeout {s.gateway.read_timeout_seconds}s",
        f"  redis     {'on' if s.redis.enabled else 'off'}, maxmemory {s.redis.maxmemory_mib} MiB",
        f"  monitor   {'on' if s.monitoring.enabled else 'off'}, retention {s.monitoring.retention_days}d",
        f"  webui     {'on (' + s.webui.exposure + ')' if s.webui.enabled else 'off'}",
    ]
    for d in s.serving.deployments:
        p = plan_for(s, d)
        shm = format_bytes(p.min_shm_bytes) if p else "?"
        lines.append(
            f"  serving   {d.name}: {d.model}@{d.revision[:12]} on {d.node_group}, "
            f"{d.replicas} group(s) x {d.nodes_per_group} node(s), autoscale "
            f"{d.autoscaling.min_replicas}-{d.autoscaling.max_replicas}, shm >= {shm}"
        )
    return "\n".join(lines)


def capacity(s: Settings) -> str:
    rows = []
    for d in s.serving.deployments:
        request, result = plan_request(s, d), plan_for(s, d)
        if request is not None and result is not None:
            rows.append((d.name, result, request))
    return plan_table(rows)


def vision(s: Settings) -> str:
    """The vision tiers' plan (empty when no deployment is disaggregated)."""
    rows = [
        (d.name, d.vision.encoders, p)
        for d in s.serving.deployments
        if d.vision.mode == "disaggregated" and (p := encoder_plan(s, d)) is not None
    ]
    return vision_table(rows) if rows else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.check",
        description="Validate a Pulumi.<stack>.yaml file offline and print its capacity plan.",
    )
    parser.add_argument("file", help="a stack file path, or a stack name such as dev")
    args = parser.parse_args(argv)
    path = (
        Path(args.file)
        if args.file.endswith((".yaml", ".yml")) or "/" in args.file
        else stack_file(args.file)
    )
    try:
        settings = load_stack_file(path)
    except SettingsError as err:
        print(err, file=sys.stderr)
        return 1
    print(summary(settings))
    print()
    print(capacity(settings))
    if tiers := vision(settings):
        print(tiers)
    found = warnings(settings)
    for w in found:
        print(f"warning: {w}", file=sys.stderr)
    if found and settings.environment == "prod":
        print(f"\n{path.name}: valid, but not deployable: {len(found)} warning(s) above")
        return 1
    print(f"\n{path.name}: valid")
    return 0


if __name__ == "__main__":
    sys.exit(main())
