"""Bad monitoring and autoscaling settings: each is refused with a message naming the key."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from stacks.parse import SettingsError
from stacks.settings import ROOT, build

NS = "qwen-vl-serving:"
Config = dict[str, Any]


def stack_config(stack: str) -> Config:
    return yaml.safe_load((ROOT / f"Pulumi.{stack}.yaml").read_text())["config"]


def autoscaling(i: int, **values: Any) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        config[NS + "serving"]["deployments"][i].setdefault("autoscaling", {}).update(values)

    return mutate


def section(name: str, *path: str, value: Any) -> Callable[[Config], None]:
    def mutate(config: Config) -> None:
        node = config.setdefault(NS + name, {})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    return mutate


# (id, stack, mutation, the key path and value the message must start with, words of the reason)
CASES: list[tuple[str, str, Callable[[Config], None], str, str]] = [
    ("max-below-min", "prod", autoscaling(0, maxReplicas=3),
     "serving.deployments[0].autoscaling.maxReplicas=3", "must be at least minReplicas=4"),
    ("groups-exceed-node-group", "prod", autoscaling(0, maxReplicas=9),
     "gpuNodeGroups[0].maxSize=8", "qwen3-vl-2b may need 9 nodes (maxReplicas x nodesPerGroup)"),
    ("multi-node-groups-exceed-node-group", "staging", autoscaling(1, maxReplicas=2),
     "gpuNodeGroups[1].maxSize=2", "qwen3-vl-32b may need 4 nodes"),
    ("unknown-alert-threshold", "dev", section("monitoring", "alerts", "ttftP99Seconds", value=3),
     "monitoring.alerts.ttftP99Seconds=3", "unknown key (did you mean ttftP95Seconds?)"),
    ("unknown-alert-threshold-far", "dev", section("monitoring", "alerts", "gpuTemperature", value=90),
     "monitoring.alerts.gpuTemperature=90", "unknown key (known keys: clockOffsetSeconds"),
    ("zero-without-scale-to-zero", "staging", autoscaling(0, minReplicas=0),
     "serving.deployments[0].autoscaling.minReplicas=0", "needs scaleToZero: true"),
    ("kv-threshold-not-a-fraction", "dev", section("monitoring", "alerts", "kvCacheUsage", value=90),
     "monitoring.alerts.kvCacheUsage=90.0", "must be a fraction in (0, 1]"),
    ("5xx-ratio-zero", "dev", section("monitoring", "alerts", "gateway5xxRatio", value=0),
     "monitoring.alerts.gateway5xxRatio=0.0", "must be a fraction in (0, 1]"),
    ("vision-fallback-ratio-above-one", "staging",
     section("monitoring", "alerts", "visionLocalFallbackRatio", value=2),
     "monitoring.alerts.visionLocalFallbackRatio=2.0", "must be a fraction in (0, 1]"),
    ("ttft-slo-negative", "dev", section("monitoring", "alerts", "ttftP95Seconds", value=-1),
     "monitoring.alerts.ttftP95Seconds=-1.0", "must be greater than 0"),
    ("kv-target-not-a-fraction", "dev", autoscaling(0, kvCacheUsageTarget=80),
     "serving.deployments[0].autoscaling.kvCacheUsageTarget=80.0", "must be a fraction in (0, 1]"),
    ("stabilisation-over-hpa-limit", "dev", autoscaling(0, scaleDownStabilizationSeconds=7200),
     "serving.deployments[0].autoscaling.scaleDownStabilizationSeconds=7200", "between 0 and 3600"),
    ("queue-target-zero", "dev", autoscaling(0, queueDepthTarget=0),
     "serving.deployments[0].autoscaling.queueDepthTarget=0", "must be greater than 0"),
    ("keda-without-prometheus", "dev", section("monitoring", "enabled", value=False),
     "autoscaling.keda=true", "KEDA's triggers query Prometheus"),
    ("no-retention", "dev", section("monitoring", "retentionDays", value=0),
     "monitoring.retentionDays=0", "must be greater than 0"),
    ("threshold-of-wrong-type", "dev", section("monitoring", "alerts", "queueBacklog", value="many"),
     "monitoring.alerts.queueBacklog=many", "must be an integer"),
]  # fmt: skip


@pytest.mark.parametrize(("stack", "mutate", "key", "reason"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_refused_naming_the_key(
    stack: str, mutate: Callable[[Config], None], key: str, reason: str
) -> None:
    config = copy.deepcopy(stack_config(stack))
    mutate(config)
    with pytest.raises(SettingsError) as err:
        build("test", stack, config)
    lines = [line.strip() for line in str(err.value).splitlines()]
    matching = [line for line in lines if line.startswith(f"- {key}: ")]
    assert matching, f"no problem for {key} in:\n{err.value}"
    assert any(reason in line for line in matching), f"{reason!r} not in {matching}"


def test_scale_to_zero_and_monitoring_off_without_keda_are_accepted() -> None:
    config = copy.deepcopy(stack_config("dev"))
    autoscaling(0, minReplicas=0, scaleToZero=True)(config)
    assert build("test", "dev", config).serving.deployments[0].autoscaling.min_replicas == 0
    config = copy.deepcopy(stack_config("dev"))
    section("monitoring", "enabled", value=False)(config)
    section("autoscaling", "keda", value=False)(config)
    assert build("test", "dev", config).monitoring.enabled is False
