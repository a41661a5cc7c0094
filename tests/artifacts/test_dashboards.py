"""Dashboards: valid JSON, one row per deployment (and per GPU node group), every query parses with the real promtool and uses only metric names that exist.

This module: rendered files checked by the real programs that read them. The other layers' tests
of the same code: tests/unit/test_dashboards.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from components.render.dashboards import build_dashboards
from tests.support.dashboards import STACKS, settings_of
from tests.support.metric_names import (
    REFERENCE_FILES,
    check_queries,
    exporter_names,
    metric_names,
    reference_names,
)


def exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def exporters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    return exporter_names(tmp_path_factory.mktemp("exporters"))


@pytest.mark.parametrize("stack", STACKS)
def test_every_query_parses_with_promtool(stack: str, tmp_path: Path) -> None:
    """Each panel query becomes a recording rule, which promtool parses like Prometheus does."""
    queries = [e for model in build_dashboards(settings_of(stack)).values() for e in exprs(model)]
    result = check_queries(queries, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


@pytest.mark.parametrize("stack", STACKS)
def test_queries_use_only_metric_names_that_exist(
    stack: str, exporters: dict[str, set[str]]
) -> None:
    known = set().union(*(reference_names(f) for f in REFERENCE_FILES), *exporters.values())
    used = set().union(
        *(metric_names(e) for d in build_dashboards(settings_of(stack)).values() for e in exprs(d))
    )
    assert used <= known, f"unknown metric names: {sorted(used - known)}"


def test_the_exporter_names_the_dashboards_need_are_real(exporters: dict[str, set[str]]) -> None:
    """Scraped from Debian's exporters on loopback (nginx exporter 0.11, redis_exporter 1.45,
    node_exporter 1.5); the stacks run newer images of the same projects."""
    assert {"nginx_http_requests_total", "nginx_connections_active", "nginx_connections_reading",
            "nginx_connections_writing", "nginx_connections_waiting"} <= exporters["nginx-exporter"]  # fmt: skip
    assert {"redis_memory_used_bytes", "redis_memory_max_bytes", "redis_keyspace_hits_total",
            "redis_keyspace_misses_total", "redis_evicted_keys_total",
            "redis_connected_clients"} <= exporters["redis-exporter"]  # fmt: skip
    assert {"node_timex_offset_seconds", "node_timex_sync_status",
            "node_timex_maxerror_seconds"} <= exporters["node-exporter"]  # fmt: skip
    # stub_status has no status codes: there is no per-status nginx metric to build ratios on
    assert not any("status" in name for name in exporters["nginx-exporter"])
