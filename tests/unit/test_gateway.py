"""The gateway's Kubernetes objects per stack (the real program under mocks), its pod's start
script run by a real shell, its NLB annotations and the gateway settings rules."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from components.gateway import build_nlb_annotations
from stacks.parse import Problem
from stacks.rules import validate
from stacks.rules.gateway import gateway_rules
from stacks.schema import ApiKeySettings
from stacks.settings import load_stack_file, stack_file
from tests.support.gateway import LB, STACKS, TLS_ARN


def test_nlb_tags_that_would_break_the_annotation_are_refused() -> None:
    assert build_nlb_annotations("internet-facing", None, {})[f"{LB}type"] == "nlb"
    with pytest.raises(ValueError, match="cannot contain"):
        build_nlb_annotations("internal", None, {"team": "a,b"})


def _gateway_problems(**changes: Any) -> list[Problem]:
    base = load_stack_file(stack_file("dev"))
    settings = replace(base, gateway=replace(base.gateway, **changes))
    return list(gateway_rules(settings))


def _paths(problems: list[Problem]) -> list[str]:
    return [p.path for p in problems]


def test_the_stack_files_pass_the_gateway_rules() -> None:
    for name in STACKS:
        settings = load_stack_file(stack_file(name))
        assert list(gateway_rules(settings)) == []
        assert [p for p in validate(settings) if p.path.startswith("gateway")] == []


@pytest.mark.parametrize(
    ("changes", "path", "fragment"),
    [
        ({"image": "nginx:1.26.3"}, "gateway.image", "lacks upstream `resolve`"),
        ({"image": "nginx:latest"}, "gateway.image", "needs a version tag"),
        ({"image": "nginx:mainline-alpine"}, "gateway.image", "needs a version tag"),
        ({"read_timeout_seconds": 30}, "gateway.readTimeoutSeconds", "between 60 and 3600"),
        ({"read_timeout_seconds": 7200}, "gateway.readTimeoutSeconds", "between 60 and 3600"),
        ({"client_max_body_size_mib": 0}, "gateway.clientMaxBodySizeMib", "between 10 and 1024"),
        ({"affinity_header": "X_Session_Id"}, "gateway.affinityHeader", "underscores"),
        ({"affinity_header": "X Session"}, "gateway.affinityHeader", "header name"),
        ({"api_key_ids": ()}, "gateway.apiKeyIds", "at least one key id"),
        ({"api_key_ids": ("default", "default")}, "gateway.apiKeyIds", "used 2 times"),
        ({"api_key_ids": ("default", "Web_UI")}, "gateway.apiKeyIds[1]", "DNS label"),
        ({"replicas": 0}, "gateway.replicas", "greater than 0"),
        ({"scheme": "internet-facing"}, "gateway.tlsCertificateArn", "clear text"),
        (
            {"tls_certificate_arn": "arn:aws:iam::123456789012:role/x"},
            "gateway.tlsCertificateArn",
            "ACM certificate ARN",
        ),
        (
            {"tls_certificate_arn": TLS_ARN.replace("us-east-1", "eu-west-1")},
            "gateway.tlsCertificateArn",
            "region us-east-1",
        ),
        ({"default_priority_class": "vip"}, "gateway.defaultPriorityClass", "one of"),
        (
            {"priority_classes": {"interactive": 5000}},
            "gateway.priorityClasses.interactive",
            "-1000",
        ),
        ({"affinity_load_bound": 1.0}, "gateway.affinityLoadBound", "between 1.1 and 10.0"),
        ({"session_ttl_seconds": 0}, "gateway.sessionTtlSeconds", "greater than 0"),
        ({"api_keys": {"ghost": ApiKeySettings()}}, "gateway.apiKeys.ghost", "apiKeyIds"),
        (
            {"api_keys": {"default": ApiKeySettings(priority_class="vip")}},
            "gateway.apiKeys.default.priorityClass",
            "one of",
        ),
        (
            {"api_keys": {"default": ApiKeySettings(requests_per_minute=0)}},
            "gateway.apiKeys.default.requestsPerMinute",
            "greater than 0",
        ),
        (
            {"api_keys": {"default": ApiKeySettings(requests_per_minute=60)}, "quota_image": None},
            "gateway.quotaImage",
            "python",
        ),
    ],
)
def test_bad_gateway_settings_are_named(changes: dict[str, Any], path: str, fragment: str) -> None:
    problems = _gateway_problems(**changes)
    assert path in _paths(problems), problems
    assert fragment in next(p.reason for p in problems if p.path == path)


def test_accepted_gateway_variants() -> None:
    for changes in (
        {"image": "nginx:1.27.3"},
        {"image": "nginx:1.29.1-alpine@sha256:" + "a" * 64},
        {"image": "registry.example.com:5000/nginx:1.28.0"},
        {"scheme": "internet-facing", "tls_certificate_arn": TLS_ARN},
        {"read_timeout_seconds": 60},
        {"client_max_body_size_mib": 1024},
    ):
        assert _gateway_problems(**changes) == [], changes


def test_rate_limit_bounds() -> None:
    base = load_stack_file(stack_file("dev"))
    slow = replace(base.gateway.rate_limit, requests_per_second=0.001)
    problems = _gateway_problems(rate_limit=slow)
    assert _paths(problems) == ["gateway.rateLimit.requestsPerSecond"]
    negative = replace(base.gateway.rate_limit, burst=-1)
    assert _paths(_gateway_problems(rate_limit=negative)) == ["gateway.rateLimit.burst"]


def test_prod_needs_two_gateway_pods() -> None:
    prod = load_stack_file(stack_file("prod"))
    one_pod = replace(prod, gateway=replace(prod.gateway, replicas=1))
    assert _paths(list(gateway_rules(one_pod))) == ["gateway.replicas"]


def test_a_deployment_may_not_take_a_gateway_path() -> None:
    dev = load_stack_file(stack_file("dev"))
    clash = replace(dev.serving.deployments[0], name="metrics")
    settings = replace(dev, serving=replace(dev.serving, deployments=(clash,)))
    problems = [p for p in gateway_rules(settings) if p.path == "serving.deployments[0].name"]
    assert problems
    assert "clashes with a gateway path" in problems[0].reason


def test_a_model_name_served_twice_is_refused() -> None:
    base = load_stack_file(stack_file("staging"))
    first, second, *rest = base.serving.deployments
    twice = replace(second, model_aliases=(first.served_model_name or first.name,))
    settings = replace(base, serving=replace(base.serving, deployments=(first, twice, *rest)))
    [problem] = [p for p in gateway_rules(settings) if p.path == "serving.deployments"]
    assert f"served by {first.name}, {second.name}" in problem.reason


def test_max_image_pixels_and_an_explicit_processor_json_clash() -> None:
    base = load_stack_file(stack_file("dev"))
    d = replace(
        base.serving.deployments[0],
        max_image_pixels=1_003_520,
        extra_args=("--mm-processor-kwargs", '{"fps": 1}'),
    )
    settings = replace(base, serving=replace(base.serving, deployments=(d,)))
    [problem] = [p for p in gateway_rules(settings) if p.path.endswith(".extraArgs")]
    assert "max_pixels" in problem.reason
