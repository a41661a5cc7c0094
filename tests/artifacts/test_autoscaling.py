"""Autoscaling under Pulumi mocks, per stack: the pinned KEDA release and one ScaledObject per deployment that scales its LeaderWorkerSet on the queue-depth metric, with the configured threshold, bounds and scale-down stabilisation.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/program/test_autoscaling.py, tests/unit/test_autoscaling.py.
"""

from __future__ import annotations

from pathlib import Path

from components.autoscaling import activity_query, kv_cache_query, queue_query
from tests.support.metric_names import check_queries, metric_names, reference_names


def test_trigger_queries_parse_with_promtool_and_use_vllm_metrics(tmp_path: Path) -> None:
    queries = [queue_query("d"), kv_cache_query("d"), activity_query("d")]
    result = check_queries(queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout
    used = set().union(*map(metric_names, queries))
    assert used == {
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_running",
    }
    assert used <= reference_names("vllm_metrics.txt")  # docs/reference/vllm.md#metrics
