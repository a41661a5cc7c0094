"""Helpers shared by the gateway tests of several layers."""

from __future__ import annotations

STACKS = ["dev", "staging", "prod"]


TLS_ARN = "arn:aws:acm:us-east-1:123456789012:certificate/0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"


LB = "service.beta.kubernetes.io/aws-load-balancer-"
