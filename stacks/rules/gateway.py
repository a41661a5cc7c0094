"""Rules of the gateway section: image version, body and timeout bounds, key ids, TLS."""

from __future__ import annotations

import re
from collections.abc import Iterator

from stacks.naming import (
    HEADER_NAME,
    KEY_ID,
    RESERVED_ROUTE_NAMES,
)
from stacks.parse import Problem
from stacks.rules.common import deployment_path, positive, unique
from stacks.schema import Settings
from stacks.versions import NGINX_RESOLVE_MIN_VERSION

# Gateway (components/render/nginx_conf.py, components/gateway.py).
_ACM_ARN = re.compile(r"^arn:aws[-a-z]*:acm:([a-z0-9-]+):\d{12}:certificate/[0-9a-f-]+$")


_NGINX_TAG = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-[a-z0-9.-]+)?$")


# 10 MiB: a few base64 images (4/3 inflation) must fit; the policy pack enforces the same floor.
MIN_BODY_MIB = 10


GATEWAY_BODY_MIB_RANGE = (MIN_BODY_MIB, 1024)


GATEWAY_READ_TIMEOUT_RANGE = (60, 3600)


_MAX_KEY_ID_LENGTH = 40


def gateway_rules(s: Settings) -> Iterator[Problem]:
    g = s.gateway
    yield from positive("gateway.replicas", g.replicas)
    if s.environment == "prod" and g.replicas < 2:  # noqa: PLR2004 (one pod is no redundancy)
        yield Problem(
            "gateway.replicas",
            "prod needs at least 2 (a PodDisruptionBudget and a node drain must leave one serving)",
            g.replicas,
        )
    yield from _nginx_image_problems(g.image)
    lo, hi = GATEWAY_BODY_MIB_RANGE
    if not lo <= g.client_max_body_size_mib <= hi:
        yield Problem(
            "gateway.clientMaxBodySizeMib",
            f"must lie between {lo} and {hi}: below {lo} MiB image requests get 413, "
            "above it bodies only cost scratch space on the pod's volume",
            g.client_max_body_size_mib,
        )
    lo, hi = GATEWAY_READ_TIMEOUT_RANGE
    if not lo <= g.read_timeout_seconds <= hi:
        yield Problem(
            "gateway.readTimeoutSeconds",
            f"must lie between {lo} and {hi}: below "
            f"{lo} s long prefills get 504s; the pod also waits this long for "
            "streams to end when it stops",
            g.read_timeout_seconds,
        )
    if not HEADER_NAME.match(g.affinity_header):
        yield Problem(
            "gateway.affinityHeader",
            "must be an HTTP header name of letters, digits "
            "and single dashes (nginx ignores headers with underscores)",
            g.affinity_header,
        )
    yield from _api_key_id_problems(g.api_key_ids)
    if round(g.rate_limit.requests_per_second * 60) < 1:
        yield Problem(
            "gateway.rateLimit.requestsPerSecond",
            "must allow at least 1 request per "
            "minute (nginx counts whole requests per second or minute)",
            g.rate_limit.requests_per_second,
        )
    if g.rate_limit.burst < 0:
        yield Problem("gateway.rateLimit.burst", "must be 0 or more", g.rate_limit.burst)
    yield from _gateway_tls_problems(s)
    for d in s.serving.deployments:
        if d.name in RESERVED_ROUTE_NAMES:
            yield Problem(
                f"{deployment_path(s, d)}.name",
                "clashes with a gateway path "
                f"(/{d.name}/...); reserved: {', '.join(sorted(RESERVED_ROUTE_NAMES))}",
                d.name,
            )


def _nginx_image_problems(image: str) -> Iterator[Problem]:
    tag = image.split("@", 1)[0].rsplit("/", 1)[-1].partition(":")[2]
    found = _NGINX_TAG.match(tag)
    want = ".".join(map(str, NGINX_RESOLVE_MIN_VERSION))
    if found is None:
        yield Problem(
            "gateway.image",
            f"needs a version tag (nginx:X.Y.Z, >= {want}) so the "
            "upstream `resolve` parameter is known to exist",
            image,
        )
    elif tuple(int(p) for p in found.groups()) < NGINX_RESOLVE_MIN_VERSION:
        yield Problem(
            "gateway.image",
            f"nginx {found.group(0)} lacks upstream `resolve` (open "
            f"source since {want}), so leader pods would never be re-resolved; use "
            f"{want} or later, e.g. nginx:1.28.0",
            image,
        )


def _api_key_id_problems(ids: tuple[str, ...]) -> Iterator[Problem]:
    if not ids:
        yield Problem("gateway.apiKeyIds", "give at least one key id: every request needs a key")
    yield from unique("gateway.apiKeyIds", list(ids))
    for i, key_id in enumerate(ids):
        if not KEY_ID.match(key_id) or len(key_id) > _MAX_KEY_ID_LENGTH:
            yield Problem(
                f"gateway.apiKeyIds[{i}]",
                f"must be a DNS label of at most "
                f"{_MAX_KEY_ID_LENGTH} characters (a-z, 0-9, -); it names the key in "
                "logs and resources",
                key_id,
            )


def _gateway_tls_problems(s: Settings) -> Iterator[Problem]:
    arn = s.gateway.tls_certificate_arn
    if arn is None:
        if s.gateway.scheme == "internet-facing":
            yield Problem(
                "gateway.tlsCertificateArn",
                "required with scheme internet-facing: "
                "API keys must not cross the internet in clear text (give an ACM "
                "certificate ARN, or use scheme internal)",
            )
        return
    found = _ACM_ARN.match(arn)
    if found is None:
        yield Problem(
            "gateway.tlsCertificateArn",
            "must be an ACM certificate ARN (arn:aws:acm:<region>:<account>:certificate/<id>)",
            arn,
        )
    elif found.group(1) != s.region:
        yield Problem(
            "gateway.tlsCertificateArn",
            f"must be in the stack's region {s.region} "
            "(an NLB uses certificates of its own region)",
            arn,
        )
