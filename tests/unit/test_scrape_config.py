"""The offline rehearsal's prometheus.yml: the real promtool accepts it (rule files included),
and its jobs and labels are the ones the in-cluster monitors produce."""

from __future__ import annotations

import pytest
import yaml

from components.monitoring import LeaderTarget, build_exporter_monitors, build_leader_monitor
from components.render.scrape_config import ScrapeTarget, leader_labels, render_prometheus_config
from tests.support.scrape_config import rehearsal_targets


def test_jobs_targets_and_labels() -> None:
    document = yaml.safe_load(
        render_prometheus_config(rehearsal_targets("staging"), scrape_interval_seconds=5)
    )
    assert document["global"] == {"scrape_interval": "5s", "evaluation_interval": "5s"}
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert set(jobs) == {
        "vllm",
        "nginx-exporter",
        "gateway-router",
        "redis-exporter",
        "node-exporter",
    }
    assert jobs["vllm"]["metrics_path"] == "/metrics"
    assert jobs["vllm"]["static_configs"] == [
        {"targets": ["127.0.0.1:18000"],
         "labels": {"deployment": "qwen3-vl-2b", "model": "Qwen/Qwen3-VL-2B-Instruct", "group": "0"}},
        {"targets": ["127.0.0.1:18001"],
         "labels": {"deployment": "qwen3-vl-32b", "model": "Qwen/Qwen3-VL-32B-Instruct", "group": "0"}},
    ]  # fmt: skip
    assert jobs["nginx-exporter"]["static_configs"] == [{"targets": ["127.0.0.1:19113"]}]


def test_jobs_without_targets_are_left_out_and_unknown_jobs_refused() -> None:
    document = yaml.safe_load(
        render_prometheus_config({"vllm": [], "node-exporter": [ScrapeTarget("h:1")]})
    )
    assert [job["job_name"] for job in document["scrape_configs"]] == ["node-exporter"]
    with pytest.raises(ValueError, match="unknown scrape job"):
        render_prometheus_config({"vlm": [ScrapeTarget("h:1")]})


def _labels_set_by(relabelings: list[dict[str, object]]) -> set[str]:
    return {str(r["targetLabel"]) for r in relabelings if r["action"] == "replace"}


def test_static_labels_match_what_the_in_cluster_monitors_add() -> None:
    """Offline and in-cluster series carry the same job name and leader labels."""
    leader = build_leader_monitor(LeaderTarget(deployment="d", model="m/x"), "ns", "15s")
    relabelings = leader["podMetricsEndpoints"][0]["relabelings"]
    assert _labels_set_by(relabelings) == {"job", *leader_labels("d", "m/x", 0)}
    assert {"action": "replace", "targetLabel": "job", "replacement": "vllm"} in relabelings
    exporters = build_exporter_monitors(serving_namespace="ns", redis=True, interval="15s")
    assert set(exporters) == set(rehearsal_targets("dev")) - {"vllm"} | {"dcgm-exporter"}
    for job, spec in exporters.items():
        assert {"action": "replace", "targetLabel": "job", "replacement": job} in spec[
            "podMetricsEndpoints"
        ][0]["relabelings"]
