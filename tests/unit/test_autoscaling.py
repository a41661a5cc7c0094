"""Autoscaling under Pulumi mocks, per stack: the pinned KEDA release and one ScaledObject per
deployment that scales its LeaderWorkerSet on the queue-depth metric, with the configured
threshold, bounds and scale-down stabilisation."""

from __future__ import annotations

import dataclasses

import pytest

from components.autoscaling import build_scaled_object
from stacks.settings import ROOT, load_stack_file
from tests.support.autoscaling import PROMETHEUS


def test_zero_groups_only_with_scale_to_zero() -> None:
    d = load_stack_file(ROOT / "Pulumi.dev.yaml").serving.deployments[0]
    zero = dataclasses.replace(d, autoscaling=dataclasses.replace(d.autoscaling, min_replicas=0))
    with pytest.raises(ValueError, match="scaleToZero"):
        build_scaled_object(
            zero, namespace="ns", prometheus_url=PROMETHEUS, polling_interval_seconds=15
        )
