"""Alert rules: the real promtool checks them, and a promtool unit-test suite proves that each alert fires on a series that should trigger it and stays silent on one that should not.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_alert_rules.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.render.alert_rules import build_alert_rules, render_alert_rules
from tests.support.alert_rules import (
    rules_of,
    settings_of,
    unit_tests,
)
from tests.support.metric_names import (
    REFERENCE_FILES,
    exporter_names,
    metric_names,
    promtool,
    reference_names,
)

STACKS = ["dev", "staging", "prod"]


# Hand count: per deployment VllmEngineDown + VllmMetricsAbsent + VllmEngineRestarts, then
# queue, KV, TTFT, gateway 5xx, XID, GPU node NotReady, clock offset, clock sync, Redis memory.
# staging adds the vision tier's three (VisionEncoderDown, VisionEncoderFallback, ...Rejected...)
RULE_COUNTS = {"dev": 3 + 9, "staging": 6 + 9 + 3, "prod": 6 + 9}


def write_suite(directory: Path, rules: str, tests: Mapping[str, Any]) -> Path:
    (directory / "rules.yml").write_text(rules)
    suite = directory / "tests.yml"
    suite.write_text(yaml.safe_dump(dict(tests), sort_keys=False, width=1000))
    return suite


@pytest.mark.parametrize("stack", STACKS)
def test_promtool_check_rules_accepts_every_stack(stack: str, tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(render_alert_rules(settings_of(stack)))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {RULE_COUNTS[stack]} rules found" in result.stdout


@pytest.mark.parametrize("stack", STACKS)
def test_each_alert_fires_when_it_should_and_only_then(stack: str, tmp_path: Path) -> None:
    s = settings_of(stack)
    suite = write_suite(tmp_path, render_alert_rules(s), unit_tests(s))
    result = promtool("test", "rules", suite)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_suite_fails_when_a_threshold_is_not_the_one_in_settings(tmp_path: Path) -> None:
    """The suite can fail: rules built with 10x the thresholds stay silent where it expects alerts."""
    s = settings_of("dev")
    a = s.monitoring.alerts
    raised = dataclasses.replace(
        a, queue_backlog=a.queue_backlog * 10, ttft_p95_seconds=a.ttft_p95_seconds * 10
    )
    other = dataclasses.replace(s, monitoring=dataclasses.replace(s.monitoring, alerts=raised))
    suite = write_suite(tmp_path, render_alert_rules(other), unit_tests(s))
    result = promtool("test", "rules", suite)
    assert result.returncode == 1
    assert "VllmQueueBacklog" in result.stdout + result.stderr
    assert "VllmTtftP95High" in result.stdout + result.stderr


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The check is real: the same rule file with one expression broken does not pass."""
    rules = build_alert_rules(settings_of("dev"))
    rules["groups"][0]["rules"][0]["expr"] = "sum by (deployment (up)"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", path)
    assert result.returncode == 1
    assert "parse error" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def exporters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    return exporter_names(tmp_path_factory.mktemp("exporters"))


@pytest.mark.parametrize("stack", STACKS)
def test_rules_use_only_metric_names_that_exist(stack: str, exporters: dict[str, set[str]]) -> None:
    known = set().union(*(reference_names(f) for f in REFERENCE_FILES), *exporters.values())
    used = set().union(*(metric_names(r["expr"]) for r in rules_of(settings_of(stack))))
    assert used <= known, f"unknown metric names: {sorted(used - known)}"
    # the exporter-backed names the alerts rely on, seen on the real exporters
    assert {"node_timex_offset_seconds", "node_timex_sync_status"} <= exporters["node-exporter"]
    assert {"redis_memory_used_bytes", "redis_memory_max_bytes"} <= exporters["redis-exporter"]
