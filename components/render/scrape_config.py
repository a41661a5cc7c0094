"""Scrape jobs and their labels, and the static Prometheus config of the offline rehearsal.

In the cluster, the monitors of components/monitoring.py discover the targets and
relabel them; offline there is no Kubernetes to discover from, so the rehearsal
lists targets by hand. Both use the job names and label keys defined here, so the
alert rules and dashboards (which filter on them) work unchanged on either side.
No Pulumi imports: the rehearsal imports this module on its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

import yaml

# Job names: the in-cluster monitors set `job` to these through relabelling.
JOB_VLLM: Final = "vllm"
JOB_ENCODER: Final = "vllm-encoder"  # the vision tier's encoder-only vLLM pods (docs/vision.md)
JOB_DCGM: Final = "dcgm-exporter"
JOB_NGINX: Final = "nginx-exporter"
JOB_ROUTER: Final = "gateway-router"  # the gateway's routing tier and quota sidecar (njs)
JOB_REDIS: Final = "redis-exporter"
# kube-prometheus-stack's bundled node rules and dashboards expect this exact job name.
JOB_NODE: Final = "node-exporter"
JOBS: Final = (JOB_VLLM, JOB_ENCODER, JOB_DCGM, JOB_NGINX, JOB_ROUTER, JOB_REDIS, JOB_NODE)

# Labels added to every vLLM leader's series (vLLM itself only adds model_name and engine).
DEPLOYMENT: Final = "deployment"
MODEL: Final = "model"
GROUP: Final = "group"
# The Kubernetes node a node/GPU exporter runs on (the key kube-state-metrics uses too).
NODE: Final = "node"

METRICS_PATH: Final = "/metrics"


def label_name(key: str) -> str:
    """A Kubernetes label key as Prometheus names it: Kubernetes service discovery and
    kube-state-metrics both turn every character not valid in a label name into `_`."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def leader_labels(deployment: str, model: str, group: int | str) -> dict[str, str]:
    """Labels of one vLLM leader target: which deployment, which model, which LWS group."""
    return {DEPLOYMENT: deployment, MODEL: model, GROUP: str(group)}


@dataclass(frozen=True)
class ScrapeTarget:
    """One `host:port` to scrape, with the labels its in-cluster monitor would have added."""

    address: str
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


def render_prometheus_config(
    targets: Mapping[str, Sequence[ScrapeTarget]],
    *,
    rule_files: Sequence[str] = (),
    scrape_interval_seconds: int = 15,
    evaluation_interval_seconds: int | None = None,
) -> str:
    """prometheus.yml with one static job per key of `targets` (job name -> its targets).

    Jobs with no targets are left out: an empty static job only adds noise to /targets.
    """
    unknown = sorted(set(targets) - set(JOBS))
    if unknown:
        raise ValueError(f"unknown scrape job(s) {unknown}; known: {', '.join(JOBS)}")
    interval = f"{scrape_interval_seconds}s"
    config: dict[str, Any] = {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": f"{evaluation_interval_seconds or scrape_interval_seconds}s",
        },
        "rule_files": list(rule_files),
        "scrape_configs": [
            _static_job(job, job_targets) for job, job_targets in targets.items() if job_targets
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


def _static_job(job: str, targets: Sequence[ScrapeTarget]) -> dict[str, Any]:
    return {
        "job_name": job,
        "metrics_path": METRICS_PATH,
        "static_configs": [
            {"targets": [t.address], "labels": dict(t.labels)}
            if t.labels
            else {"targets": [t.address]}
            for t in targets
        ],
    }
