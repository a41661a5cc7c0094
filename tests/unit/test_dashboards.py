"""Dashboards: valid JSON, one row per deployment (and per GPU node group), every query
parses with the real promtool and uses only metric names that exist."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from components.render.dashboards import build_dashboards
from tests.support.dashboards import STACKS, settings_of
from tests.support.metric_names import (
    metric_names,
)

# The ConfigMap entries Grafana's sidecar writes out as dashboard files.
INFERENCE_FILE = "qwen-vl-serving-inference.json"


INFRASTRUCTURE_FILE = "qwen-vl-serving-infrastructure.json"


# Hand-written from the stack files.
DEPLOYMENTS = {
    "dev": ["qwen3-vl-2b"],
    "staging": ["qwen3-vl-2b", "qwen3-vl-32b"],
    "prod": ["qwen3-vl-2b", "qwen3-vl-235b"],
}


GPU_GROUPS = {"dev": ["l40s"], "staging": ["l40s", "l40s-efa"], "prod": ["l40s", "h100-efa"]}


def rows(dashboard: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(row title, its panels) in order."""
    found: list[tuple[str, list[dict[str, Any]]]] = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.append((panel["title"], []))
        else:
            found[-1][1].append(panel)
    return found


@pytest.mark.parametrize("stack", STACKS)
def test_dashboards_are_valid_json_with_unique_ids_and_a_sound_grid(stack: str) -> None:
    dashboards = build_dashboards(settings_of(stack))
    assert set(dashboards) == {INFERENCE_FILE, INFRASTRUCTURE_FILE}
    assert len({d["uid"] for d in dashboards.values()}) == 2
    for model in dashboards.values():
        text = json.dumps(model)
        assert json.loads(text) == model
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for p in model["panels"]:
            g = p["gridPos"]
            assert g["x"] >= 0
            assert g["x"] + g["w"] <= 24
            mine = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not cells & mine, f"panel {p['title']!r} overlaps another"
            cells |= mine
        for p in model["panels"]:
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert p["targets"], p["title"]


@pytest.mark.parametrize("stack", STACKS)
def test_one_row_per_deployment_filtered_on_that_deployment(stack: str) -> None:
    s = settings_of(stack)
    inference = rows(build_dashboards(s)[INFERENCE_FILE])
    assert inference[0][0] == "Gateway"
    # the vision tier's rows (tests/unit/test_vision_tier.py) follow the deployments' rows
    deployment_rows = [row for row in inference[1:] if not row[0].endswith(": vision tier")]
    assert [title.split(":")[0] for title, _ in deployment_rows] == DEPLOYMENTS[stack]
    for (title, panels), name in zip(deployment_rows, DEPLOYMENTS[stack], strict=True):
        others = [o for o in DEPLOYMENTS[stack] if o != name]
        for panel in panels:
            for target in panel["targets"]:
                assert f'deployment="{name}"' in target["expr"], (title, panel["title"])
                assert not any(f'deployment="{o}"' in target["expr"] for o in others)
        titles = {p["title"] for p in panels}
        # the operator's questions, each answered in every deployment's row
        assert {"Time to first token", "Inter-token latency", "End-to-end request latency",
                "Tokens per second", "Running vs waiting requests per group",
                "KV-cache usage per group", "Prefix-cache hit ratio", "Success ratio (non-5xx)",
                "Multimodal cache hit ratio"} <= titles  # fmt: skip


@pytest.mark.parametrize("stack", STACKS)
def test_one_gpu_row_per_node_group_then_redis_and_clocks(stack: str) -> None:
    titles = [t for t, _ in rows(build_dashboards(settings_of(stack))[INFRASTRUCTURE_FILE])]
    groups = [f"GPU node group {g}" for g in GPU_GROUPS[stack]]
    assert [t.split(" (")[0] for t in titles] == [*groups, "Redis", "Node clocks"]


def test_ttft_panel_has_three_quantiles_and_the_slo_line() -> None:
    s = settings_of("prod")
    panels = dict(rows(build_dashboards(s)[INFERENCE_FILE]))
    row = next(p for t, p in panels.items() if t.startswith("qwen3-vl-235b"))
    ttft = next(p for p in row if p["title"] == "Time to first token")
    assert [t["legendFormat"] for t in ttft["targets"]] == ["p50", "p95", "p99"]
    assert ttft["targets"][1]["expr"] == (
        "histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket"
        '{job="vllm",deployment="qwen3-vl-235b"}[5m])))'
    )
    assert ttft["fieldConfig"]["defaults"]["thresholds"]["steps"][1]["value"] == 5.0


def test_rows_and_lines_follow_the_settings() -> None:
    s = settings_of("dev")
    d = s.serving.deployments[0]
    no_mm = dataclasses.replace(d, mm_processor_cache_gb=0.0)
    alerts = dataclasses.replace(s.monitoring.alerts, kv_cache_usage=0.75)
    changed = dataclasses.replace(
        s,
        serving=dataclasses.replace(s.serving, deployments=(no_mm,)),
        monitoring=dataclasses.replace(s.monitoring, alerts=alerts),
        redis=dataclasses.replace(s.redis, enabled=False),
    )
    dashboards = build_dashboards(changed)
    ((_, panels),) = rows(dashboards[INFERENCE_FILE])[1:]
    titles = {p["title"]: p for p in panels}
    # vLLM exports the multimodal cache counters only when that cache is on
    assert "Multimodal cache hit ratio" not in titles
    assert (
        titles["KV-cache usage per group"]["fieldConfig"]["defaults"]["thresholds"]["steps"][1][
            "value"
        ]
        == 0.75
    )
    assert "Redis" not in [t for t, _ in rows(dashboards[INFRASTRUCTURE_FILE])]


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (deployment, le) (rate(vllm:e2e_request_latency_seconds_bucket{job="vllm",'
        'status=~"5.."}[5m])) / on (node) group_left (label_x) max by (node) (kube_node_labels) '
        "> bool 0.5 and up offset 5m"
    )
    assert metric_names(expr) == {
        "vllm:e2e_request_latency_seconds_bucket",
        "kube_node_labels",
        "up",
    }
