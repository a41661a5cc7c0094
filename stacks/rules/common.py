"""Helpers the section rules share: key paths, bounds, uniqueness and image lists."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from stacks.parse import Problem
from stacks.schema import DeploymentSettings, Settings

# A DNS-1035 label: LWS names become Service and pod host names.
DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


COMMIT = re.compile(r"^[0-9a-f]{40}$")


# LeaderWorkerSet names must leave room for the group and worker index suffixes
# (kubernetes-sigs/lws troubleshooting: 51 - int(replicas/10) characters).
LWS_NAME_BUDGET = 51


# EKS needs control-plane subnets in two AZs.
MIN_AZS = 2


Rule = Callable[[Settings], Iterable[Problem]]


def deployment_path(settings: Settings, d: DeploymentSettings) -> str:
    return f"serving.deployments[{settings.serving.deployments.index(d)}]"


def positive(path: str, value: float) -> Iterator[Problem]:
    if value <= 0:
        yield Problem(path, "must be greater than 0", value)


def within(path: str, value: float, bounds: tuple[float, float], why: str) -> Iterator[Problem]:
    """`why` follows the bounds in the message: what goes wrong outside them."""
    lo, hi = bounds
    if not lo <= value <= hi:
        yield Problem(path, f"must lie between {lo} and {hi}{why}", value)


def sizes(path: str, lo: int, want: int, hi: int) -> Iterator[Problem]:
    if not lo <= want <= hi:
        yield Problem(
            f"{path}.desiredSize",
            f"must lie between minSize={lo} and maxSize={hi} (raise maxSize or lower minSize)",
            want,
        )


def unique(path: str, names: list[str]) -> Iterator[Problem]:
    for name, count in Counter(names).items():
        if count > 1:
            yield Problem(path, f"the name {name!r} is used {count} times; names must be unique")


def zones(s: Settings) -> tuple[str, ...]:
    """The AZs nodes can be placed in."""
    n = s.network
    return n.availability_zones if n.mode == "new" else tuple(n.private_subnet_ids)


def images(s: Settings) -> list[tuple[str, str]]:
    """(key path, image) of every container image the stack runs."""
    found = [
        ("serving.vllmImage", s.serving.vllm_image),
        ("gateway.image", s.gateway.image),
        ("gateway.exporterImage", s.gateway.exporter_image),
    ]
    if s.gateway.quota_image:  # required whenever the sidecar runs (stacks/rules/gateway.py)
        found.append(("gateway.quotaImage", s.gateway.quota_image))
    if s.redis.enabled:
        found += [("redis.image", s.redis.image), ("redis.exporterImage", s.redis.exporter_image)]
    if s.webui.enabled:
        found.append(("webui.image", s.webui.image))
    return found
