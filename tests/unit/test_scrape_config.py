"""The offline rehearsal's prometheus.yml: the real promtool accepts it (rule files included),
and its jobs and labels are the ones the in-cluster monitors produce."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from components.alert_rules import render_alert_rules
from components.monitoring import LeaderTarget, build_exporter_monitors, build_leader_monitor
from components.scrape_config import ScrapeTarget, leader_labels, render_prometheus_config
from stacks.settings import ROOT, load_stack_file
from tests.metric_names import promtool

STACKS = ["dev", "staging", "prod"]


def rehearsal_targets(stack: str) -> dict[str, list[ScrapeTarget]]:
    """What the rehearsal would pass: one loopback port per leader and exporter."""
    s = load_stack_file(ROOT / f"Pulumi.{stack}.yaml")
    leaders = [
        ScrapeTarget(f"127.0.0.1:{18000 + i}", leader_labels(d.name, d.model, 0))
        for i, d in enumerate(s.serving.deployments)
    ]
    return {
        "vllm": leaders,
        "nginx-exporter": [ScrapeTarget("127.0.0.1:19113")],
        "redis-exporter": [ScrapeTarget("127.0.0.1:19121")],
        "node-exporter": [ScrapeTarget("127.0.0.1:19100", {"node": "rehearsal"})],
    }


@pytest.mark.parametrize("stack", STACKS)
def test_promtool_check_config_accepts_the_rendered_config(stack: str, tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yml"
    rules.write_text(render_alert_rules(load_stack_file(ROOT / f"Pulumi.{stack}.yaml")))
    config = tmp_path / "prometheus.yml"
    config.write_text(render_prometheus_config(rehearsal_targets(stack), rule_files=[str(rules)]))
    result = promtool("check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr
    # promtool follows rule_files and checks them too
    assert f"Checking {rules}" in result.stdout
    assert "SUCCESS" in result.stdout


def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check is real: a duplicate job name is refused."""
    text = render_prometheus_config({"vllm": [ScrapeTarget("127.0.0.1:1")]})
    document = yaml.safe_load(text)
    document["scrape_configs"] *= 2
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(document))
    result = promtool("check", "config", config)
    assert result.returncode == 1
    assert "found multiple scrape configs with job name" in result.stdout + result.stderr


def test_jobs_targets_and_labels() -> None:
    document = yaml.safe_load(
        render_prometheus_config(rehearsal_targets("staging"), scrape_interval_seconds=5)
    )
    assert document["global"] == {"scrape_interval": "5s", "evaluation_interval": "5s"}
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert set(jobs) == {"vllm", "nginx-exporter", "redis-exporter", "node-exporter"}
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
