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
from stacks.rules.common import deployment_path, positive, unique, within
from stacks.rules.vision import max_image_pixels
from stacks.schema import DeploymentSettings, Settings
from stacks.versions import NGINX_RESOLVE_MIN_VERSION
from stacks.vision_plan import VISION_TOKEN_PIXELS

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
    yield from within(
        "gateway.clientMaxBodySizeMib",
        g.client_max_body_size_mib,
        GATEWAY_BODY_MIB_RANGE,
        f": below {MIN_BODY_MIB} MiB image requests get 413, above it bodies only cost scratch "
        "space on the pod's volume",
    )
    yield from within(
        "gateway.readTimeoutSeconds",
        g.read_timeout_seconds,
        GATEWAY_READ_TIMEOUT_RANGE,
        f": below {GATEWAY_READ_TIMEOUT_RANGE[0]} s long prefills get 504s; the pod also waits "
        "this long for streams to end when it stops",
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
    yield from _routing_problems(s)
    yield from _key_policy_problems(s)
    for d in s.serving.deployments:
        if d.name in RESERVED_ROUTE_NAMES:
            yield Problem(
                f"{deployment_path(s, d)}.name",
                "clashes with a gateway path "
                f"(/{d.name}/...); reserved: {', '.join(sorted(RESERVED_ROUTE_NAMES))}",
                d.name,
            )


# vLLM takes any int as a priority; a small range keeps classes readable in metrics and docs.
PRIORITY_RANGE = (-1000, 1000)


AFFINITY_LOAD_BOUND_RANGE = (1.1, 10.0)
# Shared placement re-reads Redis every half TTL per replica and session: below this, often.
MIN_SHARED_SESSION_TTL_SECONDS = 60


def _routing_problems(s: Settings) -> Iterator[Problem]:
    """Model names, aliases and the affinity knobs of the routing tier (gateway_router.js)."""
    g = s.gateway
    owners: dict[str, list[str]] = {}
    for d in s.serving.deployments:
        for name in (d.served_model_name or d.name, *d.model_aliases):
            owners.setdefault(name, []).append(d.name)
        yield from _deployment_routing_problems(s, d)
    for name, deployments in owners.items():
        if len(deployments) > 1:
            yield Problem(
                "serving.deployments",
                f"the model name {name!r} (servedModelName or modelAliases) is served by "
                f"{', '.join(deployments)}; the gateway routes by model name, so each name "
                "needs exactly one deployment",
            )
    for name, value in g.priority_classes.items():
        if not KEY_ID.match(name):
            yield Problem(f"gateway.priorityClasses.{name}", "class names are DNS labels", name)
        yield from within(
            f"gateway.priorityClasses.{name}",
            value,
            PRIORITY_RANGE,
            " (vLLM serves lower values first)",
        )
    if g.default_priority_class not in g.priority_classes:
        yield Problem(
            "gateway.defaultPriorityClass",
            f"must be one of gateway.priorityClasses ({', '.join(sorted(g.priority_classes))})",
            g.default_priority_class,
        )
    yield from positive("gateway.sessionTtlSeconds", g.session_ttl_seconds)
    yield from _shared_placement_problems(s)
    yield from within(
        "gateway.affinityLoadBound",
        g.affinity_load_bound,
        AFFINITY_LOAD_BOUND_RANGE,
        ": near 1 sessions move at every burst (prefix cache lost), above it a hot engine keeps "
        "its sessions",
    )


def _shared_placement_problems(s: Settings) -> Iterator[Problem]:
    """Shared placement needs the sidecar (its image) and Redis; a TTL the sidecar renews at
    half its length must leave it time to."""
    g = s.gateway
    if not (
        g.load_balancing == "sessionAffinity" and g.shared_session_placement and g.replicas > 1
    ):
        return
    if not s.redis.enabled:
        yield Problem(
            "redis.enabled",
            f"must be true for gateway.sharedSessionPlacement with {g.replicas} replicas: the "
            "replicas share each session's engine through Redis (or set "
            "gateway.sharedSessionPlacement: false and accept that replicas place apart)",
        )
    if not g.quota_image:
        yield Problem(
            "gateway.quotaImage",
            "required for gateway.sharedSessionPlacement with 2+ replicas: the sidecar that "
            "talks to Redis runs in it (an official python image, e.g. python:3.12-slim)",
        )
    if g.session_ttl_seconds < MIN_SHARED_SESSION_TTL_SECONDS:
        yield Problem(
            "gateway.sessionTtlSeconds",
            f"must be at least {MIN_SHARED_SESSION_TTL_SECONDS} with sharedSessionPlacement: "
            "each replica re-reads a session's engine from Redis every half TTL, so a shorter "
            "one puts Redis on the path of most requests",
            g.session_ttl_seconds,
        )


def _deployment_routing_problems(s: Settings, d: DeploymentSettings) -> Iterator[Problem]:
    for i, alias in enumerate(d.model_aliases):
        if not alias or alias != alias.strip() or len(alias) > 200:  # noqa: PLR2004
            yield Problem(
                f"{deployment_path(s, d)}.modelAliases[{i}]",
                "must be a non-empty name without surrounding blanks, at most 200 characters",
                alias,
            )
    if d.max_image_pixels is not None and d.max_image_pixels < 28 * 28:
        yield Problem(
            f"{deployment_path(s, d)}.maxImagePixels",
            "must be at least 784 (28x28): smaller images hold no vision token",
            d.max_image_pixels,
        )
    if d.max_image_pixels is not None and any(
        a.split("=", 1)[0] == "--mm-processor-kwargs" for a in d.extra_args
    ):
        yield Problem(
            f"{deployment_path(s, d)}.extraArgs",
            "--mm-processor-kwargs would replace the max_pixels of maxImagePixels (vLLM "
            "keeps the last); put max_pixels into that JSON and drop maxImagePixels",
        )


def image_guard_warnings(s: Settings) -> list[Problem]:
    """Image guards that admit requests no context can hold: vLLM answers those with a 400."""
    found = []
    for d in s.serving.deployments:
        images = d.limit_mm_per_prompt.get("image", 0)
        tokens = images * (max_image_pixels(d) // VISION_TOKEN_PIXELS)
        if images and tokens > d.max_model_len:
            fit = d.max_model_len // images * VISION_TOKEN_PIXELS
            found.append(
                Problem(
                    f"{deployment_path(s, d)}.maxImagePixels",
                    f"{images} images at this size take {tokens:,} image tokens, more than "
                    f"maxModelLen {d.max_model_len:,}, so such requests get a 400; set "
                    f"maxImagePixels well below {fit:,} (room for the text) or allow fewer "
                    "images in limitMmPerPrompt",
                    d.max_image_pixels,
                )
            )
    return found


def _key_policy_problems(s: Settings) -> Iterator[Problem]:
    g = s.gateway
    for key_id, policy in g.api_keys.items():
        path = f"gateway.apiKeys.{key_id}"
        if key_id not in g.api_key_ids:
            yield Problem(
                path,
                f"names no key: add {key_id!r} to gateway.apiKeyIds or remove this entry",
            )
        if policy.priority_class is not None and policy.priority_class not in g.priority_classes:
            yield Problem(
                f"{path}.priorityClass",
                f"must be one of gateway.priorityClasses ({', '.join(sorted(g.priority_classes))})",
                policy.priority_class,
            )
        if policy.requests_per_minute is not None:
            yield from positive(f"{path}.requestsPerMinute", policy.requests_per_minute)
    quotas = any(p.requests_per_minute for p in g.api_keys.values())
    if quotas and not g.quota_image:
        yield Problem(
            "gateway.quotaImage",
            "required when a key has requestsPerMinute: the quota sidecar runs in it "
            "(an official python image, e.g. python:3.12-slim; Python 3.11 or later)",
        )
    if quotas and not s.redis.enabled:
        yield Problem(
            "redis.enabled",
            "must be true when a key has requestsPerMinute: quotas are counted in Redis "
            "so that every gateway replica sees the same count",
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
